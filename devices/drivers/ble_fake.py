"""A fake ORES BLE module for tests and demos: the documented GATT service without a radio.

``FakeGattModule`` is the module side of docs/ble.md over a ``devices.sim.base.SimulatedModule`` (and, if
given, a ``devices.attest.SimAttestation``): it serves identity, telemetry (read and notify), control,
status, auth, certificate and credential exactly as documented, enforces the credential once provisioned
(ATT error "insufficient authorization" for protected characteristics), and answers bad values with ATT
errors or status codes as a real module would.  ``FakeBleakClient`` has the part of ``bleak.BleakClient``'s
interface the driver uses, with the same names and signatures and bleak's own exception and GATT object
types, so ``devices.drivers.ble.BleGattDriver`` runs unchanged against it (pass
``client_factory=module.client_factory``).  ``make_advertisement`` builds bleak's real ``BLEDevice`` and
``AdvertisementData`` the way bleak's BlueZ backend does, around real service data bytes.  Given a
``devices.sim.firmware.SimFirmware`` the module also serves the firmware update of docs/ble.md §3.9 (the
firmware and firmware data characteristics), reports its running firmware version and its health through
``FirmwareModule``, and while it reboots it is gone: connections drop and new ones fail.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from bleak.assigned_numbers import CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import (
    BleakCharacteristicNotFoundError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
    BleakGATTProtocolErrorCode,
)
from bleak.uuids import normalize_uuid_str

from devices.attest import SimAttestation
from devices.ble_wire import (
    AUTH_CHAR_UUID,
    CERTIFICATE_CHAR_UUID,
    CONTROL_CHAR_UUID,
    CREDENTIAL_CHAR_UUID,
    FIRMWARE_CHAR_UUID,
    FIRMWARE_DATA_CHAR_UUID,
    IDENTITY_CHAR_UUID,
    MAX_VALUE_LEN,
    ORES_SERVICE_UUID,
    STATUS_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
    AuthAnswer,
    GattStatus,
    encode_advertisement,
    encode_auth_answer,
    encode_certificate,
    encode_firmware_value,
    encode_identity,
    encode_status,
    encode_telemetry,
    kind_code,
    parse_challenge,
    parse_control_value,
    parse_credential_request,
    parse_firmware_data,
    parse_firmware_request,
    vendor_id_for,
)
from devices.model import DeviceKind
from devices.ores_http_wire import WireError, WireRangeError
from devices.sim.base import SimulatedModule
from devices.sim.firmware import FirmwareModule, SimFirmware, SimFirmwareError

__all__ = ["DEFAULT_FAKE_ADDRESS", "FakeBleakClient", "FakeGattModule", "make_advertisement"]

_LOGGER = logging.getLogger(__name__)

DEFAULT_FAKE_ADDRESS: Final = "F0:0D:00:00:00:01"

# uuid → properties, in handle order.
_TABLE: Final[tuple[tuple[str, tuple[CharacteristicPropertyName, ...]], ...]] = (
    (IDENTITY_CHAR_UUID, ("read",)),
    (TELEMETRY_CHAR_UUID, ("read", "notify")),
    (CONTROL_CHAR_UUID, ("write",)),
    (STATUS_CHAR_UUID, ("read", "notify")),
    (AUTH_CHAR_UUID, ("read", "write")),
    (CERTIFICATE_CHAR_UUID, ("read",)),
    (CREDENTIAL_CHAR_UUID, ("write",)),
    (FIRMWARE_CHAR_UUID, ("read", "write")),
    (FIRMWARE_DATA_CHAR_UUID, ("write-without-response", "write")),
)
_ATTESTATION_CHARS: Final = frozenset({AUTH_CHAR_UUID, CERTIFICATE_CHAR_UUID})
_FIRMWARE_CHARS: Final = frozenset({FIRMWARE_CHAR_UUID, FIRMWARE_DATA_CHAR_UUID})
_PROTECTED: Final = frozenset({TELEMETRY_CHAR_UUID, CONTROL_CHAR_UUID, *_FIRMWARE_CHARS})
_MAX_MANIFEST_BYTES: Final = 64 * 1024
_ATT = BleakGATTProtocolErrorCode


def make_advertisement(
    *,
    address: str = DEFAULT_FAKE_ADDRESS,
    service_data: bytes | None = None,
    kind: DeviceKind | int = DeviceKind.MICROINVERTER,
    vendor_id: int = 0xFFFF,
    serial: str = "SN-000001",
    unprovisioned: bool = True,
    rssi: int = -60,
    local_name: str | None = "ORES module",
    tx_power: int | None = None,
    list_service: bool = True,
) -> tuple[BLEDevice, AdvertisementData]:
    """bleak's ``BLEDevice`` and ``AdvertisementData`` for one ORES advert, built as bleak's BlueZ backend
    builds them from a D-Bus ``org.bluez.Device1`` property set.  ``service_data`` overrides the encoded
    payload (for malformed adverts); ``list_service=False`` leaves the UUID out of the service list."""
    payload = (
        encode_advertisement(kind=kind, vendor_id=vendor_id, serial=serial, unprovisioned=unprovisioned)
        if service_data is None
        else service_data
    )
    path = "/org/bluez/hci0/dev_" + address.replace(":", "_")
    uuids = [ORES_SERVICE_UUID] if list_service else []
    props: dict[str, Any] = {
        "Address": address,
        "AddressType": "public",
        "Alias": local_name if local_name is not None else address.replace(":", "-"),
        "Paired": False,
        "Trusted": False,
        "Blocked": False,
        "LegacyPairing": False,
        "Connected": False,
        "UUIDs": uuids,
        "Adapter": "/org/bluez/hci0",
        "ServiceData": {ORES_SERVICE_UUID: bytearray(payload)},
        "ServicesResolved": False,
        "RSSI": rssi,
    }
    if local_name is not None:
        props["Name"] = local_name
    if tx_power is not None:
        props["TxPower"] = tx_power
    adv = AdvertisementData(
        local_name=props.get("Name"),
        manufacturer_data={},
        service_data={k: bytes(v) for k, v in props["ServiceData"].items()},
        service_uuids=props["UUIDs"],
        tx_power=props.get("TxPower"),
        rssi=props.get("RSSI", -127),
        platform_data=(path, props),
    )
    name = None if props["Alias"] == props["Address"].replace(":", "-") else props["Alias"]
    device = BLEDevice(props["Address"], name, {"path": path, "props": props})
    return device, adv


@dataclass(eq=False)
class _Session:
    """One connection's state on the module side."""

    client: FakeBleakClient
    authorized: bool = False
    subscriptions: dict[str, Callable[[bytearray], None]] = field(default_factory=dict)


