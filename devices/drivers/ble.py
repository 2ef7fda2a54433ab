"""The BLE GATT driver: the hub's client side of the ORES GATT service (docs/ble.md) over bleak.

One ``BleGattDriver`` talks to one module at ``ble://AA:BB:CC:DD:EE:FF``.  It keeps one BLE connection open
(connecting is slow) and reconnects lazily after a drop.  Every GATT operation — connect, read, write,
subscribe — is bounded by the driver's timeout and serialised by a lock (a GATT client does one thing at a
time).  Requests (control, authentication challenge, credential) are written with response and carry a
``seq``; the module answers each in the status characteristic, which the driver reads and matches by
``seq``.  Wire problems become ``devices.errors`` exceptions: no answer, a dropped link or any other bleak
failure → ``DeviceUnreachable``; a malformed value or an ATT error → ``ProtocolError``; an ATT "insufficient
authorization/authentication/encryption" error or an ``unauthorized`` status → ``AuthenticationFailed``; a
module without the ORES service (``probe``) or without a certificate (``authenticate``) → ``NotSupported``;
a refused control → ``CommandRejected``.  Formats live in ``devices.ble_wire``, shared with the GATT fake.
The firmware update of docs/ble.md §3.9 makes it a ``FirmwareCapable`` driver: the manifest goes in pieces
through the firmware characteristic, the image as many data writes (a 4-byte offset and up to MTU − 7 bytes
each, without response), after which the driver reads the firmware characteristic to check what arrived;
the module's refusals become ``CommandRejected`` with its reason.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ClassVar, Final, Protocol, TypeVar

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import (
    BleakCharacteristicNotFoundError,
    BleakError,
    BleakGATTProtocolError,
    BleakGATTProtocolErrorCode,
)

from devices.attest import DeviceCertificate, challenge_message
from devices.ble_wire import (
    AUTH_CHAR_UUID,
    CERTIFICATE_CHAR_UUID,
    CONTROL_CHAR_UUID,
    CREDENTIAL_CHAR_UUID,
    DEFAULT_FIRMWARE_WRITE_BYTES,
    FIRMWARE_CHAR_UUID,
    FIRMWARE_DATA_CHAR_UUID,
    FIRMWARE_DATA_HEADER_LEN,
    FIRMWARE_MANIFEST_PIECE_BYTES,
    IDENTITY_CHAR_UUID,
    MAX_VALUE_LEN,
    ORES_SERVICE_UUID,
    STATUS_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
    CredentialRequest,
    FirmwareOp,
    FirmwareRequest,
    GattStatus,
    decode_telemetry,
    encode_challenge,
    encode_control,
    encode_credential_request,
    encode_firmware_data,
    encode_firmware_request,
    parse_auth_answer,
    parse_certificate_value,
    parse_firmware_value,
    parse_identity_provisioned_value,
    parse_identity_value,
    parse_status_value,
)
from devices.drivers.base import Address, FirmwareSlots
from devices.errors import (
    AuthenticationFailed,
    CommandRejected,
    DeviceError,
    DeviceUnreachable,
    NotSupported,
    ProtocolError,
)
from devices.model import DeviceInfo, Setpoint, Telemetry
from devices.ores_http_wire import (
    SETPOINT_KIND,
    WireError,
    WireUnsupportedError,
    control_to_wire,
)
from firmware.manifest import MAX_MANIFEST_BYTES, BadSignature, decode_signature

__all__ = ["DEFAULT_BLE_TIMEOUT_S", "BleGattDriver", "GattClient", "GattClientFactory", "ble_address"]

_LOGGER = logging.getLogger(__name__)

#: BLE connections take longer than TCP ones: the default per-operation bound.
DEFAULT_BLE_TIMEOUT_S: Final = 5.0

_T = TypeVar("_T")

#: ATT errors that mean "this connection is not allowed to do that" (not logged in, not paired).
_AUTH_ATT_ERRORS: Final = frozenset(
    {
        BleakGATTProtocolErrorCode.INSUFFICIENT_AUTHENTICATION,
        BleakGATTProtocolErrorCode.INSUFFICIENT_AUTHORIZATION,
        BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION,
        BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION_KEY_SIZE,
    }
)
#: Status codes with a fixed meaning whatever the request (the others depend on the request).
_STATUS_ERRORS: Final[dict[str, type[DeviceError]]] = {
    "unauthorized": AuthenticationFailed,
    "forbidden": AuthenticationFailed,
    "not_applicable": NotSupported,
}
#: Firmware requests: a ``bad_request`` is the driver's own fault (the module's refusals are ``CommandRejected``).
_FIRMWARE_ERRORS: Final[dict[str, type[DeviceError]]] = {"bad_request": ProtocolError}
#: ATT header bytes of a write (opcode + handle): a value is at most MTU − 3 bytes.
_ATT_WRITE_HEADER: Final = 3


class GattClient(Protocol):
    """The part of ``bleak.BleakClient`` this driver uses (``devices.drivers.ble_fake.FakeBleakClient`` too)."""

    @property
    def is_connected(self) -> bool: ...

    async def connect(self, **kwargs: Any) -> None: ...

    async def disconnect(self) -> None: ...

    async def read_gatt_char(self, char_specifier: str, **kwargs: Any) -> bytearray: ...

    async def write_gatt_char(
        self, char_specifier: str, data: bytes, response: bool | None = None
    ) -> None: ...

    async def start_notify(
        self,
        char_specifier: str,
        callback: Callable[[BleakGATTCharacteristic, bytearray], None],
        **kwargs: Any,
    ) -> None: ...

    async def stop_notify(self, char_specifier: str) -> None: ...


class GattClientFactory(Protocol):
    """Builds a client for one address; ``bleak.BleakClient`` itself is one."""

    def __call__(
        self,
        address_or_ble_device: str,
        /,
        disconnected_callback: Callable[[Any], None] | None = None,
        services: Iterable[str] | None = None,
        *,
        timeout: float = 30,
    ) -> GattClient: ...


def ble_address(mac: str) -> Address:
    """The driver address of a BLE module (``ble://AA:BB:CC:DD:EE:FF``; a UUID on macOS)."""
    text = mac.strip().upper()
    if not text:
        raise ValueError("a BLE address must not be empty")
    return Address("ble", text, 0)


def _check_credential(credential: str) -> str:
    """The ORES-HTTP driver's rule, so both accept the same stored credentials (modules check the format)."""
    if not credential or not credential.isascii() or not credential.isprintable() or " " in credential:
        raise ValueError("credential must be non-empty printable ASCII without spaces")
    return credential


class BleGattDriver:
    """One ORES module over BLE GATT (see the module docstring)."""

    protocol: ClassVar[str] = "ble-gatt"
    schemes: ClassVar[tuple[str, ...]] = ("ble",)

    def __init__(
        self,
        address: Address,
        *,
        timeout: float = DEFAULT_BLE_TIMEOUT_S,
        client_factory: GattClientFactory = BleakClient,
        credential: str | None = None,
        firmware_write_bytes: int = DEFAULT_FIRMWARE_WRITE_BYTES,
    ) -> None:
        if address.scheme not in self.schemes or not address.host:
            raise ValueError(f"the BLE GATT driver needs a ble:// address, not {address}")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if not 1 <= firmware_write_bytes <= MAX_VALUE_LEN - FIRMWARE_DATA_HEADER_LEN:
            raise ValueError(f"firmware_write_bytes must be 1..{MAX_VALUE_LEN - FIRMWARE_DATA_HEADER_LEN}")
        self.address = address
        self._firmware_write_bytes = firmware_write_bytes
        self._timeout = timeout
        self._factory = client_factory
        self._credential = None if credential is None else _check_credential(credential)
        self._client: GattClient | None = None
        self._authorized = False  # this connection has logged in with the credential
        self._lock = asyncio.Lock()
        self._seq = secrets.randbelow(2**31)  # a fresh start, so an old status is never taken for ours
        self._info: DeviceInfo | None = None
        self._provisioned: bool | None = None
        self._on_telemetry: Callable[[Telemetry], None] | None = None

    def __repr__(self) -> str:
        return f"BleGattDriver({self.address})"

    @property
    def info(self) -> DeviceInfo | None:
        """What the last successful ``probe`` learnt, if any."""
        return self._info

    @property
    def provisioned(self) -> bool | None:
        """The module's ``provisioned`` flag from the last ``probe`` (``None`` if it did not say)."""
        return self._provisioned

    def set_credential(self, credential: str | None) -> None:
        """Use ``credential`` to log in on every (re)connection; ``None`` stops logging in."""
        self._credential = None if credential is None else _check_credential(credential)
        self._authorized = False

    # ------------------------------------------------------------------ Driver operations

    async def probe(self) -> DeviceInfo:
        async with self._lock:
            client = await self._connected()
            data = await self._gatt(
                "read identity", lambda: client.read_gatt_char(IDENTITY_CHAR_UUID), missing=NotSupported
            )
        try:
            info = parse_identity_value(bytes(data))
        except WireUnsupportedError as err:
            raise NotSupported(f"{self.address}: {err}") from err
        except WireError as err:
            raise ProtocolError(f"{self.address}: {err}") from err
        try:
            self._provisioned = parse_identity_provisioned_value(bytes(data))
        except WireError:
            self._provisioned = None
        self._info = info
        return info

    async def read(self) -> Telemetry:
        async with self._lock:
            client = await self._connected(login=True)
            data = await self._gatt("read telemetry", lambda: client.read_gatt_char(TELEMETRY_CHAR_UUID))
        try:
            return decode_telemetry(bytes(data), now=time.time())
        except WireError as err:
            raise ProtocolError(f"{self.address}: {err}") from err

    async def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
        if setpoint.is_empty():
            _LOGGER.debug("%s: empty setpoint, nothing to send", self.address)
            return
        if self._info is not None and not setpoint.release:
            kind = self._info.kind
            for name in control_to_wire(setpoint):
                if SETPOINT_KIND[name] is not kind:
                    raise NotSupported(f"{name} does not apply to a {kind.value} ({self.address})")
        async with self._lock:
            seq = self._next_seq()
            try:
                payload = encode_control(setpoint, revert_after_s, seq=seq)
            except ValueError as err:
                raise CommandRejected(f"setpoint for {self.address} cannot be sent: {err}") from err
            client = await self._connected(login=True)
            await self._request(client, "control", CONTROL_CHAR_UUID, payload, seq, refused=CommandRejected)

    async def close(self) -> None:
        await self._drop()

    # ------------------------------------------------------------------ authentication

    async def authenticate(self, nonce: bytes, hub_id: str) -> tuple[DeviceCertificate, bytes]:
        """Challenge the module: returns its certificate and its signature over ``challenge_message(nonce,
        hub_id)``, for ``devices.attest.verify_attestation`` (nothing is verified here).

        ``NotSupported`` if the module has no certificate; ``BadCertificate`` (an ``AuthenticationFailed``)
        if its certificate is malformed; ``ProtocolError`` for a malformed answer; ``ValueError`` (before
        anything is sent) for a nonce or hub id no module would sign.
        """
        challenge_message(nonce, hub_id)
        async with self._lock:
            client = await self._connected()
            raw_cert = await self._gatt(
                "read certificate", lambda: client.read_gatt_char(CERTIFICATE_CHAR_UUID), missing=NotSupported
            )
            seq = self._next_seq()
            payload = encode_challenge(nonce, hub_id, seq=seq)
            await self._request(
                client, "challenge", AUTH_CHAR_UUID, payload, seq, refused=ProtocolError, missing=NotSupported
            )
            raw_answer = await self._gatt("read auth", lambda: client.read_gatt_char(AUTH_CHAR_UUID))
        try:
            certificate = parse_certificate_value(bytes(raw_cert))
            answer = parse_auth_answer(bytes(raw_answer))
        except WireError as err:
            raise ProtocolError(f"{self.address}: {err}") from err
        if answer.nonce != nonce:
            raise ProtocolError(f"{self.address}: the auth answer is for another nonce (a stale answer)")
        return certificate, answer.signature

    async def provision(self, credential: str, hub_id: str) -> None:
        """Give the module its per-device credential (``devices.ores_http_wire.generate_credential``) and this
        hub's id; from then on it answers only a connection that logs in with it.  A provisioned module takes a
        new credential only from a connection logged in with the current one (``set_credential``), a re-key;
        otherwise ``AuthenticationFailed``.  ``NotSupported`` for a module without the credential
        characteristic, ``ProtocolError`` for other refusals (a malformed credential)."""
        _check_credential(credential)
        async with self._lock:
            client = await self._connected(login=self._credential is not None)
            seq = self._next_seq()
            payload = encode_credential_request(CredentialRequest(seq, "provision", credential, hub_id))
            await self._request(
                client,
                "provision",
                CREDENTIAL_CHAR_UUID,
                payload,
                seq,
                refused=ProtocolError,
                missing=NotSupported,
            )
            self._credential = credential
            self._authorized = True
            self._provisioned = True

    async def deprovision(self) -> None:
        """Make the module forget its hub and credential (it advertises as unprovisioned again; a module that
        already was succeeds too).  Needs the current credential (``set_credential``)."""
        async with self._lock:
            client = await self._connected(login=True)
            seq = self._next_seq()
            payload = encode_credential_request(CredentialRequest(seq, "deprovision"))
            await self._request(
                client,
                "deprovision",
                CREDENTIAL_CHAR_UUID,
                payload,
                seq,
                refused=ProtocolError,
                missing=NotSupported,
            )
            self._credential = None
            self._authorized = False
            self._provisioned = False

    # ------------------------------------------------------------------ firmware update (§3.9)

    #: The image chunk size the hub should hand to ``firmware_chunk``: each chunk becomes many data writes
    #: and one read to check them, so a chunk is also the unit of progress and of resumption.
    firmware_chunk_bytes: ClassVar[int] = 16 * 1024

    async def firmware_status(self) -> FirmwareSlots:
        """Read the firmware characteristic: the module's slots and the state of an update."""
        async with self._lock:
            client = await self._connected(login=True)
            return await self._read_firmware(client)

    async def firmware_begin(self, manifest: bytes, signature: bytes) -> int:
        """Send the manifest file in ``manifest`` requests, then ``begin`` with the signature (64 raw bytes or
        the base64 text of a ``.sig`` file); returns the bytes of the image the module already holds.
        ``CommandRejected`` with the module's reason when it refuses the release."""
        if len(manifest) > MAX_MANIFEST_BYTES:
            raise ValueError(f"a manifest is at most {MAX_MANIFEST_BYTES} bytes, got {len(manifest)}")
        try:
            raw_signature = decode_signature(signature)
        except BadSignature:
            raw_signature = bytes(signature)  # sent as it is: the module refuses it with its own reason
        async with self._lock:
            client = await self._connected(login=True)
            for offset in range(0, max(len(manifest), 1), FIRMWARE_MANIFEST_PIECE_BYTES):
                piece = manifest[offset : offset + FIRMWARE_MANIFEST_PIECE_BYTES]
                await self._firmware_request(
                    client, FirmwareRequest(self._next_seq(), "manifest", offset=offset, data=piece)
                )
            await self._firmware_request(
                client, FirmwareRequest(self._next_seq(), "begin", signature=raw_signature)
            )
            return (await self._read_firmware(client)).received_bytes

    async def firmware_chunk(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` as data writes of at most MTU − 7 image bytes (and at most
        ``firmware_write_bytes``), without response, then read the firmware characteristic: returns the
        module's received byte count, or raises ``CommandRejected`` when it did not take all of ``data``
        (a wrong offset, an image longer than its manifest), naming its reason and the resume point."""
        if offset < 0:
            raise ValueError("offset must be >= 0")
        async with self._lock:
            client = await self._connected(login=True)
            size = self._write_size(client)
            view = memoryview(data)
            for start in range(0, len(view), size):
                value = encode_firmware_data(offset + start, bytes(view[start : start + size]))
                await self._gatt(
                    "write firmware data",
                    functools.partial(client.write_gatt_char, FIRMWARE_DATA_CHAR_UUID, value, response=False),
                    missing=NotSupported,
                )
            slots = await self._read_firmware(client)
        expected = offset + len(data)
        if slots.received_bytes != expected or slots.state != "receiving":
            reason = slots.error or f"state {slots.state}, {slots.received_bytes} bytes received"
            raise CommandRejected(
                f"{self.address} refused firmware data at {offset}..{expected}: {reason} "
                f"(resume at {slots.received_bytes})"
            )
        return slots.received_bytes

    async def firmware_install(self) -> None:
        """``install``: the module verifies the image and, when it accepts it, reboots into it; the driver
        then drops the connection (the next operation reconnects once the module is back).
        ``CommandRejected`` (``hash_mismatch``, ``size_mismatch``, ...) when it refuses."""
        await self._firmware_reboot("install")

    async def firmware_rollback(self) -> None:
        """``rollback``: the module boots its other slot (``CommandRejected`` with ``no_previous`` when it
        has none); the driver drops the connection."""
        await self._firmware_reboot("rollback")

    async def _firmware_reboot(self, op: FirmwareOp) -> None:
        async with self._lock:
            client = await self._connected(login=True)
            await self._firmware_request(client, FirmwareRequest(self._next_seq(), op))
            await self._drop()  # the module reboots: this link is gone

    async def _firmware_request(self, client: GattClient, request: FirmwareRequest) -> None:
        await self._request(
            client,
            f"firmware {request.op}",
            FIRMWARE_CHAR_UUID,
            encode_firmware_request(request),
            request.seq,
            refused=CommandRejected,
            missing=NotSupported,
            errors=_FIRMWARE_ERRORS,
        )

    async def _read_firmware(self, client: GattClient) -> FirmwareSlots:
        data = await self._gatt(
            "read firmware", lambda: client.read_gatt_char(FIRMWARE_CHAR_UUID), missing=NotSupported
        )
        try:
            return parse_firmware_value(bytes(data))
        except WireError as err:
            raise ProtocolError(f"{self.address}: {err}") from err

    def _write_size(self, client: GattClient) -> int:
        """Image bytes per data write: what the negotiated MTU allows, at most ``firmware_write_bytes``."""
        try:
            mtu = getattr(client, "mtu_size", None)
        except (BleakError, AttributeError):
            mtu = None
        if (
            isinstance(mtu, int)
            and not isinstance(mtu, bool)
            and mtu > _ATT_WRITE_HEADER + FIRMWARE_DATA_HEADER_LEN
        ):
            return min(self._firmware_write_bytes, mtu - _ATT_WRITE_HEADER - FIRMWARE_DATA_HEADER_LEN)
        return self._firmware_write_bytes

    # ------------------------------------------------------------------ notifications

    async def start_telemetry(self, callback: Callable[[Telemetry], None]) -> None:
        """Subscribe to telemetry notifications; ``callback`` gets each valid sample (malformed ones are
        logged and dropped).  The subscription is renewed after a reconnection."""
        async with self._lock:
            client = await self._connected(login=True)
            await self._subscribe(client)
            self._on_telemetry = callback

    async def stop_telemetry(self) -> None:
        async with self._lock:
            self._on_telemetry = None
            client = self._client
            if client is not None and client.is_connected:
                await self._gatt("stop notify", lambda: client.stop_notify(TELEMETRY_CHAR_UUID))

    async def _subscribe(self, client: GattClient) -> None:
        await self._gatt(
            "subscribe to telemetry",
            lambda: client.start_notify(TELEMETRY_CHAR_UUID, self._telemetry_notified),
        )

    def _telemetry_notified(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        callback = self._on_telemetry
        if callback is None:
            return
        try:
            sample = decode_telemetry(bytes(data), now=time.time())
        except WireError as err:
            _LOGGER.warning("%s: malformed telemetry notification dropped: %s", self.address, err)
            return
        callback(sample)

    # ------------------------------------------------------------------ transport

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    async def _connected(self, *, login: bool = False) -> GattClient:
        """The open connection (connecting first if needed), logged in if ``login`` and a credential is set.
        Call with the lock held."""
        client = self._client
        fresh = False
        if client is None or not client.is_connected:
            fresh = True
            await self._drop()
            client = self._factory(
                self.address.host,
                disconnected_callback=self._disconnected,
                services=[ORES_SERVICE_UUID],
                timeout=self._timeout,
            )
            self._client = client
            await self._gatt("connect", client.connect)
            _LOGGER.debug("%s: connected", self.address)
        subscribe = fresh and self._on_telemetry is not None
        if (login or subscribe) and self._credential is not None and not self._authorized:
            seq = self._next_seq()
            payload = encode_credential_request(CredentialRequest(seq, "login", self._credential))
            await self._request(
                client,
                "login",
                CREDENTIAL_CHAR_UUID,
                payload,
                seq,
                refused=ProtocolError,
                missing=NotSupported,
            )
            self._authorized = True
        if subscribe:
            await self._subscribe(client)  # renew the subscription the lost connection took with it
        return client

    def _disconnected(self, client: object) -> None:
        """bleak's disconnected callback: forget the link so the next operation reconnects."""
        if client is self._client:
            _LOGGER.info("%s: BLE link lost", self.address)
            self._client = None
            self._authorized = False

    async def _drop(self) -> None:
        client, self._client = self._client, None
        self._authorized = False
        if client is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await client.disconnect()
        except (TimeoutError, BleakError, OSError, EOFError) as err:
            _LOGGER.debug("%s: disconnect failed: %s", self.address, err)

    async def _request(
        self,
        client: GattClient,
        what: str,
        char_uuid: str,
        payload: bytes,
        seq: int,
        *,
        refused: type[DeviceError],
        missing: type[DeviceError] = ProtocolError,
        errors: Mapping[str, type[DeviceError]] | None = None,
    ) -> GattStatus:
        """Write a request with response, then read and check the module's status answer for ``seq``."""
        await self._gatt(
            f"write {what}",
            lambda: client.write_gatt_char(char_uuid, payload, response=True),
            missing=missing,
        )
        data = await self._gatt("read status", lambda: client.read_gatt_char(STATUS_CHAR_UUID))
        try:
            status = parse_status_value(bytes(data))
        except WireError as err:
            raise ProtocolError(f"{self.address}: {err}") from err
        if status.seq != seq:
            raise ProtocolError(
                f"{self.address}: status answers request {status.seq}, not {what} request {seq} "
                "(the module did not update its status before acknowledging the write)"
            )
        if not status.ok:
            error = _STATUS_ERRORS.get(status.code) or (errors or {}).get(status.code, refused)
            detail = f"{status.code}: {status.message}" if status.message else status.code or "refused"
            raise error(f"{self.address} refused {what}: {detail}")
        return status

    async def _gatt(
        self,
        what: str,
        operation: Callable[[], Awaitable[_T]],
        *,
        missing: type[DeviceError] = ProtocolError,
    ) -> _T:
        """Run one bleak operation within the timeout, translating its failures (see the module docstring)."""
        try:
            async with asyncio.timeout(self._timeout):
                return await operation()
        except TimeoutError as err:
            await self._drop()
            raise DeviceUnreachable(f"{self.address}: {what}: no answer within {self._timeout:g} s") from err
        except BleakCharacteristicNotFoundError as err:
            raise missing(f"{self.address}: {what}: the module has no such ORES characteristic") from err
        except BleakGATTProtocolError as err:
            code = err.code
            text = f"{self.address}: {what}: ATT error 0x{int(code):02x} ({code.name})"
            if code in _AUTH_ATT_ERRORS:
                self._authorized = False
                raise AuthenticationFailed(text) from err
            raise ProtocolError(text) from err
        except (BleakError, OSError, EOFError) as err:
            await self._drop()
            raise DeviceUnreachable(f"{self.address}: {what}: {err or type(err).__name__}") from err
