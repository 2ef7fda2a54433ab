"""Tests of discovery.mdns: TXT validation, the browser against real announcements, the hub advertisement.

Network tests use real python-zeroconf instances on 127.0.0.1 (one for the modules, one for the hub), real
ORES-HTTP and SunSpec simulator endpoints, and a random service type per test.  They wait on the recording
sink's event with a deadline, never on sleeps.  The flood test registers 1,000 real services in one
zeroconf instance and lets them reach the browser over the network.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zeroconf import ServiceInfo, ServiceStateChange
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from devices.drivers import load_builtin_drivers, probe_address
from devices.drivers.base import Address
from devices.model import Capabilities, DeviceInfo, DeviceKind, Identity
from devices.sim.announce import ModuleAnnouncer
from devices.sim.base import StaticModule
from devices.sim.ores_http_server import start_ores_http_server
from devices.sim.sunspec_server import start_sunspec_server
from discovery.base import DiscoveryError, MalformedAnnouncement, Source
from discovery.mdns import (
    HUB_SERVICE_TYPE,
    MODULE_SERVICE_TYPE,
    HubAdvertiser,
    MdnsBrowser,
    ascii_text,
    hub_txt,
    instance_name,
    module_txt,
    parse_hub_txt,
    parse_txt,
    sighting_from_service,
)
from tests.discovery._mdns_support import (
    RawWatcher,
    RecordingSink,
    loopback_zeroconf,
    poll_until,
    unique_service_type,
)

INVERTER = DeviceInfo(
    DeviceKind.MICROINVERTER,
    Identity("Acme Solar", "MI-400", "MI-0001", "1.2.3"),
    Capabilities(rated_power_w=400.0),
)
METER = DeviceInfo(DeviceKind.METER, Identity("Gridwise", "GM-3", "GM-77", "0.9"))

VALID: dict[bytes, bytes | None] = {
    b"pv": b"1.0",
    b"kind": b"microinverter",
    b"vendor": b"Acme Solar",
    b"model": b"MI-400",
    b"serial": b"MI-0001",
    b"tp": b"ores-http",
    b"prov": b"0",
}


def props(**changes: bytes | None) -> dict[bytes, bytes | None]:
    """VALID with keys replaced (value ``b"<del>"`` removes the key)."""
    result = dict(VALID)
    for key, value in changes.items():
        if value == b"<del>":
            result.pop(key.encode(), None)
        else:
            result[key.encode()] = value
    return result


class FakeClock:
    """A monotonic clock the test moves by hand (for the browser's token bucket)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------------------------- parse_txt


def test_parse_txt_accepts_a_valid_record_and_fills_defaults() -> None:
    result = parse_txt(VALID)
    assert result == {
        "pv": "1.0",
        "kind": "microinverter",
        "vendor": "Acme Solar",
        "model": "MI-400",
        "serial": "MI-0001",
        "tp": "ores-http",
        "path": "/ores/v1",
        "unit": "1",
        "prov": "0",
    }


def test_parse_txt_keys_are_case_insensitive_first_wins_unknown_kept() -> None:
    raw = {
        b"PV": b"1.3",
        b"Kind": b"meter",
        b"kind": b"toaster",  # a second occurrence of KIND: ignored (RFC 6763 6.4)
        b"vendor": b"  Gridwise ",
        b"model": b"GM-3",
        b"serial": b"GM-77",
        b"tp": b"sunspec-modbus",
        b"unit": b"007",
        b"path": b"/api/",
        b"fw": b"2.1",
        b"beta": None,
        b"": None,  # an empty TXT string
    }
    result = parse_txt(raw)
    assert result["pv"] == "1.3"
    assert result["kind"] == "meter"
    assert result["vendor"] == "Gridwise"
    assert result["unit"] == "7"
    assert result["path"] == "/api"
    assert result["fw"] == "2.1"
    assert result["beta"] == ""
    assert result["prov"] == "0"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (props(kind=b"toaster"), "unknown kind 'toaster'"),
        (props(kind=b"<del>"), "missing kind"),
        (props(serial=b"<del>"), "missing serial"),
        (props(serial=b"  "), "empty serial"),
        (props(serial=None), "serial has no value"),
        (props(serial=b"S" * 33), "serial is too long (33 > 32 chars)"),
        (props(vendor=b"V" * 65), "value of 'vendor' is too long (65 > 64 chars)"),
        (props(model=b"M" * 200), "value of 'model' is too long"),
        (props(vendor="Acmé".encode()), "value of 'vendor' 'Acm\\xc3\\xa9' is not printable ASCII"),
        (props(serial=b"SN\x00"), "is not printable ASCII"),
        (props(tp=b"coap"), "unknown transport 'coap'"),
        (props(tp=b"sunspec-modbus", unit=b"300"), "Modbus unit '300' is not an integer 0..247"),
        (props(tp=b"sunspec-modbus", unit=b"abc"), "Modbus unit 'abc'"),
        (props(tp=b"sunspec-modbus", unit=b"-1"), "Modbus unit '-1'"),
        (props(tp=b"sunspec-modbus", unit=b""), "Modbus unit ''"),
        (props(pv=b"2.0"), "unsupported protocol version '2.0'"),
        (props(pv=b"one"), "protocol version 'one' is not MAJOR.MINOR"),
        (props(prov=b"yes"), "prov 'yes' is not 0 or 1"),
        (props(path=b"ores/v1"), "path 'ores/v1' is not an absolute URL path"),
        (props(path=b"/a b"), "is not an absolute URL path"),
        (props(path=b"//evil.example/x"), "is not an absolute URL path"),
        ({**VALID, b"k" * 300: None}, "is 300 bytes (max 255)"),
        ({**VALID, **{f"x{i:02d}".encode(): b"v" * 60 for i in range(25)}}, "TXT record is over 1300 bytes"),
        ({**VALID, "caf\u00e9".encode(): b"1"}, "TXT key 'caf\\xc3\\xa9' is not printable ASCII"),
    ],
)
def test_parse_txt_rejects_with_a_precise_reason(raw: dict[bytes, bytes | None], reason: str) -> None:
    with pytest.raises(MalformedAnnouncement) as caught:
        parse_txt(raw)
    assert reason in str(caught.value)