class FakeGattModule:
    """The module side of the ORES GATT service over a simulated module (see the module docstring).

    Test hooks: ``reachable`` (``False``: connecting fails like an absent device), ``absent``
    (characteristic UUIDs the module does not have, as seen at the next connection), ``read_overrides``
    (characteristic UUID → raw bytes served instead of the real value), ``fail_with`` (a bleak exception
    every operation raises), ``stale_status`` (the status is not updated: a broken module), and the
    records ``writes`` and ``connections``.
    """

    def __init__(
        self,
        module: SimulatedModule,
        *,
        address: str = DEFAULT_FAKE_ADDRESS,
        attestation: SimAttestation | None = None,
        vendor_id: int | None = None,
        firmware: SimFirmware | None = None,
    ) -> None:
        if firmware is not None and (firmware.vendor, firmware.model) != (
            module.info.identity.vendor,
            module.info.identity.model,
        ):
            raise ValueError(
                f"the firmware is for {firmware.vendor!r} {firmware.model!r}, the module is "
                f"{module.info.identity.vendor!r} {module.info.identity.model!r}"
            )
        self.module = module
        self.firmware = firmware
        self.address = address.upper()
        self.attestation = attestation
        vendor = module.info.identity.vendor
        self.vendor_id = vendor_id if vendor_id is not None else (vendor_id_for(vendor) or 0xFFFF)
        self.credential: str | None = None
        self.hub_id: str | None = None
        self.reachable = True
        self.fail_with: BleakError | None = None
        self.stale_status = False
        self.read_overrides: dict[str, bytes] = {}
        self.absent: set[str] = set()
        self.writes: list[tuple[str, bytes]] = []
        self.connections = 0
        self._status = encode_status(GattStatus(0, True))
        self._auth_answer = b""
        self._sessions: list[_Session] = []
        self._manifest = bytearray()  # the manifest being staged by ``manifest`` requests

    @property
    def provisioned(self) -> bool:
        return self.credential is not None

    @property
    def served(self) -> SimulatedModule:
        """The module as the GATT service shows it (through ``FirmwareModule`` when it has firmware)."""
        return self.module if self.firmware is None else FirmwareModule(self.module, self.firmware)

    @property
    def rebooting(self) -> bool:
        return self.firmware is not None and self.firmware.rebooting

    def has(self, char_uuid: str) -> bool:
        """Whether the module serves this characteristic (auth and certificate only with an attestation;
        none of those in ``absent``)."""
        if char_uuid in self.absent:
            return False
        if char_uuid in _FIRMWARE_CHARS:
            return self.firmware is not None
        return char_uuid not in _ATTESTATION_CHARS or self.attestation is not None

    def advertisement(
        self, *, rssi: int = -60, local_name: str | None = "ORES module"
    ) -> tuple[BLEDevice, AdvertisementData]:
        """What this module advertises now (its unprovisioned flag follows its state)."""
        info = self.module.info
        return make_advertisement(
            address=self.address,
            kind=kind_code(info.kind),
            vendor_id=self.vendor_id,
            serial=info.identity.serial,
            unprovisioned=not self.provisioned,
            rssi=rssi,
            local_name=local_name,
        )

    def client_factory(
        self,
        address_or_ble_device: str,
        disconnected_callback: Callable[[Any], None] | None = None,
        services: Iterable[str] | None = None,
        *,
        timeout: float = 30,
    ) -> FakeBleakClient:
        """A ``GattClientFactory``: clients whose radio reaches this module."""
        return FakeBleakClient(
            address_or_ble_device, disconnected_callback, services, timeout=timeout, module=self
        )

    def drop_connections(self) -> None:
        """The link is lost: every connected client sees a disconnection."""
        for session in list(self._sessions):
            session.client._link_lost()

    def notify_telemetry(self) -> int:
        """Send the current telemetry to every subscribed, authorized connection; returns how many got it."""
        if self.rebooting:
            return 0
        data = bytearray(encode_telemetry(self.served.telemetry()))
        sent = 0
        for session in list(self._sessions):
            callback = session.subscriptions.get(TELEMETRY_CHAR_UUID)
            if callback is not None and (session.authorized or not self.provisioned):
                callback(bytearray(data))
                sent += 1
        return sent

    # ------------------------------------------------------------------ GATT server side

    def _attach(self, session: _Session) -> None:
        if not self.reachable or self.rebooting:
            raise BleakDeviceNotFoundError(
                session.client.address, f"Device with address {session.client.address} was not found."
            )
        self.connections += 1
        self._sessions.append(session)

    def _detach(self, session: _Session) -> None:
        if session in self._sessions:
            self._sessions.remove(session)

    def _check_access(self, session: _Session, char_uuid: str, *, grace: bool = False) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if self.rebooting and not grace:
            self.drop_connections()
            raise BleakError("Not connected: the module is rebooting")
        if char_uuid in _PROTECTED and self.provisioned and not session.authorized:
            raise BleakGATTProtocolError(_ATT.INSUFFICIENT_AUTHORIZATION)

    def _read(self, session: _Session, char_uuid: str) -> bytes:
        # A module that accepted install or rollback answers the status read of that request, then goes.
        self._check_access(session, char_uuid, grace=char_uuid == STATUS_CHAR_UUID)
        if char_uuid in self.read_overrides:
            return self.read_overrides[char_uuid]
        if char_uuid == IDENTITY_CHAR_UUID:
            return encode_identity(self.served.info, provisioned=self.provisioned)
        if char_uuid == TELEMETRY_CHAR_UUID:
            return encode_telemetry(self.served.telemetry())
        if char_uuid == FIRMWARE_CHAR_UUID and self.firmware is not None:
            return encode_firmware_value(self.firmware.status())
        if char_uuid == STATUS_CHAR_UUID:
            return self._status
        if char_uuid == AUTH_CHAR_UUID:
            return self._auth_answer
        if char_uuid == CERTIFICATE_CHAR_UUID and self.attestation is not None:
            return encode_certificate(self.attestation.certificate)
        raise BleakGATTProtocolError(_ATT.READ_NOT_PERMITTED)

    def _write(self, session: _Session, char_uuid: str, data: bytes) -> None:
        self._check_access(session, char_uuid)
        if len(data) > MAX_VALUE_LEN:
            raise BleakGATTProtocolError(_ATT.INVALID_ATTRIBUTE_VALUE_LENGTH)
        self.writes.append((char_uuid, data))
        if char_uuid == CONTROL_CHAR_UUID:
            self._answer(*self._control(data))
        elif char_uuid == AUTH_CHAR_UUID and self.attestation is not None:
            self._answer(*self._challenge(self.attestation, data))
        elif char_uuid == CREDENTIAL_CHAR_UUID:
            self._answer(*self._credential(session, data))
        elif char_uuid == FIRMWARE_CHAR_UUID and self.firmware is not None:
            self._answer(*self._firmware_request(self.firmware, data))
        elif char_uuid == FIRMWARE_DATA_CHAR_UUID and self.firmware is not None:
            self._firmware_data(self.firmware, data)
        else:
            raise BleakGATTProtocolError(_ATT.WRITE_NOT_PERMITTED)

    def _answer(self, seq: int, code: str = "", message: str = "") -> None:
        """Update the status (before the write is acknowledged) and notify it."""
        if self.stale_status:
            return
        self._status = encode_status(GattStatus(seq, not code, code, message))
        for session in list(self._sessions):
            callback = session.subscriptions.get(STATUS_CHAR_UUID)
            if callback is not None:
                callback(bytearray(self._status))

    @staticmethod
    def _seq_of(data: bytes) -> int:
        """The request's seq if it can be read at all (0 otherwise), to address a ``bad_request`` answer."""
        try:
            value = json.loads(data)
            seq = value.get("seq") if isinstance(value, dict) else None
            return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= 0xFFFFFFFF else 0
        except ValueError:
            return 0

    def _control(self, data: bytes) -> tuple[int, str, str]:
        try:
            seq, request = parse_control_value(data)
        except WireRangeError as err:
            return self._seq_of(data), "out_of_range", str(err)
        except WireError as err:
            return self._seq_of(data), "bad_request", str(err)
        if not self.module.info.capabilities.controllable:
            return seq, "not_controllable", "this module does not accept control"
        try:
            self.module.apply(request.setpoint, revert_after_s=request.revert_after_s)
        except ValueError as err:
            code = "not_applicable" if "applies to" in str(err) else "out_of_range"
            return seq, code, str(err)
        return seq, "", ""

    def _challenge(self, attestation: SimAttestation, data: bytes) -> tuple[int, str, str]:
        try:
            challenge = parse_challenge(data)
        except WireError as err:
            return self._seq_of(data), "bad_request", str(err)
        _cert, signature = attestation.respond(challenge.nonce, challenge.hub_id)
        self._auth_answer = encode_auth_answer(AuthAnswer(challenge.nonce, signature))
        return challenge.seq, "", ""

    def _firmware_request(self, firmware: SimFirmware, data: bytes) -> tuple[int, str, str]:
        try:
            request = parse_firmware_request(data)
        except WireError as err:
            return self._seq_of(data), "bad_request", str(err)
        seq = request.seq
        try:
            if request.op == "manifest":
                assert request.offset is not None and request.data is not None
                if request.offset == 0:
                    self._manifest.clear()
                if request.offset != len(self._manifest):
                    return (
                        seq,
                        "wrong_offset",
                        f"manifest piece at {request.offset}, expected {len(self._manifest)}",
                    )
                if len(self._manifest) + len(request.data) > _MAX_MANIFEST_BYTES:
                    return seq, "bad_manifest", f"manifest is longer than {_MAX_MANIFEST_BYTES} bytes"
                self._manifest += request.data
            elif request.op == "begin":
                assert request.signature is not None
                firmware.begin(bytes(self._manifest), request.signature)
            elif request.op == "install":
                firmware.install()
            elif request.op == "rollback":
                firmware.rollback()
        except SimFirmwareError as err:
            return seq, err.code, err.message
        return seq, "", ""

    @staticmethod
    def _firmware_data(firmware: SimFirmware, data: bytes) -> None:
        """A data write: refusals are not ATT errors (it comes without response); the module records them in
        its firmware status, which the hub reads after each chunk."""
        try:
            offset, image = parse_firmware_data(data)
        except WireError as err:
            raise BleakGATTProtocolError(_ATT.INVALID_ATTRIBUTE_VALUE_LENGTH) from err
        try:
            firmware.chunk(offset, image)
        except SimFirmwareError as err:
            _LOGGER.debug("firmware data write refused: %s", err)

    def _credential(self, session: _Session, data: bytes) -> tuple[int, str, str]:
        try:
            request = parse_credential_request(data)
        except WireError as err:
            return self._seq_of(data), "bad_request", str(err)
        seq = request.seq
        if request.op == "login":
            assert request.credential is not None
            if self.credential is None:
                return seq, "", ""  # an unprovisioned module ignores credentials
            session.authorized = hmac.compare_digest(request.credential.encode(), self.credential.encode())
            return (seq, "", "") if session.authorized else (seq, "unauthorized", "wrong credential")
        if request.op == "provision":
            assert request.credential is not None and request.hub_id is not None
            if self.credential is not None and not session.authorized:
                return seq, "unauthorized", "provisioned: log in with the current credential to re-key"
            self.credential, self.hub_id = request.credential, request.hub_id
            for other in self._sessions:
                other.authorized = other is session
            return seq, "", ""
        # deprovision
        if self.credential is not None and not session.authorized:
            return seq, "unauthorized", "log in with the current credential first"
        self.credential = self.hub_id = None
        return seq, "", ""


