"""Tests of the BLE GATT driver against the GATT fake (``FakeBleakClient`` + ``FakeGattModule``): probe, read
and apply for every kind with the hub's signs, malformed characteristic values, bleak failures, the
credential, telemetry notifications, challenge-response authentication with ``devices.attest``, and the firmware
update (real signed releases into the fake's ``SimFirmware`` slots, the reboot driven by a manual clock)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import struct
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from bleak.exc import BleakDBusError, BleakError

from devices.attest import (
    DEMO_VENDOR,
    BadCertificate,
    BadSignature,
    ChallengeBook,
    IdentityMismatch,
    SimAttestation,
    TrustAnchor,
    UntrustedVendor,
    demo_vendor_key,
    key_id,
    make_sim_attestation,
    verify_attestation,
)
from devices.ble_wire import (
    AUTH_CHAR_UUID,
    CERTIFICATE_CHAR_UUID,
    CREDENTIAL_CHAR_UUID,
    FIRMWARE_CHAR_UUID,
    FIRMWARE_DATA_CHAR_UUID,
    IDENTITY_CHAR_UUID,
    STATUS_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
    TELEMETRY_LEN,
    AuthAnswer,
    encode_auth_answer,
    encode_telemetry,
    parse_advertisement,
)
from devices.drivers.base import Address, Driver, FirmwareCapable, FirmwareSlots
from devices.drivers.ble import BleGattDriver, GattClient, ble_address
from devices.drivers.ble_fake import FakeBleakClient, FakeGattModule
from devices.errors import (
    AuthenticationFailed,
    CommandRejected,
    DeviceUnreachable,
    NotSupported,
    ProtocolError,
)
from devices.model import (
    Capabilities,
    DeviceInfo,
    DeviceKind,
    Identity,
    OperatingState,
    Setpoint,
    Telemetry,
)
from devices.ores_http_wire import generate_credential
from devices.sim.base import StaticModule
from devices.sim.firmware import SimFirmware
from tests.devices.sim.test_firmware import ManualClock, Signer, image_of

HUB = "hub-test-1"

KINDS: dict[DeviceKind, tuple[DeviceInfo, Telemetry]] = {
    DeviceKind.MICROINVERTER: (
        DeviceInfo(
            DeviceKind.MICROINVERTER,
            Identity(DEMO_VENDOR, "Demo MI 800", "MI-0001", "1.4.2"),
            Capabilities(rated_power_w=800.0),
        ),
        Telemetry(
            ts=1_750_000_000.25,
            power_w=351.5,
            energy_out_wh=123_456.75,
            voltage_v=230.1,
            frequency_hz=49.98,
            temperature_c=41.5,
            power_limit_pct=100.0,
        ),
    ),
    DeviceKind.ENERGYSTORAGE: (
        DeviceInfo(
            DeviceKind.ENERGYSTORAGE,
            Identity(DEMO_VENDOR, "Demo Battery 5k", "BAT-0001", "2.0.0"),
            Capabilities(
                rated_power_w=5000.0,
                capacity_wh=10_000.0,
                max_charge_w=5000.0,
                max_discharge_w=5000.0,
                min_soc_pct=10.0,
                max_soc_pct=95.0,
            ),
        ),
        Telemetry(
            ts=1_750_000_000.0,
            power_w=-1200.0,  # charging
            energy_out_wh=5000.0,
            energy_in_wh=6200.0,
            soc_pct=55.5,
            soh_pct=98.0,
        ),
    ),
    DeviceKind.METER: (
        DeviceInfo(DeviceKind.METER, Identity(DEMO_VENDOR, "Demo Meter", "MTR-0001", "0.9")),
        Telemetry(
            ts=1_750_000_000.0,
            power_w=-800.0,  # exporting
            energy_out_wh=2_000_000.0,
            energy_in_wh=1_500_000.0,
            voltage_v=231.0,
            current_a=3.5,
            frequency_hz=50.0,
            grid_ok=True,
        ),
    ),
    DeviceKind.SMARTPLUG: (
        DeviceInfo(
            DeviceKind.SMARTPLUG,
            Identity(DEMO_VENDOR, "Demo Plug", "PLG-0001", "1.0"),
            Capabilities(rated_power_w=3680.0, priority=2, critical=True),
        ),
        Telemetry(ts=1_750_000_000.0, power_w=-60.0, energy_in_wh=42.0, on=True),  # a load consumes
    ),
}


def make_module(
    kind: DeviceKind = DeviceKind.MICROINVERTER,
    *,
    attestation: SimAttestation | None = None,
    address: str = "F0:0D:00:00:00:01",
) -> tuple[StaticModule, FakeGattModule]:
    info, sample = KINDS[kind]
    module = StaticModule(info, sample)
    return module, FakeGattModule(module, address=address, attestation=attestation)


def driver_for(fake: FakeGattModule, *, timeout: float = 2.0, credential: str | None = None) -> BleGattDriver:
    return BleGattDriver(
        ble_address(fake.address), timeout=timeout, client_factory=fake.client_factory, credential=credential
    )


def attestation_for(info: DeviceInfo, *, seed: bytes = b"device-1") -> SimAttestation:
    return make_sim_attestation(
        demo_vendor_key(),
        vendor=info.identity.vendor,
        model=info.identity.model,
        serial=info.identity.serial,
        seed=seed,
    )


def demo_trust() -> dict[str, TrustAnchor]:
    public = demo_vendor_key().public_key()
    return {key_id(public): TrustAnchor(DEMO_VENDOR, public)}


# ----------------------------------------------------------------------------------------------- basics


def test_address_and_protocol() -> None:
    address = ble_address("c4:de:e2:01:02:03")
    assert str(address) == "ble://C4:DE:E2:01:02:03"
    assert Address.parse(str(address)) == address
    driver = BleGattDriver(address)  # the real BleakClient factory; nothing connects yet
    assert isinstance(driver, Driver)
    assert (driver.protocol, driver.schemes) == ("ble-gatt", ("ble",))
    with pytest.raises(ValueError, match="ble://"):
        BleGattDriver(Address.parse("http://127.0.0.1:8080"))
    with pytest.raises(ValueError, match="printable ASCII"):
        BleGattDriver(address, credential="not a credential")


def test_fake_client_has_bleak_client_signatures() -> None:
    # Structural check that FakeBleakClient is a GattClient (mypy checks it statically, too).
    client: GattClient = FakeBleakClient("F0:0D:00:00:00:01")
    assert not client.is_connected


@pytest.mark.parametrize("kind", list(KINDS))
async def test_probe_and_read_every_kind(kind: DeviceKind) -> None:
    info, sample = KINDS[kind]
    _module, fake = make_module(kind)
    driver = driver_for(fake)
    try:
        assert await driver.probe() == info
        assert driver.info == info
        assert driver.provisioned is False
        got = await driver.read()
    finally:
        await driver.close()
    assert got.power_w == sample.power_w
    assert got.state is OperatingState.RUNNING
    for name in (
        "energy_out_wh",
        "energy_in_wh",
        "voltage_v",
        "current_a",
        "frequency_hz",
        "soc_pct",
        "on",
        "grid_ok",
    ):
        assert getattr(got, name) == getattr(sample, name), name
    assert fake.connections == 1  # one connection for probe and read


async def test_signs_follow_the_hub_convention() -> None:
    signs = {}
    for kind in KINDS:
        _module, fake = make_module(kind)
        driver = driver_for(fake)
        try:
            sample = await driver.read()
        finally:
            await driver.close()
        assert sample.power_w is not None
        signs[kind] = math.copysign(1, sample.power_w)
    assert signs == {
        DeviceKind.MICROINVERTER: 1.0,  # producing
        DeviceKind.ENERGYSTORAGE: -1.0,  # charging
        DeviceKind.METER: -1.0,  # exporting
        DeviceKind.SMARTPLUG: -1.0,  # a consuming load
    }


async def test_not_available_fields_and_module_without_clock() -> None:
    module, fake = make_module(DeviceKind.METER)
    module.sample = Telemetry(ts=0.0, state=OperatingState.FAULT, power_w=None)
    fake.read_overrides[TELEMETRY_CHAR_UUID] = (
        encode_telemetry(module.sample)[:4]
        + struct.pack("<d", math.nan)
        + encode_telemetry(module.sample)[12:]
    )
    driver = driver_for(fake)
    try:
        got = await driver.read()
    finally:
        await driver.close()
    assert got.state is OperatingState.FAULT
    assert got.power_w is None and got.voltage_v is None and got.on is None and got.grid_ok is None
    assert got.ts > 1_600_000_000  # stamped by the hub on reception


# ----------------------------------------------------------------------------------------------- apply


@pytest.mark.parametrize(
    ("kind", "setpoint", "revert"),
    [
        (DeviceKind.MICROINVERTER, Setpoint(power_limit_pct=50.0), 60.0),
        (DeviceKind.ENERGYSTORAGE, Setpoint(battery_power_w=-1500.0), 120.0),  # charge at 1.5 kW
        (DeviceKind.ENERGYSTORAGE, Setpoint(battery_power_w=2000.0), None),  # discharge
        (DeviceKind.SMARTPLUG, Setpoint(on=False), 30.0),
    ],
)
async def test_apply_every_kind(kind: DeviceKind, setpoint: Setpoint, revert: float | None) -> None:
    module, fake = make_module(kind)
    driver = driver_for(fake)
    try:
        await driver.apply(setpoint, revert_after_s=revert)
    finally:
        await driver.close()
    assert module.received == [(setpoint, revert)]


@pytest.mark.parametrize("kind", list(KINDS))
async def test_release(kind: DeviceKind) -> None:
    module, fake = make_module(kind)
    driver = driver_for(fake)
    try:
        await driver.apply(Setpoint(release=True, power_limit_pct=10.0), revert_after_s=5.0)
    finally:
        await driver.close()
    assert module.received == [(Setpoint(release=True), None)]
    _uuid, body = fake.writes[-1]
    assert json.loads(body).keys() == {"release", "seq"}


async def test_apply_reflects_in_telemetry_and_empty_setpoint_sends_nothing() -> None:
    _module, fake = make_module(DeviceKind.MICROINVERTER)
    driver = driver_for(fake)
    try:
        await driver.apply(Setpoint())
        assert fake.writes == []
        await driver.apply(Setpoint(power_limit_pct=25.0))
        assert (await driver.read()).power_limit_pct == 25.0
    finally:
        await driver.close()


async def test_setpoint_for_another_kind() -> None:
    module, fake = make_module(DeviceKind.METER)
    driver = driver_for(fake)
    try:
        # Not probed: the module refuses with not_applicable.
        with pytest.raises(NotSupported, match="not_applicable"):
            await driver.apply(Setpoint(on=True))
        await driver.probe()
        writes = len(fake.writes)
        with pytest.raises(NotSupported, match="does not apply to a meter"):
            await driver.apply(Setpoint(power_limit_pct=10.0))
        assert len(fake.writes) == writes  # refused before sending
    finally:
        await driver.close()
    assert module.received == []


async def test_out_of_range_and_non_finite_setpoints_are_rejected() -> None:
    module, fake = make_module(DeviceKind.MICROINVERTER)
    driver = driver_for(fake)
    try:
        with pytest.raises(CommandRejected, match="out_of_range"):
            await driver.apply(Setpoint(power_limit_pct=150.0))
        with pytest.raises(CommandRejected, match="cannot be sent"):
            await driver.apply(Setpoint(power_limit_pct=math.inf))
        with pytest.raises(CommandRejected, match="revert_after_s"):
            await driver.apply(Setpoint(power_limit_pct=10.0), revert_after_s=-1.0)
    finally:
        await driver.close()
    assert module.received == []


async def test_a_module_that_does_not_update_its_status_is_a_protocol_error() -> None:
    _module, fake = make_module(DeviceKind.MICROINVERTER)
    fake.stale_status = True
    driver = driver_for(fake)
    try:
        with pytest.raises(ProtocolError, match="did not update its status"):
            await driver.apply(Setpoint(power_limit_pct=10.0))
    finally:
        await driver.close()


# ----------------------------------------------------------------------------------------------- malformed values


def _telemetry_with(**fields: float) -> bytes:
    """A valid telemetry value with some float fields replaced (by struct offset name)."""
    offsets = {
        "ts": (4, "<d"),
        "power_w": (12, "<f"),
        "energy_out_wh": (16, "<d"),
        "soc_pct": (48, "<f"),
        "power_limit_pct": (56, "<f"),
    }
    data = bytearray(encode_telemetry(KINDS[DeviceKind.ENERGYSTORAGE][1]))
    for name, value in fields.items():
        offset, fmt = offsets[name]
        struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "0 bytes, expected 60"),
        (encode_telemetry(Telemetry(ts=1.0))[: TELEMETRY_LEN - 1], "59 bytes, expected 60"),
        (b"\x02" + encode_telemetry(Telemetry(ts=1.0))[1:], "format 2 is not supported"),
        (encode_telemetry(Telemetry(ts=1.0)) + b"\x00" * 460, "exceeds 512"),
        (_telemetry_with(power_w=math.inf), "telemetry.power_w: must be finite"),
        (_telemetry_with(ts=-5.0), "telemetry.ts"),
        (_telemetry_with(ts=math.inf), "telemetry.ts"),
        (_telemetry_with(energy_out_wh=-1.0), "telemetry.energy_out_wh"),
        (_telemetry_with(soc_pct=150.0), "telemetry.soc_pct"),
        (_telemetry_with(power_limit_pct=-math.inf), "telemetry.power_limit_pct"),
    ],
)
async def test_malformed_telemetry_is_a_protocol_error(value: bytes, reason: str) -> None:
    _module, fake = make_module(DeviceKind.ENERGYSTORAGE)
    fake.read_overrides[TELEMETRY_CHAR_UUID] = value
    driver = driver_for(fake)
    try:
        with pytest.raises(ProtocolError, match=reason):
            await driver.read()
    finally:
        await driver.close()


async def test_longer_telemetry_of_a_later_minor_version_is_read() -> None:
    _module, fake = make_module(DeviceKind.ENERGYSTORAGE)
    fake.read_overrides[TELEMETRY_CHAR_UUID] = (
        encode_telemetry(KINDS[DeviceKind.ENERGYSTORAGE][1]) + b"\x01\x02\x03\x04"
    )
    driver = driver_for(fake)
    try:
        assert (await driver.read()).soc_pct == 55.5
    finally:
        await driver.close()


@pytest.mark.parametrize(
    ("value", "error", "reason"),
    [
        (b"{not json", ProtocolError, "not JSON"),
        (b"[]", ProtocolError, "expected a JSON object"),
        (b'{"protocol":"ores-http","protocol_version":"1.0"}', NotSupported, "not 'ores-ble'"),
        (b'{"protocol":"ores-ble","protocol_version":"2.0"}', NotSupported, "not supported"),
        (b'{"protocol":"ores-ble","protocol_version":"1.0","kind":"meter"}', ProtocolError, "vendor"),
        (b"{" + b" " * 600 + b"}", ProtocolError, "exceeds 512"),
    ],
)
async def test_malformed_identity(value: bytes, error: type[Exception], reason: str) -> None:
    _module, fake = make_module()
    fake.read_overrides[IDENTITY_CHAR_UUID] = value
    driver = driver_for(fake)
    try:
        with pytest.raises(error, match=reason):
            await driver.probe()
    finally:
        await driver.close()


async def test_a_device_without_the_ores_service_is_not_supported() -> None:
    _module, fake = make_module()
    fake.absent.add(IDENTITY_CHAR_UUID)
    driver = driver_for(fake)
    try:
        with pytest.raises(NotSupported, match="no such ORES characteristic"):
            await driver.probe()
    finally:
        await driver.close()


async def test_malformed_status_is_a_protocol_error() -> None:
    _module, fake = make_module()
    driver = driver_for(fake)
    try:
        fake.read_overrides[STATUS_CHAR_UUID] = b'{"seq": "x", "ok": true}'
        with pytest.raises(ProtocolError, match=r"status\.seq"):
            await driver.apply(Setpoint(power_limit_pct=10.0))
    finally:
        await driver.close()


# ----------------------------------------------------------------------------------------------- bleak failures


async def test_bleak_errors_are_device_unreachable() -> None:
    _module, fake = make_module()
    driver = driver_for(fake)
    try:
        await driver.probe()
        fake.fail_with = BleakDBusError("org.bluez.Error.Failed", ["Operation failed"])
        with pytest.raises(DeviceUnreachable, match="read telemetry") as caught:
            await driver.read()
        assert isinstance(caught.value.__cause__, BleakError)
        fake.fail_with = None
        assert (await driver.read()).power_w == 351.5  # reconnected
        assert fake.connections == 2
    finally:
        await driver.close()


async def test_absent_device_is_unreachable() -> None:
    _module, fake = make_module()
    fake.reachable = False
    driver = driver_for(fake)
    try:
        with pytest.raises(DeviceUnreachable, match="connect"):
            await driver.probe()
    finally:
        await driver.close()
    other = BleGattDriver(ble_address("00:00:00:00:00:99"), client_factory=fake.client_factory)
    with pytest.raises(DeviceUnreachable, match="not found"):
        await other.probe()
    await other.close()


async def test_a_client_that_raises_bleak_error_on_every_call() -> None:
    class BrokenClient(FakeBleakClient):
        async def read_gatt_char(
            self, char_specifier: Any, *, use_cached: bool = False, **kwargs: Any
        ) -> bytearray:
            raise BleakError("Not connected")

    _module, fake = make_module()

    def factory(
        address: str,
        disconnected_callback: Callable[[Any], None] | None = None,
        services: Iterable[str] | None = None,
        *,
        timeout: float = 30,
    ) -> BrokenClient:
        return BrokenClient(address, disconnected_callback, services, timeout=timeout, module=fake)

    driver = BleGattDriver(ble_address(fake.address), client_factory=factory)
    try:
        with pytest.raises(DeviceUnreachable, match="Not connected"):
            await driver.probe()
    finally:
        await driver.close()


async def test_a_module_that_never_answers_times_out() -> None:
    never = asyncio.Event()

    class HangingClient(FakeBleakClient):
        async def connect(self, **kwargs: Any) -> None:
            await never.wait()

    def factory(
        address: str,
        disconnected_callback: Callable[[Any], None] | None = None,
        services: Iterable[str] | None = None,
        *,
        timeout: float = 30,
    ) -> HangingClient:
        return HangingClient(address, disconnected_callback, services, timeout=timeout)

    driver = BleGattDriver(ble_address("F0:0D:00:00:00:01"), timeout=0.05, client_factory=factory)
    with pytest.raises(DeviceUnreachable, match=r"no answer within 0\.05 s"):
        await driver.read()
    await driver.close()


async def test_link_loss_reconnects() -> None:
    _module, fake = make_module()
    driver = driver_for(fake)
    try:
        await driver.read()
        fake.drop_connections()  # bleak's disconnected callback fires
        await driver.read()
        assert fake.connections == 2
    finally:
        await driver.close()
        await driver.close()  # twice is safe


# ----------------------------------------------------------------------------------------------- credential


async def test_provision_then_only_the_credential_reads() -> None:
    module, fake = make_module(DeviceKind.SMARTPLUG)
    credential = generate_credential()
    driver = driver_for(fake)
    try:
        await driver.probe()
        assert driver.provisioned is False
        await driver.provision(credential, HUB)
        assert (fake.credential, fake.hub_id) == (credential, HUB)
        assert (await driver.read()).on is True  # this connection is logged in
        await driver.apply(Setpoint(on=False))
    finally:
        await driver.close()
    assert module.received[-1][0] == Setpoint(on=False)
    _device, adv = fake.advertisement()
    assert parse_advertisement(next(iter(adv.service_data.values()))).unprovisioned is False

    stranger = driver_for(fake)
    try:
        with pytest.raises(AuthenticationFailed, match="INSUFFICIENT_AUTHORIZATION"):
            await stranger.read()
        with pytest.raises(AuthenticationFailed, match="INSUFFICIENT_AUTHORIZATION"):
            await stranger.apply(Setpoint(on=True))
        assert (await stranger.probe()).identity.serial == "PLG-0001"  # identity stays open
        assert stranger.provisioned is True
        with pytest.raises(AuthenticationFailed, match="unauthorized"):
            await stranger.provision(generate_credential(), "another-hub")  # no takeover by a second hub
        stranger.set_credential(generate_credential())
        with pytest.raises(AuthenticationFailed, match="unauthorized"):
            await stranger.read()
    finally:
        await stranger.close()
    assert fake.credential == credential

    owner = driver_for(fake, credential=credential)
    try:
        assert (await owner.read()).power_w == -60.0
        rotated = generate_credential()
        await owner.provision(rotated, HUB)  # a logged-in hub may re-key
        assert fake.credential == rotated
        assert (await owner.read()).power_w == -60.0
    finally:
        await owner.close()


async def test_reprovision_needs_the_current_credential_and_deprovision() -> None:
    _module, fake = make_module()
    credential = generate_credential()
    first = driver_for(fake)
    await first.provision(credential, HUB)
    await first.close()
    fresh = driver_for(fake)  # knows nothing: refused, like ORES-HTTP without the bearer
    try:
        with pytest.raises(AuthenticationFailed, match="unauthorized"):
            await fresh.provision(credential, HUB)
        fresh.set_credential(credential)
        await fresh.provision(credential, HUB)  # with the current credential: a (no-op) re-key
    finally:
        await fresh.close()

    anonymous = driver_for(fake)
    try:
        with pytest.raises(AuthenticationFailed, match="unauthorized"):
            await anonymous.deprovision()
    finally:
        await anonymous.close()
    assert fake.provisioned
    owner = driver_for(fake, credential=credential)
    try:
        await owner.deprovision()
        assert owner.provisioned is False
    finally:
        await owner.close()
    assert fake.credential is None and not fake.provisioned
    late = driver_for(fake, credential=credential)  # an unprovisioned module ignores credentials
    try:
        await late.read()
        await late.deprovision()  # already unprovisioned: succeeds
    finally:
        await late.close()


async def test_malformed_credential_is_refused() -> None:
    _module, fake = make_module()
    driver = driver_for(fake)
    try:
        with pytest.raises(ValueError, match="printable ASCII"):
            await driver.provision("two words", HUB)
        assert fake.writes == []
        with pytest.raises(ProtocolError, match="bad_request"):  # the module wants base64 of 32 bytes
            await driver.provision("c2hvcnQ=", HUB)
    finally:
        await driver.close()
    assert not fake.provisioned


async def test_module_without_credential_characteristic() -> None:
    _module, fake = make_module()
    fake.absent.add(CREDENTIAL_CHAR_UUID)
    driver = driver_for(fake)
    try:
        with pytest.raises(NotSupported):
            await driver.provision(generate_credential(), HUB)
    finally:
        await driver.close()


# ----------------------------------------------------------------------------------------------- notifications


async def test_telemetry_notifications(caplog: pytest.LogCaptureFixture) -> None:
    module, fake = make_module(DeviceKind.ENERGYSTORAGE)
    driver = driver_for(fake)
    samples: list[Telemetry] = []
    try:
        await driver.start_telemetry(samples.append)
        assert fake.notify_telemetry() == 1
        assert [s.soc_pct for s in samples] == [55.5]
        # After a link loss the subscription is renewed on reconnection.
        fake.drop_connections()
        assert fake.notify_telemetry() == 0
        await driver.read()
        module.sample = Telemetry(ts=1.0, power_w=900.0, soc_pct=54.0)
        assert fake.notify_telemetry() == 1
        assert samples[-1].power_w == 900.0
        # A malformed notification is dropped with a warning.
        with caplog.at_level(logging.WARNING, logger="devices.drivers.ble"):
            driver._telemetry_notified(None, bytearray(b"\x01\x02"))  # type: ignore[arg-type]
        assert len(samples) == 2
        assert any("malformed telemetry notification" in r.getMessage() for r in caplog.records)
        await driver.stop_telemetry()
        assert fake.notify_telemetry() == 0
    finally:
        await driver.close()


async def test_telemetry_notifications_of_a_provisioned_module() -> None:
    module, fake = make_module(DeviceKind.MICROINVERTER)
    credential = generate_credential()
    owner = driver_for(fake)
    stranger = driver_for(fake)
    samples: list[Telemetry] = []
    try:
        await owner.provision(credential, HUB)
        await owner.start_telemetry(samples.append)
        with pytest.raises(AuthenticationFailed, match="INSUFFICIENT_AUTHORIZATION"):
            await stranger.start_telemetry(samples.append)  # subscribing is protected too
        assert fake.notify_telemetry() == 1
        fake.drop_connections()
        module.sample = Telemetry(ts=2.0, power_w=120.0)
        await owner.probe()  # any operation reconnects: the driver logs in again and renews the subscription
        assert fake.notify_telemetry() == 1
        assert [s.power_w for s in samples] == [351.5, 120.0]
    finally:
        await owner.close()
        await stranger.close()


# ----------------------------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("kind", list(KINDS))
async def test_authenticate_every_kind(kind: DeviceKind) -> None:
    info, _sample = KINDS[kind]
    _module, fake = make_module(kind, attestation=attestation_for(info))
    book = ChallengeBook()
    nonce = book.issue()
    driver = driver_for(fake)
    try:
        probed = await driver.probe()
        certificate, signature = await driver.authenticate(nonce, HUB)
    finally:
        await driver.close()
    book.consume(nonce)
    proven = verify_attestation(
        certificate,
        signature,
        nonce=nonce,
        hub_id=HUB,
        trusted=demo_trust(),
        claimed=(probed.identity.vendor, probed.identity.serial),
    )
    assert (proven.vendor, proven.serial) == (DEMO_VENDOR, info.identity.serial)


async def test_module_without_certificate_is_not_supported() -> None:
    _module, fake = make_module()
    driver = driver_for(fake)
    try:
        with pytest.raises(NotSupported, match="no such ORES characteristic"):
            await driver.authenticate(ChallengeBook().issue(), HUB)
    finally:
        await driver.close()


async def test_wrong_device_key_fails_verification(caplog: pytest.LogCaptureFixture) -> None:
    info, _ = KINDS[DeviceKind.MICROINVERTER]
    genuine = attestation_for(info, seed=b"genuine")
    thief = attestation_for(info, seed=b"thief")
    # A clone presents the genuine certificate but holds another device key.
    _module, fake = make_module(attestation=SimAttestation(thief.device_key, genuine.certificate))
    nonce = ChallengeBook().issue()
    driver = driver_for(fake)
    try:
        certificate, signature = await driver.authenticate(nonce, HUB)
    finally:
        await driver.close()
    with caplog.at_level(logging.WARNING, logger="devices.attest"), pytest.raises(BadSignature):
        verify_attestation(certificate, signature, nonce=nonce, hub_id=HUB, trusted=demo_trust())
    assert any("attestation refused" in r.getMessage() for r in caplog.records)


async def test_untrusted_vendor_and_mismatched_serial() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    info, _ = KINDS[DeviceKind.METER]
    rogue = make_sim_attestation(
        Ed25519PrivateKey.generate(), vendor=DEMO_VENDOR, model="x", serial=info.identity.serial
    )
    _module, fake = make_module(DeviceKind.METER, attestation=rogue)
    nonce = ChallengeBook().issue()
    driver = driver_for(fake)
    try:
        certificate, signature = await driver.authenticate(nonce, HUB)
    finally:
        await driver.close()
    with pytest.raises(UntrustedVendor):
        verify_attestation(certificate, signature, nonce=nonce, hub_id=HUB, trusted=demo_trust())

    other = attestation_for(KINDS[DeviceKind.SMARTPLUG][0])  # a certificate for another serial
    _module, fake = make_module(DeviceKind.METER, attestation=other)
    driver = driver_for(fake)
    try:
        probed = await driver.probe()
        certificate, signature = await driver.authenticate(nonce, HUB)
    finally:
        await driver.close()
    with pytest.raises(IdentityMismatch):
        verify_attestation(
            certificate,
            signature,
            nonce=nonce,
            hub_id=HUB,
            trusted=demo_trust(),
            claimed=(probed.identity.vendor, probed.identity.serial),
        )


async def test_replayed_answer_is_refused() -> None:
    info, _ = KINDS[DeviceKind.MICROINVERTER]
    attestation = attestation_for(info)
    _module, fake = make_module(attestation=attestation)
    old_nonce = ChallengeBook().issue()
    _cert, old_signature = attestation.respond(old_nonce, HUB)
    # A module (or a relay) that serves a recorded answer instead of signing the new nonce.
    fake.read_overrides[AUTH_CHAR_UUID] = encode_auth_answer(AuthAnswer(old_nonce, old_signature))
    driver = driver_for(fake)
    try:
        with pytest.raises(ProtocolError, match="another nonce"):
            await driver.authenticate(ChallengeBook().issue(), HUB)
    finally:
        await driver.close()


async def test_malformed_certificate_and_answer() -> None:
    info, _ = KINDS[DeviceKind.MICROINVERTER]
    _module, fake = make_module(attestation=attestation_for(info))
    fake.read_overrides[CERTIFICATE_CHAR_UUID] = json.dumps({"vendor": DEMO_VENDOR}).encode()
    driver = driver_for(fake)
    try:
        with pytest.raises(BadCertificate, match="missing field"):
            await driver.authenticate(ChallengeBook().issue(), HUB)
        assert issubclass(BadCertificate, AuthenticationFailed)
        del fake.read_overrides[CERTIFICATE_CHAR_UUID]
        short = base64.b64encode(b"\x00" * 10).decode()
        fake.read_overrides[AUTH_CHAR_UUID] = json.dumps({"nonce": short, "signature": short}).encode()
        with pytest.raises(ProtocolError, match=r"auth\.nonce"):
            await driver.authenticate(ChallengeBook().issue(), HUB)
    finally:
        await driver.close()


async def test_bad_challenge() -> None:
    info, _ = KINDS[DeviceKind.MICROINVERTER]
    _module, fake = make_module(attestation=attestation_for(info))
    driver = driver_for(fake)
    try:
        with pytest.raises(ValueError, match="nonce"):
            await driver.authenticate(b"short", HUB)  # refused before sending, as ORES-HTTP does
        assert fake.writes == []
    finally:
        await driver.close()
    # The module side refuses it too, in its status.
    client = fake.client_factory(fake.address)
    await client.connect()
    try:
        await client.write_gatt_char(
            AUTH_CHAR_UUID, b'{"seq": 7, "nonce": "c2hvcnQ=", "hub_id": "h"}', response=True
        )
        status = json.loads(await client.read_gatt_char(STATUS_CHAR_UUID))
    finally:
        await client.disconnect()
    assert status["seq"] == 7 and status["ok"] is False and status["code"] == "bad_request"
    assert "challenge.nonce" in status["message"]


# ----------------------------------------------------------------------------------------------- firmware


MI_INFO, MI_SAMPLE = KINDS[DeviceKind.MICROINVERTER]
MI_MODEL, MI_RUNNING = MI_INFO.identity.model, MI_INFO.identity.firmware_version
REBOOT_S = 3.0


def firmware_module(
    signer: Signer, clock: ManualClock, *, fail_versions: frozenset[str] = frozenset()
) -> tuple[SimFirmware, FakeGattModule]:
    firmware = SimFirmware(
        DEMO_VENDOR,
        MI_MODEL,
        MI_RUNNING,
        trusted=signer.trust(),
        reboot_s=REBOOT_S,
        clock=clock,
        fail_versions=fail_versions,
    )
    return firmware, FakeGattModule(StaticModule(MI_INFO, MI_SAMPLE), firmware=firmware)


def ble_release(signer: Signer, image: bytes, version: str, **kwargs: Any) -> tuple[bytes, bytes]:
    kwargs.setdefault("models", (MI_MODEL,))
    return signer.release(image, version, **kwargs)


def data_writes(fake: FakeGattModule) -> list[bytes]:
    return [data for uuid, data in fake.writes if uuid == FIRMWARE_DATA_CHAR_UUID]


async def test_firmware_update_over_ble() -> None:
    signer, clock = Signer.new(DEMO_VENDOR), ManualClock()
    firmware, fake = firmware_module(signer, clock)
    driver = driver_for(fake)
    assert isinstance(driver, FirmwareCapable)
    image = image_of(5000)
    try:
        assert await driver.firmware_status() == FirmwareSlots(MI_RUNNING, None, "idle", 0, None)
        assert await driver.firmware_begin(*ble_release(signer, image, "1.5.0")) == 0
        assert await driver.firmware_chunk(0, image[:2048]) == 2048
        assert (await driver.firmware_status()).received_bytes == 2048
        assert await driver.firmware_chunk(2048, image[2048:]) == 5000
        writes = data_writes(fake)
        assert max(len(w) for w in writes) == 244  # MTU 247: a 4-byte offset and 240 bytes
        assert b"".join(w[4:] for w in writes) == image
        assert [int.from_bytes(w[:4], "little") for w in writes[:3]] == [0, 240, 480]
        await driver.firmware_install()
        assert firmware.rebooting
        assert fake.connections == 1
        with pytest.raises(DeviceUnreachable):
            await driver.firmware_status()  # the module is gone while it reboots
        with pytest.raises(DeviceUnreachable):
            await driver.probe()
        clock.advance(REBOOT_S)
        assert (await driver.probe()).identity.firmware_version == "1.5.0"
        assert await driver.firmware_status() == FirmwareSlots("1.5.0", MI_RUNNING, "idle", 0, None)
        assert (await driver.read()).state is OperatingState.RUNNING
    finally:
        await driver.close()


async def test_an_established_link_drops_when_the_module_reboots() -> None:
    signer, clock = Signer.new(DEMO_VENDOR), ManualClock()
    firmware, fake = firmware_module(signer, clock)
    image = image_of(500)
    observer, updater = driver_for(fake), driver_for(fake)
    try:
        await observer.probe()
        await updater.firmware_begin(*ble_release(signer, image, "1.5.0"))
        await updater.firmware_chunk(0, image)
        await updater.firmware_install()
        assert firmware.rebooting
        with pytest.raises(DeviceUnreachable):
            await observer.read()
        assert fake.notify_telemetry() == 0
    finally:
        await observer.close()
        await updater.close()


async def test_interrupted_ble_transfer_resumes() -> None:
    signer, clock = Signer.new(DEMO_VENDOR), ManualClock()
    firmware, fake = firmware_module(signer, clock)
    image = image_of(3000)
    release = ble_release(signer, image, "1.5.0")
    first = driver_for(fake)
    try:
        await first.firmware_begin(*release)
        assert await first.firmware_chunk(0, image[:1500]) == 1500
    finally:
        await first.close()
    second = driver_for(fake)
    try:
        with pytest.raises(CommandRejected, match=r"wrong_offset.*resume at 1500"):
            await second.firmware_chunk(0, image[:100])
        assert await second.firmware_begin(*release) == 1500
        assert await second.firmware_chunk(1500, image[1500:]) == 3000
        await second.firmware_install()
    finally:
        await second.close()
    clock.advance(REBOOT_S)
    assert firmware.running_version == "1.5.0"


async def test_ble_module_refuses_with_its_reason() -> None:
    signer, clock = Signer.new(DEMO_VENDOR), ManualClock()
    firmware, fake = firmware_module(signer, clock)
    image = image_of(2000)
    driver = driver_for(fake)
    try:
        for release, code in (
            (ble_release(signer, image, "1.5.0", models=("Other",)), "wrong_model"),
            (ble_release(signer, image, "1.0.0"), "downgrade"),
            (ble_release(Signer.new(DEMO_VENDOR), image, "1.5.0"), "untrusted_key"),
            ((ble_release(signer, image, "1.5.0")[0], bytes(64)), "bad_signature"),
        ):
            with pytest.raises(CommandRejected, match=f"refused firmware begin: {code}"):
                await driver.firmware_begin(*release)
        tampered = bytearray(image)
        tampered[0] ^= 0xFF
        await driver.firmware_begin(*ble_release(signer, image, "1.5.0"))
        await driver.firmware_chunk(0, bytes(tampered))
        with pytest.raises(CommandRejected, match="refused firmware install: hash_mismatch"):
            await driver.firmware_install()
        assert not firmware.rebooting
        status = await driver.firmware_status()  # the link stays up: nothing rebooted
        assert (status.active_version, status.state) == (MI_RUNNING, "failed")
        assert (await driver.probe()).identity.firmware_version == MI_RUNNING
        with pytest.raises(CommandRejected, match="no_update"):
            await driver.firmware_chunk(0, image[:10])
        with pytest.raises(CommandRejected, match="no_previous"):
            await driver.firmware_rollback()
    finally:
        await driver.close()


async def test_unhealthy_ble_image_is_rolled_back() -> None:
    signer, clock = Signer.new(DEMO_VENDOR), ManualClock()
    _firmware, fake = firmware_module(signer, clock, fail_versions=frozenset({"2.0.0"}))
    image = image_of(1000)
    driver = driver_for(fake)
    try:
        await driver.firmware_begin(*ble_release(signer, image, "2.0.0"))
        await driver.firmware_chunk(0, image)
        await driver.firmware_install()
        clock.advance(REBOOT_S)
        assert (await driver.probe()).identity.firmware_version == "2.0.0"
        assert (await driver.read()).state is OperatingState.FAULT
        await driver.firmware_rollback()
        clock.advance(REBOOT_S)
        assert (await driver.probe()).identity.firmware_version == MI_RUNNING
        assert (await driver.read()).state is OperatingState.RUNNING
        assert await driver.firmware_status() == FirmwareSlots(MI_RUNNING, "2.0.0", "idle", 0, None)
    finally:
        await driver.close()


async def test_ble_firmware_access_and_write_size() -> None:
    signer, clock = Signer.new(DEMO_VENDOR), ManualClock()
    _firmware, fake = firmware_module(signer, clock)
    credential = generate_credential()
    fake.credential = credential
    stranger = driver_for(fake)
    owner = BleGattDriver(
        ble_address(fake.address),
        timeout=2.0,
        client_factory=fake.client_factory,
        credential=credential,
        firmware_write_bytes=100,
    )
    image = image_of(1000)
    try:
        with pytest.raises(AuthenticationFailed):
            await stranger.firmware_status()
        assert await owner.firmware_begin(*ble_release(signer, image, "1.5.0")) == 0
        assert await owner.firmware_chunk(0, image) == 1000
        assert max(len(w) for w in data_writes(fake)) == 104
    finally:
        await stranger.close()
        await owner.close()
    with pytest.raises(ValueError, match="firmware_write_bytes"):
        BleGattDriver(ble_address(fake.address), firmware_write_bytes=509)

    _module, plain = make_module()
    driver = driver_for(plain)
    try:
        with pytest.raises(NotSupported):
            await driver.firmware_status()
        with pytest.raises(NotSupported):
            await driver.firmware_begin(*ble_release(signer, image, "1.5.0"))
    finally:
        await driver.close()


async def test_malformed_firmware_requests_at_the_module() -> None:
    signer, clock = Signer.new(DEMO_VENDOR), ManualClock()
    _firmware, fake = firmware_module(signer, clock)
    client = fake.client_factory(fake.address)
    await client.connect()
    try:
        for value, code in (
            (b"{", "bad_request"),
            (b'{"op":"flash","seq":5}', "bad_request"),
            (b'{"op":"manifest","offset":10,"data":"AAAA","seq":6}', "wrong_offset"),
            (b'{"op":"begin","signature":"AAAA","seq":7}', "bad_signature"),
            (b'{"op":"install","seq":8}', "no_update"),
            (b'{"op":"status","seq":9}', ""),
        ):
            await client.write_gatt_char(FIRMWARE_CHAR_UUID, value, response=True)
            status = json.loads(await client.read_gatt_char(STATUS_CHAR_UUID))
            assert status.get("code", "") == code, value
        with pytest.raises(BleakError):
            await client.write_gatt_char(FIRMWARE_DATA_CHAR_UUID, b"\x00\x00", response=True)
    finally:
        await client.disconnect()