def test_parse_txt_rejects_non_bytes() -> None:
    with pytest.raises(MalformedAnnouncement, match="must be bytes"):
        parse_txt({"pv": "1.0"})  # type: ignore[dict-item]
    with pytest.raises(MalformedAnnouncement, match="not a key/value mapping"):
        parse_txt([(b"pv", b"1.0")])  # type: ignore[arg-type]


def test_module_txt_round_trips_and_refuses_what_it_cannot_announce() -> None:
    txt = module_txt(
        kind=DeviceKind.METER,
        vendor="Gridwise",
        model="GM-3",
        serial="GM-77",
        transport="sunspec-modbus",
        unit=4,
    )
    assert txt == {
        "pv": "1.0",
        "kind": "meter",
        "vendor": "Gridwise",
        "model": "GM-3",
        "serial": "GM-77",
        "tp": "sunspec-modbus",
        "unit": "4",
    }
    assert parse_txt({k.encode(): v.encode() for k, v in txt.items()})["unit"] == "4"
    with pytest.raises(ValueError, match="serial is too long"):
        module_txt(kind="meter", vendor="V", model="M", serial="S" * 40, transport="ores-http")
    with pytest.raises(ValueError, match="not printable ASCII"):
        module_txt(kind="meter", vendor="Sûr", model="M", serial="S", transport="ores-http")


def test_names_and_hub_txt_are_folded_to_ascii() -> None:
    assert instance_name("Acme Solar", "SN 001/A") == "Acme-Solar-SN-001-A"
    assert instance_name("Ünïcode GmbH", "42") == "Unicode-GmbH-42"
    assert instance_name("", "") == "ores-module"
    assert len(instance_name("V" * 50, "S" * 32)) == 63
    assert ascii_text("Maison Sévérine ☀") == "Maison Severine ?"
    txt = hub_txt(hub_id="hub-1", name="Chez Zoë " + "x" * 100, pairing_open=True)
    assert txt["name"] == ("Chez Zoe " + "x" * 100)[:64]
    assert txt["pair"] == "1"
    assert parse_hub_txt({k.encode(): v.encode() for k, v in txt.items()}) == txt
    with pytest.raises(MalformedAnnouncement, match="pair '2'"):
        parse_hub_txt({b"pv": b"1.0", b"api": b"/", b"id": b"h", b"pair": b"2"})
    with pytest.raises(MalformedAnnouncement, match="missing id"):
        parse_hub_txt({b"pv": b"1.0", b"api": b"/"})