class FakeBleakClient:
    """The part of ``bleak.BleakClient`` the GATT driver uses, over a ``FakeGattModule`` (same signatures,
    bleak's own exceptions and ``BleakGATTCharacteristic`` objects)."""

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        disconnected_callback: Callable[[FakeBleakClient], None] | None = None,
        services: Iterable[str] | None = None,
        *,
        timeout: float = 30,
        module: FakeGattModule | None = None,
        **kwargs: Any,
    ) -> None:
        self._address = (
            address_or_ble_device.address
            if isinstance(address_or_ble_device, BLEDevice)
            else address_or_ble_device
        )
        self._disconnected_callback = disconnected_callback
        self._service_filter = None if services is None else {normalize_uuid_str(s) for s in services}
        self._timeout = timeout
        self._module = module
        self._session: _Session | None = None
        self._services: BleakGATTServiceCollection | None = None

    @property
    def address(self) -> str:
        return self._address

    @property
    def mtu_size(self) -> int:
        return 247

    @property
    def is_connected(self) -> bool:
        return self._session is not None

    @property
    def services(self) -> BleakGATTServiceCollection:
        if self._services is None:
            raise BleakError("Service Discovery has not been performed yet")
        return self._services

    async def __aenter__(self) -> FakeBleakClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    async def connect(self, **kwargs: Any) -> None:
        await asyncio.sleep(0)  # a real connection yields to the loop
        module = self._module
        if module is None or module.address != self._address.upper():
            raise BleakDeviceNotFoundError(
                self._address, f"Device with address {self._address} was not found."
            )
        if self._session is not None:
            return
        session = _Session(self)
        module._attach(session)
        self._session = session
        self._services = self._discover(module)

    def _discover(self, module: FakeGattModule) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        if self._service_filter is not None and ORES_SERVICE_UUID not in self._service_filter:
            return collection
        service = BleakGATTService(None, 1, ORES_SERVICE_UUID)
        collection.add_service(service)
        handle = 1
        for char_uuid, properties in _TABLE:
            handle += 2
            if module.has(char_uuid):
                collection.add_characteristic(
                    BleakGATTCharacteristic(None, handle, char_uuid, list(properties), lambda: 244, service)
                )
        return collection

    async def disconnect(self) -> None:
        await asyncio.sleep(0)
        self._close()

    def _close(self) -> bool:
        session, self._session = self._session, None
        self._services = None
        if session is None:
            return False
        if self._module is not None:
            self._module._detach(session)
        return True

    def _link_lost(self) -> None:
        if self._close() and self._disconnected_callback is not None:
            self._disconnected_callback(self)

    def _resolve(self, char_specifier: BleakGATTCharacteristic | int | str) -> tuple[_Session, str]:
        session = self._session
        if session is None or self._module is None:
            raise BleakError("Not connected")
        if isinstance(char_specifier, BleakGATTCharacteristic):
            return session, char_specifier.uuid
        characteristic = self.services.get_characteristic(char_specifier)
        if characteristic is None:
            raise BleakCharacteristicNotFoundError(char_specifier)
        return session, characteristic.uuid

    async def read_gatt_char(
        self, char_specifier: BleakGATTCharacteristic | int | str, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        await asyncio.sleep(0)
        session, char_uuid = self._resolve(char_specifier)
        assert self._module is not None
        return bytearray(self._module._read(session, char_uuid))

    async def write_gatt_char(
        self,
        char_specifier: BleakGATTCharacteristic | int | str,
        data: bytes | bytearray | memoryview,
        response: bool | None = None,
    ) -> None:
        await asyncio.sleep(0)
        session, char_uuid = self._resolve(char_specifier)
        assert self._module is not None
        self._module._write(session, char_uuid, bytes(data))

    async def start_notify(
        self,
        char_specifier: BleakGATTCharacteristic | int | str,
        callback: Callable[[BleakGATTCharacteristic, bytearray], Awaitable[None] | None],
        **kwargs: Any,
    ) -> None:
        if not self.is_connected:
            raise BleakError("Not connected")
        session, char_uuid = self._resolve(char_specifier)
        characteristic = self.services.get_characteristic(char_uuid)
        assert characteristic is not None and self._module is not None
        self._module._check_access(session, char_uuid)  # the CCCD write is protected like the value
        if "notify" not in characteristic.properties:
            raise BleakError(f"Characteristic {char_uuid} does not support notifications")
        if inspect.iscoroutinefunction(callback):
            raise BleakError("FakeBleakClient supports plain callbacks only")

        def deliver(data: bytearray) -> None:
            callback(characteristic, data)

        session.subscriptions[char_uuid] = deliver

    async def stop_notify(self, char_specifier: BleakGATTCharacteristic | int | str) -> None:
        session, char_uuid = self._resolve(char_specifier)
        session.subscriptions.pop(char_uuid, None)
