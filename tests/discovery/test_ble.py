"""Tests of the BLE discovery source: bleak's real ``BLEDevice``/``AdvertisementData`` with real byte payloads
fed into ``BleScanner._on_advertisement`` (the scanner's own callback), rate limiting, ``gone`` with an
injected clock, malformed adverts (and a hypothesis fuzz of the parser), a flood of fake devices, and the real
``BleakScanner`` path on a machine without a Bluetooth adapter."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.attest import DEMO_VENDOR
from devices.ble_wire import (
    ADV_MAX_LEN,
    MAX_SERIAL_LEN,
    ORES_SERVICE_UUID,
    VENDOR_IDS,
    encode_advertisement,
    parse_advertisement,
)
from devices.drivers.ble_fake import make_advertisement
from devices.model import DeviceKind
from discovery.base import MalformedAnnouncement, Sighting, Source
from discovery.ble import BLE_PROTOCOL, BleScanner

DEADLINE_S = 10.0


class RecordingSink:
    """A ``SightingSink`` that records every call."""

    def __init__(self) -> None:
        self.sightings: list[Sighting] = []
        self.gones: list[tuple[Source, str, str]] = []
        self.rejections: list[tuple[Source, str, str]] = []

    def seen(self, sighting: Sighting) -> None:
        self.sightings.append(sighting)

    def gone(self, source: Source, key: str, reason: str) -> None:
        self.gones.append((source, key, reason))

    def rejected(self, source: Source, key: str, reason: str) -> None:
        self.rejections.append((source, key, reason))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rec() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def scanner(rec: RecordingSink, clock: Clock) -> BleScanner:
    return BleScanner(rec, clock=clock, report_interval_s=30.0, gone_after_s=60.0)


# ----------------------------------------------------------------------------------------------- valid adverts


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (DeviceKind.MICROINVERTER, 1),
        (DeviceKind.ENERGYSTORAGE, 2),
        (DeviceKind.METER, 3),
        (DeviceKind.SMARTPLUG, 4),
    ],
)
def test_valid_advert_is_seen_with_its_fields(
    scanner: BleScanner, rec: RecordingSink, kind: DeviceKind, code: int
) -> None:
    device, adv = make_advertisement(address="C4:DE:E2:01:02:03", kind=kind, serial="MI-42", rssi=-71)
    assert adv.service_data[ORES_SERVICE_UUID][1] == code  # the kind byte on the wire
    scanner._on_advertisement(device, adv)
    assert len(rec.sightings) == 1
    s = rec.sightings[0]
    assert s.source is Source.BLE
    assert s.key == "C4:DE:E2:01:02:03"
    assert s.ble_address == "C4:DE:E2:01:02:03"
    assert s.address is None
    assert s.protocol == BLE_PROTOCOL == "ble-gatt"
    assert s.kind is kind
    assert s.vendor == DEMO_VENDOR
    assert s.serial == "MI-42"
    assert s.unprovisioned is True
    assert s.rssi == -71
    assert s.raw["vendor_id"] == "0xffff"
    assert s.raw["local_name"] == "ORES module"
    assert s.claimed_id == "ores-demo-vendors_MI-42"
    assert rec.rejections == []


def test_provisioned_flag_and_unknown_vendor_and_kind(scanner: BleScanner, rec: RecordingSink) -> None:
    device, adv = make_advertisement(
        address="00:11:22:33:44:55", kind=9, vendor_id=0x1234, unprovisioned=False
    )
    scanner._on_advertisement(device, adv)
    (s,) = rec.sightings
    assert s.unprovisioned is False
    assert s.vendor == "vendor-0x1234"
    assert s.kind is DeviceKind.UNKNOWN  # tolerated (reported), not onboarded by the hub
    assert s.raw["kind"] == "9"


def test_demo_vendor_id_names_the_attestation_demo_vendor() -> None:
    assert VENDOR_IDS[0xFFFF] == DEMO_VENDOR


def test_advert_fits_the_documented_size() -> None:
    longest = encode_advertisement(kind=DeviceKind.METER, vendor_id=1, serial="X" * MAX_SERIAL_LEN)
    assert len(longest) <= ADV_MAX_LEN
    with pytest.raises(ValueError, match="serial"):
        encode_advertisement(kind=DeviceKind.METER, vendor_id=1, serial="X" * (MAX_SERIAL_LEN + 1))


def test_service_uuid_listed_without_service_data_is_ignored(scanner: BleScanner, rec: RecordingSink) -> None:
    device, adv = make_advertisement()
    adv = adv._replace(service_data={})  # legacy advertising: the scan response has not come yet
    scanner._on_advertisement(device, adv)
    assert rec.sightings == [] and rec.rejections == []


# ----------------------------------------------------------------------------------------------- rate limiting


def test_repeated_adverts_are_rate_limited(scanner: BleScanner, rec: RecordingSink, clock: Clock) -> None:
    for i in range(50):  # several a second, with a wandering RSSI
        clock.now += 0.2
        scanner._on_advertisement(*make_advertisement(rssi=-60 - i % 5))
    assert len(rec.sightings) == 1
    clock.now += 30.0
    scanner._on_advertisement(*make_advertisement())
    assert len(rec.sightings) == 2  # the periodic refresh


def test_changed_advert_is_reported_at_once(scanner: BleScanner, rec: RecordingSink, clock: Clock) -> None:
    scanner._on_advertisement(*make_advertisement(unprovisioned=True))
    clock.now += 0.1
    scanner._on_advertisement(*make_advertisement(unprovisioned=False))
    clock.now += 0.1
    scanner._on_advertisement(*make_advertisement(unprovisioned=False, local_name="renamed"))
    assert [s.unprovisioned for s in rec.sightings] == [True, False, False]
    assert rec.sightings[-1].raw["local_name"] == "renamed"


def test_two_devices_are_tracked_separately(scanner: BleScanner, rec: RecordingSink) -> None:
    scanner._on_advertisement(*make_advertisement(address="AA:AA:AA:AA:AA:01", serial="A"))
    scanner._on_advertisement(*make_advertisement(address="AA:AA:AA:AA:AA:02", serial="B"))
    scanner._on_advertisement(*make_advertisement(address="AA:AA:AA:AA:AA:01", serial="A"))
    assert [s.serial for s in rec.sightings] == ["A", "B"]
    assert scanner.tracked == {"AA:AA:AA:AA:AA:01", "AA:AA:AA:AA:AA:02"}


# ----------------------------------------------------------------------------------------------- gone


def test_device_is_gone_after_the_timeout(scanner: BleScanner, rec: RecordingSink, clock: Clock) -> None:
    scanner._on_advertisement(*make_advertisement(address="AA:AA:AA:AA:AA:01"))
    scanner._on_advertisement(*make_advertisement(address="AA:AA:AA:AA:AA:02"))
    clock.now += 20.0
    scanner._on_advertisement(*make_advertisement(address="AA:AA:AA:AA:AA:02"))  # heard again, not reported
    assert len(rec.sightings) == 2
    clock.now += 39.9
    assert scanner.expire() == []
    clock.now += 0.1  # device 01 silent for 60 s, device 02 for 40 s
    assert scanner.expire() == ["AA:AA:AA:AA:AA:01"]
    assert rec.gones == [(Source.BLE, "AA:AA:AA:AA:AA:01", "not heard for 60 s")]
    clock.now += 19.9
    assert scanner.expire() == []
    clock.now += 0.1
    assert scanner.expire() == ["AA:AA:AA:AA:AA:02"]
    assert scanner.tracked == frozenset()
    # Heard again after going: a new sighting.
    scanner._on_advertisement(*make_advertisement(address="AA:AA:AA:AA:AA:01"))
    assert len(rec.sightings) == 3


class GoneEventSink(RecordingSink):
    def __init__(self) -> None:
        super().__init__()
        self.gone_event = asyncio.Event()

    def gone(self, source: Source, key: str, reason: str) -> None:
        super().gone(source, key, reason)
        self.gone_event.set()


async def test_the_sweep_task_reports_gone(clock: Clock) -> None:
    sink = GoneEventSink()
    factory_calls: list[tuple[Callable[[BLEDevice, AdvertisementData], None], list[str]]] = []
    stopped: list[bool] = []

    class QuietScanner:
        def __init__(
            self, detection_callback: Callable[[BLEDevice, AdvertisementData], None], service_uuids: list[str]
        ) -> None:
            factory_calls.append((detection_callback, service_uuids))

        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            stopped.append(True)

    scanner = BleScanner(sink, scanner_factory=QuietScanner, clock=clock, sweep_interval_s=0.01)
    await scanner.start()
    try:
        assert scanner.running
        ((callback, uuids),) = factory_calls
        assert uuids == [ORES_SERVICE_UUID]
        callback(*make_advertisement())  # the scanner hands bleak its own callback
        assert len(sink.sightings) == 1
        clock.now += 61.0
        await asyncio.wait_for(sink.gone_event.wait(), DEADLINE_S)
        assert [g[1] for g in sink.gones] == ["F0:0D:00:00:00:01"]
    finally:
        await scanner.stop()
    assert stopped == [True]
    assert not scanner.running


# ----------------------------------------------------------------------------------------------- malformed

_HEADER = bytes([1, 1, 0, 0xFF, 0xFF])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "too short: 0 bytes"),
        (_HEADER + b"\x01", "too short: 6 bytes"),
        (_HEADER + bytes([22]) + b"A" * 22, "too long: 28 bytes"),
        (bytes([2, 1, 0, 0xFF, 0xFF, 3]) + b"SN1", "unsupported advertisement version 2"),
        (bytes([0, 1, 0, 0xFF, 0xFF, 3]) + b"SN1", "unsupported advertisement version 0"),
        (_HEADER + bytes([0]) + b"SN1", "bad serial length 0"),
        (_HEADER + bytes([21]) + b"A" * 20, "bad serial length 21"),
        (_HEADER + bytes([5]) + b"SN1", "bad serial length 5: 3 serial bytes"),
        (_HEADER + bytes([2]) + b"SN1", "bad serial length 2: 3 serial bytes"),
        (_HEADER + bytes([3]) + b"S\xc3\xa9", "non-ASCII byte 0xc3 at position 1"),
        (_HEADER + bytes([3]) + b"SN\x00", "non-printable byte 0x00 at position 2"),
        (_HEADER + bytes([3]) + b"\x7fSN", "non-printable byte 0x7f at position 0"),
        (_HEADER + bytes([4]) + b"SN1 ", "leading or trailing spaces"),
    ],
)
def test_malformed_advert_is_rejected_with_its_reason(
    scanner: BleScanner, rec: RecordingSink, caplog: pytest.LogCaptureFixture, payload: bytes, reason: str
) -> None:
    with pytest.raises(MalformedAnnouncement, match=reason):
        parse_advertisement(payload)
    with caplog.at_level(logging.INFO, logger="discovery.ble"):
        scanner._on_advertisement(*make_advertisement(address="BA:D0:00:00:00:01", service_data=payload))
    assert rec.sightings == []
    assert len(rec.rejections) == 1
    source, key, got = rec.rejections[0]
    assert (source, key) == (Source.BLE, "BA:D0:00:00:00:01")
    assert reason in got
    assert any("BA:D0:00:00:00:01" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_repeated_malformed_adverts_are_rate_limited(
    scanner: BleScanner, rec: RecordingSink, clock: Clock
) -> None:
    bad = make_advertisement(service_data=b"\x01")
    for _ in range(20):
        clock.now += 0.1
        scanner._on_advertisement(*bad)
    assert len(rec.rejections) == 1
    scanner._on_advertisement(*make_advertisement(service_data=b"\x09" * 8))  # a new reason: reported
    assert len(rec.rejections) == 2
    clock.now += 30.0
    scanner._on_advertisement(*make_advertisement(service_data=b"\x09" * 8))
    assert len(rec.rejections) == 3


def test_a_module_that_turns_malformed_is_rejected_then_gone(
    scanner: BleScanner, rec: RecordingSink, clock: Clock
) -> None:
    scanner._on_advertisement(*make_advertisement())
    clock.now += 1
    scanner._on_advertisement(*make_advertisement(service_data=b"\x01\x01"))
    assert len(rec.sightings) == 1 and len(rec.rejections) == 1
    clock.now += 60
    assert scanner.expire() == ["F0:0D:00:00:00:01"]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_parse_advertisement_only_raises_malformed(data: bytes) -> None:
    try:
        parsed = parse_advertisement(data)
    except MalformedAnnouncement as err:
        assert str(err)
        return
    # Whatever parses is a well-formed announcement that encodes back to the same bytes.
    assert 1 <= len(parsed.serial) <= MAX_SERIAL_LEN
    assert len(data) <= ADV_MAX_LEN
    extra = parsed.flags & ~1
    again = encode_advertisement(
        kind=parsed.kind_code,
        vendor_id=parsed.vendor_id,
        serial=parsed.serial,
        unprovisioned=parsed.unprovisioned,
        extra_flags=extra,
    )
    assert again == data


@settings(max_examples=200, deadline=None)
@given(
    kind=st.integers(0, 255),
    vendor_id=st.integers(0, 0xFFFF),
    serial=st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=MAX_SERIAL_LEN
    ),
    unprovisioned=st.booleans(),
)
def test_fuzz_round_trip(kind: int, vendor_id: int, serial: str, unprovisioned: bool) -> None:
    parsed = parse_advertisement(
        encode_advertisement(kind=kind, vendor_id=vendor_id, serial=serial, unprovisioned=unprovisioned)
    )
    assert (parsed.kind_code, parsed.vendor_id, parsed.serial, parsed.unprovisioned) == (
        kind,
        vendor_id,
        serial,
        unprovisioned,
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.text(max_size=30) | st.none())
def test_fuzz_the_callback_never_raises(data: bytes, name: str | None) -> None:
    rec = RecordingSink()
    scanner = BleScanner(rec, clock=Clock())
    scanner._on_advertisement(*make_advertisement(service_data=data, local_name=name))
    assert len(rec.sightings) + len(rec.rejections) == 1


def test_a_failing_sink_does_not_break_the_callback(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def seen(self, sighting: Sighting) -> None:
            raise RuntimeError("sink bug")

        def gone(self, source: Source, key: str, reason: str) -> None:
            raise RuntimeError("sink bug")

        def rejected(self, source: Source, key: str, reason: str) -> None:
            raise RuntimeError("sink bug")

    scanner = BleScanner(Broken(), clock=Clock())
    with caplog.at_level(logging.ERROR, logger="discovery.ble"):
        scanner._on_advertisement(*make_advertisement())
        scanner._on_advertisement(*make_advertisement(address="00:00:00:00:00:01", service_data=b""))
    assert sum("discovery sink failed" in r.getMessage() for r in caplog.records) == 2


def test_a_flood_of_fake_devices_is_bounded(
    rec: RecordingSink, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    scanner = BleScanner(rec, clock=clock, max_devices=100)
    scanner._on_advertisement(*make_advertisement(address="C0:FF:EE:00:00:01", serial="REAL-1"))
    with caplog.at_level(logging.WARNING, logger="discovery.ble"):
        for i in range(1000):
            mac = f"66:66:66:66:{i >> 8:02X}:{i & 0xFF:02X}"
            scanner._on_advertisement(*make_advertisement(address=mac, serial=f"FAKE-{i}"))
            scanner._on_advertisement(
                *make_advertisement(address=mac.replace("66", "77"), service_data=b"\x00")
            )
    assert len(rec.sightings) == 100
    assert len(scanner.tracked) == 100
    assert "C0:FF:EE:00:00:01" in scanner.tracked  # the flood did not displace a known device
    assert sum("ignoring new ones" in r.getMessage() for r in caplog.records) == 1
    # The real device keeps being heard; the silent fakes go, and a new device fits again.
    clock.now += 59
    scanner._on_advertisement(*make_advertisement(address="C0:FF:EE:00:00:01", serial="REAL-1"))
    clock.now += 1
    assert len(scanner.expire()) == 99
    assert scanner.tracked == {"C0:FF:EE:00:00:01"}
    scanner._on_advertisement(*make_advertisement(address="C0:FF:EE:00:00:02", serial="REAL-2"))
    assert rec.sightings[-1].serial == "REAL-2"


# ----------------------------------------------------------------------------------------------- real scanner


async def test_start_without_an_adapter_stays_inert(
    rec: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    scanner = BleScanner(rec)  # the real BleakScanner: this machine has no Bluetooth (or no D-Bus)
    with caplog.at_level(logging.WARNING, logger="discovery.ble"):
        await scanner.start()
        await scanner.start()
    try:
        if scanner.running:  # pragma: no cover - a machine with a working adapter
            pytest.skip("this machine has a working Bluetooth adapter")
        warnings = [r for r in caplog.records if "BLE discovery unavailable" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert scanner.unavailable_reason
        assert "TypeError" not in scanner.unavailable_reason  # bleak accepted our arguments
        # Inert, but the callback still works (nothing calls it without a radio).
        scanner._on_advertisement(*make_advertisement())
        assert len(rec.sightings) == 1
    finally:
        await scanner.stop()
        await scanner.stop()


async def test_real_bleak_scanner_backend_delivers_to_our_callback() -> None:
    # The real BleakScanner with our arguments (building it selects the platform backend without touching the
    # radio); its backend filters on the service UUID and calls the detection callbacks as on a real advert.
    rec = RecordingSink()
    scanner = BleScanner(rec)
    real = BleakScanner(detection_callback=scanner._on_advertisement, service_uuids=[ORES_SERVICE_UUID])
    backend = real._backend  # bleak's platform scanner
    device, adv = make_advertisement(serial="VIA-BLEAK")
    assert backend.is_allowed_uuid(adv.service_uuids)
    assert not backend.is_allowed_uuid(["0000180f-0000-1000-8000-00805f9b34fb"])
    backend.call_detection_callbacks(device, adv)
    assert [s.serial for s in rec.sightings] == ["VIA-BLEAK"]


async def test_start_failure_of_a_factory_is_a_warning(
    rec: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    class Exploding:
        def __init__(self, detection_callback: object, service_uuids: list[str]) -> None:
            raise RuntimeError("backend bug")

        async def start(self) -> None:  # pragma: no cover
            pass

        async def stop(self) -> None:  # pragma: no cover
            pass

    scanner = BleScanner(rec, scanner_factory=Exploding)
    with caplog.at_level(logging.WARNING, logger="discovery.ble"):
        await scanner.start()
    assert not scanner.running
    assert "backend bug" in (scanner.unavailable_reason or "")
    await scanner.stop()