# ------------------------------------------------------------------------------------------------ fuzzing

_KNOWN_KEYS = [
    b"pv",
    b"kind",
    b"vendor",
    b"model",
    b"serial",
    b"tp",
    b"path",
    b"unit",
    b"prov",
    b"PV",
    b"Kind",
]
_GOOD_VALUES = [
    b"1.0",
    b"1.12",
    b"2.0",
    b"microinverter",
    b"meter",
    b"smartplug",
    b"energystorage",
    b"ores-http",
    b"sunspec-modbus",
    b"/ores/v1",
    b"0",
    b"1",
    b"247",
    b"248",
    b"Acme",
    b"",
]
_keys = st.sampled_from(_KNOWN_KEYS) | st.binary(max_size=12)
_values = (
    st.none() | st.sampled_from(_GOOD_VALUES) | st.binary(max_size=80) | st.text(max_size=70).map(str.encode)
)
_PRINTABLE = re.compile(r"[ -~]*")


def _assert_valid_module_fields(result: Mapping[str, str]) -> None:
    for key, value in result.items():
        assert _PRINTABLE.fullmatch(key) and _PRINTABLE.fullmatch(value), (key, value)
        assert len(value) <= 64
    assert re.fullmatch(r"1\.[0-9]{1,3}", result["pv"])
    assert result["kind"] in {"microinverter", "energystorage", "meter", "smartplug"}
    for key in ("vendor", "model", "serial"):
        assert result[key] and result[key] == result[key].strip()
    assert len(result["serial"]) <= 32
    assert result["tp"] in {"ores-http", "sunspec-modbus"}
    assert result["path"].startswith("/") and " " not in result["path"]
    assert 0 <= int(result["unit"]) <= 247
    assert result["prov"] in {"0", "1"}
    # what the browser builds from it is a valid address
    Address.parse(str(Address("http", "192.0.2.1", 80, result["path"])))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=16))
def test_fuzz_parse_txt_arbitrary_dicts(raw: dict[bytes, bytes | None]) -> None:
    try:
        result = parse_txt(raw)
    except MalformedAnnouncement:
        return
    _assert_valid_module_fields(result)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=4))
def test_fuzz_parse_txt_mutated_valid_records(changes: dict[bytes, bytes | None]) -> None:
    try:
        result = parse_txt({**VALID, **changes})
    except MalformedAnnouncement:
        return
    _assert_valid_module_fields(result)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from([b"pv", b"api", b"id", b"name", b"pair"]) | _keys, _values, max_size=8)
)
def test_fuzz_parse_hub_txt(raw: dict[bytes, bytes | None]) -> None:
    try:
        result = parse_hub_txt(raw)
    except MalformedAnnouncement:
        return
    assert result["pair"] in {"0", "1"} and result["api"].startswith("/") and result["id"]


# ---------------------------------------------------------------------------------- sighting_from_service

SVC = "_ores._tcp.local."


def _info(
    properties: Mapping[bytes, bytes | None] = VALID,
    *,
    port: int | None = 8080,
    addresses: list[str] | None = None,
    interface_index: int | None = None,
) -> ServiceInfo:
    return ServiceInfo(
        SVC,
        f"Acme-Solar-MI-0001.{SVC}",
        port=port,
        properties=dict(properties),
        server="acme.local.",
        parsed_addresses=["127.0.0.1"] if addresses is None else addresses,
        interface_index=interface_index,
    )


def test_sighting_from_service_ores_http() -> None:
    sighting = sighting_from_service(_info(props(path=b"/v2/", prov=b"1")))
    assert sighting.source is Source.MDNS
    assert sighting.key == f"Acme-Solar-MI-0001.{SVC}"
    assert sighting.kind is DeviceKind.MICROINVERTER
    assert (sighting.vendor, sighting.model, sighting.serial) == ("Acme Solar", "MI-400", "MI-0001")
    assert sighting.protocol == "ores-http"
    assert sighting.address == Address("http", "127.0.0.1", 8080, "/v2")
    assert sighting.unprovisioned is False
    assert sighting.claimed_id == "acme-solar_MI-0001"
    assert sighting.raw["path"] == "/v2"


def test_sighting_from_service_prefers_ipv4_then_global_ipv6() -> None:
    info = _info(
        props(tp=b"sunspec-modbus", unit=b"3"), port=1502, addresses=["fe80::1", "2001:db8::5", "10.0.0.7"]
    )
    sighting = sighting_from_service(info, key="k")
    assert sighting.key == "k"
    assert sighting.address == Address("modbus", "10.0.0.7", 1502, "", 3)
    assert str(sighting_from_service(_info(addresses=["fe80::1", "2001:db8::5"])).address) == (
        "http://[2001:db8::5]:8080/ores/v1"
    )
    scoped = sighting_from_service(_info(addresses=["fe80::1"], interface_index=2))
    assert scoped.address is not None and scoped.address.host == "fe80::1%2"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"port": 0}, "port 0 is not 1..65535"),
        ({"port": None}, "no SRV record"),
        ({"addresses": []}, "no address record"),
        ({"addresses": ["0.0.0.0", "224.0.0.251", "255.255.255.255"]}, "no usable address (got 0.0.0.0"),
        ({"addresses": ["fe80::1"]}, "no usable address"),  # link-local without its interface
    ],
)
def test_sighting_from_service_rejects(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(MalformedAnnouncement) as caught:
        sighting_from_service(_info(**kwargs))  # type: ignore[arg-type]
    assert reason in str(caught.value)


def test_default_service_types() -> None:
    assert MODULE_SERVICE_TYPE == "_ores._tcp.local."
    assert HUB_SERVICE_TYPE == "_ores-hub._tcp.local."


# -------------------------------------------------------------------------------------- over the network


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exit_stack:
        yield exit_stack


@pytest.fixture
async def module_zc(stack: AsyncExitStack) -> AsyncZeroconf:
    return await stack.enter_async_context(loopback_zeroconf())


@pytest.fixture
async def hub_zc(stack: AsyncExitStack) -> AsyncZeroconf:
    return await stack.enter_async_context(loopback_zeroconf())


@pytest.fixture
def stype() -> str:
    return unique_service_type()


async def _browse(
    stack: AsyncExitStack, hub_zc: AsyncZeroconf, stype: str, **kwargs: object
) -> tuple[MdnsBrowser, RecordingSink]:
    sink = RecordingSink()
    browser = MdnsBrowser(sink, zeroconf=hub_zc, service_type=stype, **kwargs)  # type: ignore[arg-type]
    await browser.start()
    stack.push_async_callback(browser.stop)
    return browser, sink


async def test_ores_http_module_announced_is_seen_and_reachable(
    stack: AsyncExitStack, module_zc: AsyncZeroconf, hub_zc: AsyncZeroconf, stype: str
) -> None:
    server = await start_ores_http_server(StaticModule(info=INVERTER))
    stack.push_async_callback(server.stop)
    _, sink = await _browse(stack, hub_zc, stype)
    announcer = ModuleAnnouncer(server, zeroconf=module_zc, service_type=stype)  # probes for its name
    await announcer.start()
    stack.push_async_callback(announcer.stop)

    found = await sink.wait_for(lambda: sink.seen_for(announcer.name), "the module's sighting")
    sighting = found[0]
    assert announcer.name == f"Acme-Solar-MI-0001.{stype}"
    assert sighting.kind is DeviceKind.MICROINVERTER
    assert (sighting.vendor, sighting.model, sighting.serial) == ("Acme Solar", "MI-400", "MI-0001")
    assert sighting.protocol == "ores-http"
    assert sighting.protocol_version == "1.0"
    assert sighting.unprovisioned is True
    assert sighting.address == server.address
    assert sighting.raw == {**announcer.txt, "unit": "1"}
    assert not sink.rejections

    load_builtin_drivers()
    driver, info = await probe_address(sighting.address, protocol=sighting.protocol)
    await driver.close()
    assert info.device_id == sighting.claimed_id


async def test_sunspec_module_announced_is_seen_with_its_unit(
    stack: AsyncExitStack, module_zc: AsyncZeroconf, hub_zc: AsyncZeroconf, stype: str
) -> None:
    server = await start_sunspec_server(StaticModule(info=METER), unit=3)
    stack.push_async_callback(server.stop)
    _, sink = await _browse(stack, hub_zc, stype)
    announcer = ModuleAnnouncer(server, zeroconf=module_zc, service_type=stype, probe=False)
    await announcer.start()
    stack.push_async_callback(announcer.stop)

    sighting = (await sink.wait_for(lambda: sink.seen_for(announcer.name), "the meter's sighting"))[0]
    assert sighting.protocol == "sunspec-modbus"
    assert sighting.kind is DeviceKind.METER
    assert sighting.address == Address("modbus", "127.0.0.1", server.address.port, "", 3)
    assert sighting.address == server.address

    load_builtin_drivers()
    driver, info = await probe_address(sighting.address, protocol="sunspec-modbus")
    await driver.close()
    assert info.kind is DeviceKind.METER  # the hub identifies a SunSpec module from model 1, not the TXT


async def test_goodbye_reports_gone(
    stack: AsyncExitStack, module_zc: AsyncZeroconf, hub_zc: AsyncZeroconf, stype: str
) -> None:
    server = await start_ores_http_server(StaticModule(info=INVERTER))
    stack.push_async_callback(server.stop)
    browser, sink = await _browse(stack, hub_zc, stype)
    announcer = ModuleAnnouncer(server, zeroconf=module_zc, service_type=stype, probe=False)
    await announcer.start()
    name = announcer.name
    await sink.wait_for(lambda: sink.seen_for(name), "the sighting")

    await announcer.stop()
    await sink.wait_for(lambda: name in sink.gone_keys(), "the goodbye")
    assert sink.gones == [(Source.MDNS, name, "mDNS announcement ended (goodbye or TTL expired)")]
    assert browser.stats.gone == 1


async def test_updated_txt_is_seen_again(
    stack: AsyncExitStack, module_zc: AsyncZeroconf, hub_zc: AsyncZeroconf, stype: str
) -> None:
    server = await start_ores_http_server(StaticModule(info=INVERTER))
    stack.push_async_callback(server.stop)
    _, sink = await _browse(stack, hub_zc, stype)
    announcer = ModuleAnnouncer(server, zeroconf=module_zc, service_type=stype, probe=False)
    await announcer.start()
    stack.push_async_callback(announcer.stop)
    first = (await sink.wait_for(lambda: sink.seen_for(announcer.name), "the first sighting"))[0]
    assert first.unprovisioned is True

    await announcer.set_provisioned(True)
    later = await sink.wait_for(
        lambda: [s for s in sink.seen_for(announcer.name) if not s.unprovisioned], "the provisioned sighting"
    )
    assert later[0].raw["prov"] == "1"
    assert later[0].address == first.address


async def test_rescan_and_a_late_browser_report_known_services_again(
    stack: AsyncExitStack, module_zc: AsyncZeroconf, hub_zc: AsyncZeroconf, stype: str
) -> None:
    server = await start_ores_http_server(StaticModule(info=INVERTER))
    stack.push_async_callback(server.stop)
    browser, sink = await _browse(stack, hub_zc, stype)
    announcer = ModuleAnnouncer(server, zeroconf=module_zc, service_type=stype, probe=False)
    await announcer.start()
    stack.push_async_callback(announcer.stop)
    await sink.wait_for(lambda: sink.seen_for(announcer.name), "the sighting")
    await browser.drain()
    before = len(sink.seen_for(announcer.name))

    await browser.rescan()
    await sink.wait_for(lambda: len(sink.seen_for(announcer.name)) > before, "the sighting after a rescan")

    # a second browser on the same (warm) zeroconf instance hears the cached service at once
    _, late_sink = await _browse(stack, hub_zc, stype)
    await late_sink.wait_for(lambda: late_sink.seen_for(announcer.name), "the cached service")


async def test_hub_advertisement_is_browsable_and_updates(
    stack: AsyncExitStack, module_zc: AsyncZeroconf, hub_zc: AsyncZeroconf
) -> None:
    htype = unique_service_type("oreshub")
    watcher = RawWatcher(module_zc, htype)  # a module looking for its hub
    stack.push_async_callback(watcher.close)
    advertiser = HubAdvertiser(
        zeroconf=hub_zc,
        hub_id="hub-4f2a",
        name="Maison Sévérine",
        port=8080,
        addresses=["127.0.0.1"],
        service_type=htype,
        probe=False,
    )
    await advertiser.start()
    stack.push_async_callback(advertiser.stop)
    name = advertiser.service_name
    assert name == f"ores-hub-hub-4f2a.{htype}"
    await watcher.wait_for(lambda: watcher.count(name, ServiceStateChange.Added), "the hub's service")

    info = AsyncServiceInfo(htype, name)
    assert await info.async_request(module_zc.zeroconf, 3000)
    assert info.port == 8080
    assert info.parsed_addresses() == ["127.0.0.1"]
    assert parse_hub_txt(info.properties) == {
        "pv": "1.0",
        "api": "/",
        "id": "hub-4f2a",
        "name": "Maison Severine",
        "pair": "0",
    }

    await advertiser.update(name="Solar Barn", pairing_open=True)
    await watcher.wait_for(lambda: watcher.count(name, ServiceStateChange.Updated), "the TXT update")
    info = AsyncServiceInfo(htype, name)
    assert await info.async_request(module_zc.zeroconf, 3000)
    txt = parse_hub_txt(info.properties)
    assert (txt["pair"], txt["name"]) == ("1", "Solar Barn")

    await advertiser.stop()
    await watcher.wait_for(lambda: watcher.count(name, ServiceStateChange.Removed), "the hub's goodbye")


async def _register_raw(
    zc: AsyncZeroconf,
    stype: str,
    instance: str,
    properties: Mapping[bytes, bytes | None],
    *,
    port: int = 8080,
    addresses: list[str] | None = None,
) -> str:
    """Register a hand-made service (no name probing): what a buggy or hostile module could announce."""
    info = ServiceInfo(
        stype,
        f"{instance}.{stype}",
        port=port,
        properties=dict(properties),
        server=f"{instance}.local.",
        parsed_addresses=addresses,
    )
    await zc.async_register_service(info, cooperating_responders=True)
    return info.name


async def test_malformed_announcements_are_rejected_with_a_logged_reason(
    stack: AsyncExitStack,
    module_zc: AsyncZeroconf,
    hub_zc: AsyncZeroconf,
    stype: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="discovery.mdns")
    _, sink = await _browse(stack, hub_zc, stype, resolve_timeout_s=0.5)
    lo = ["127.0.0.1"]
    huge = {**VALID, **{f"x{i:02d}".encode(): b"v" * 60 for i in range(25)}}
    cases: dict[str, tuple[dict[bytes, bytes | None], int, list[str] | None, str]] = {
        "unknown-kind": (props(kind=b"toaster"), 8080, lo, "unknown kind 'toaster'"),
        "oversized": (props(vendor=b"V" * 200), 8080, lo, "value of 'vendor' is too long (200 > 64 chars)"),
        "non-ascii": (props(vendor="Acmé".encode()), 8080, lo, "is not printable ASCII"),
        "no-serial": (props(serial=b"<del>"), 8080, lo, "missing serial"),
        "bad-unit": (props(tp=b"sunspec-modbus", unit=b"300"), 8080, lo, "Modbus unit '300'"),
        "huge-txt": (huge, 8080, lo, "TXT record is over 1300 bytes"),
        "port-zero": (VALID, 0, lo, "port 0 is not 1..65535"),
        "no-address": (VALID, 8080, None, "no address record"),
    }
    names = {
        case: await _register_raw(module_zc, stype, case, raw, port=port, addresses=addresses)
        for case, (raw, port, addresses, _) in cases.items()
    }
    await sink.wait_for(lambda: all(sink.rejection_for(n) for n in names.values()), "every rejection")
    for case, (_, _, _, reason) in cases.items():
        got = sink.rejection_for(names[case])
        assert got is not None and reason in got, (case, got)
        assert any(names[case] in r.getMessage() and reason in r.getMessage() for r in caplog.records), case
    assert not sink.sightings


async def test_shared_zeroconf_is_not_closed_and_own_one_is(hub_zc: AsyncZeroconf) -> None:
    with pytest.raises(ValueError, match="not both"):
        MdnsBrowser(RecordingSink(), zeroconf=hub_zc, interfaces=["127.0.0.1"])

    shared = MdnsBrowser(RecordingSink(), zeroconf=hub_zc, service_type=unique_service_type())
    await shared.start()
    await shared.stop()
    assert not hub_zc.zeroconf.done

    own = MdnsBrowser(RecordingSink(), interfaces=["127.0.0.1"], service_type=unique_service_type())
    await own.start()
    opened = own.zeroconf
    assert own.running
    await own.stop()
    await own.stop()  # idempotent
    assert opened.zeroconf.done
    with pytest.raises(DiscoveryError, match="not started"):
        await own.rescan()


class _InFlightSink(RecordingSink):
    """Records how many resolutions were running whenever a report arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.browser: MdnsBrowser | None = None
        self.in_flight: list[int] = []

    def rejected(self, source: Source, key: str, reason: str) -> None:
        assert self.browser is not None
        self.in_flight.append(self.browser.stats.in_flight)
        super().rejected(source, key, reason)


async def test_pending_queue_is_bounded_when_fed_directly(
    stack: AsyncExitStack, hub_zc: AsyncZeroconf, stype: str, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 Added events in one loop iteration through the real handler signature (as one large response
    would deliver them): only ``max_pending`` are resolved, at most ``max_concurrent`` at a time, the rest
    are dropped and the flood is logged once."""
    caplog.set_level(logging.WARNING, logger="discovery.mdns")
    sink = _InFlightSink()
    browser = MdnsBrowser(
        sink,
        zeroconf=hub_zc,
        service_type=stype,
        max_pending=8,
        max_concurrent=4,
        burst=100_000,
        resolve_timeout_s=0.25,
    )
    sink.browser = browser
    await browser.start()
    stack.push_async_callback(browser.stop)

    for i in range(1000):
        browser.on_service_state_change(
            zeroconf=hub_zc.zeroconf,
            service_type=stype,
            name=f"fake-{i}.{stype}",
            state_change=ServiceStateChange.Added,
        )
    stats = browser.stats
    assert (stats.admitted, stats.dropped, stats.pending) == (8, 992, 8)

    await browser.drain()
    assert len(sink.rejections) == 8  # nobody answers for these names
    assert all("no complete answer within 0.25 s" in reason for _, _, reason in sink.rejections)
    assert 1 <= max(sink.in_flight) <= 4
    assert len([r for r in caplog.records if "dropping announcements" in r.getMessage()]) == 1
    await browser.stop()
    assert any("flood over, 992 announcements dropped" in r.getMessage() for r in caplog.records)


async def test_flood_of_1000_real_announcements(
    stack: AsyncExitStack,
    module_zc: AsyncZeroconf,
    hub_zc: AsyncZeroconf,
    stype: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1,000 valid-looking fake modules registered for real (one zeroconf instance, batches of 100, no name
    probing) reach the browser over the loopback while a 10 ms heartbeat measures the event loop; the flood
    guard lets only ``burst`` resolutions through (the test's clock stands still), the rest are dropped.
    After the flood ends a new module is discovered normally."""
    caplog.set_level(logging.WARNING, logger="discovery.mdns")
    clock = FakeClock()
    burst = 64
    browser, sink = await _browse(stack, hub_zc, stype, burst=burst, clock=clock)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    worst_gap = 0.0

    async def heartbeat() -> None:
        nonlocal worst_gap
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = loop.time()
            worst_gap = max(worst_gap, now - last)
            last = now

    ticker = asyncio.create_task(heartbeat())
    try:
        infos = [
            ServiceInfo(
                stype,
                f"fake-{i:04d}.{stype}",
                port=10000 + i,
                properties={**VALID, b"serial": f"FAKE-{i:04d}".encode()},
                server=f"fake-{i:04d}.local.",
                parsed_addresses=["127.0.0.1"],
            )
            for i in range(1000)
        ]
        announcements = []
        for start in range(0, len(infos), 100):
            announcements += await asyncio.gather(
                *(
                    module_zc.async_register_service(info, cooperating_responders=True)
                    for info in infos[start : start + 100]
                )
            )
        await asyncio.gather(*announcements)
        await poll_until(
            lambda: browser.stats.admitted == burst and browser.stats.dropped >= 1000 - burst,
            "the flood to reach the browser",
            timeout=30.0,
        )
        await browser.drain()
    finally:
        done.set()
        await ticker

    assert worst_gap < 0.5, f"the event loop stalled for {worst_gap:.3f} s"
    assert len(sink.sightings) + len(sink.rejections) == burst  # every resolution costs a token
    assert len([r for r in caplog.records if "dropping announcements" in r.getMessage()]) == 1

    # the flood ends (its goodbyes are best effort: mDNS is lossy), time passes, a real module is heard
    await module_zc.async_unregister_all_services()
    clock.now += 3600
    server = await start_ores_http_server(StaticModule(info=INVERTER))
    stack.push_async_callback(server.stop)
    announcer = ModuleAnnouncer(server, zeroconf=module_zc, service_type=stype, probe=False)
    await announcer.start()
    stack.push_async_callback(announcer.stop)
    await sink.wait_for(lambda: sink.seen_for(announcer.name), "the real module after the flood")
