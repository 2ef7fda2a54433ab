"""Tests of devices.sim.announce: simulated modules announcing themselves over real mDNS on 127.0.0.1.

The announcements are checked the way a hub sees them: a plain zeroconf browser in another zeroconf
instance, zeroconf's own resolution, and ``discovery.mdns.parse_txt`` on the TXT record.  Each test uses its
own service type, and waits on browser events with a deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from devices.drivers.base import Address
from devices.model import DeviceInfo, DeviceKind, Identity
from devices.sim.announce import ModuleAnnouncer, announce_all
from devices.sim.base import SimulatedModule, StaticModule
from devices.sim.ores_http_server import start_ores_http_server
from devices.sim.sunspec_server import start_sunspec_server
from discovery.base import DiscoveryError
from discovery.mdns import MODULE_SERVICE_TYPE, parse_txt
from tests.discovery._mdns_support import RawWatcher, loopback_zeroconf, unique_service_type

PLUG = DeviceInfo(DeviceKind.SMARTPLUG, Identity("Plugco", "P-1", "PL 0001/B", "1.0"))
BATTERY = DeviceInfo(DeviceKind.ENERGYSTORAGE, Identity("Acme Storage", "B-5", "B5-0042", "2.1.0"))


@dataclass
class _Endpoint:
    """A stand-in ``SimServer`` for constructor checks that need no listening socket."""

    address: Address
    module: SimulatedModule

    async def stop(self) -> None:
        return None


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exit_stack:
        yield exit_stack


@pytest.fixture
async def zcs(stack: AsyncExitStack) -> tuple[AsyncZeroconf, AsyncZeroconf]:
    """(the modules' zeroconf, the observer's zeroconf), both on the loopback."""
    return (
        await stack.enter_async_context(loopback_zeroconf()),
        await stack.enter_async_context(loopback_zeroconf()),
    )


async def _resolve_txt(
    aiozc: AsyncZeroconf, stype: str, name: str
) -> tuple[AsyncServiceInfo, dict[str, str]]:
    info = AsyncServiceInfo(stype, name)
    assert await info.async_request(aiozc.zeroconf, 3000), f"{name} did not resolve"
    return info, parse_txt(info.properties)


def test_txt_and_name_come_from_the_server() -> None:
    http = _Endpoint(Address("http", "127.0.0.1", 8081, "/ores/v1"), StaticModule(info=PLUG))
    announcer = ModuleAnnouncer(http, zeroconf=None)  # type: ignore[arg-type]  # not started
    assert announcer.name == f"Plugco-PL-0001-B.{MODULE_SERVICE_TYPE}"
    assert announcer.txt == {
        "pv": "1.0",
        "kind": "smartplug",
        "vendor": "Plugco",
        "model": "P-1",
        "serial": "PL 0001/B",
        "tp": "ores-http",
        "path": "/ores/v1",
        "prov": "0",
    }
    modbus = _Endpoint(Address("modbus", "127.0.0.1", 1502, "", 7), StaticModule(info=BATTERY))
    txt = ModuleAnnouncer(modbus, zeroconf=None, provisioned=True).txt  # type: ignore[arg-type]
    assert txt == {
        "pv": "1.0",
        "kind": "energystorage",
        "vendor": "Acme Storage",
        "model": "B-5",
        "serial": "B5-0042",
        "tp": "sunspec-modbus",
        "unit": "7",
    }


def test_refuses_what_cannot_be_announced() -> None:
    module = StaticModule(info=PLUG)
    wildcard = _Endpoint(Address("http", "0.0.0.0", 8081, "/ores/v1"), module)
    with pytest.raises(ValueError, match="pass addresses"):
        ModuleAnnouncer(wildcard, zeroconf=None)  # type: ignore[arg-type]
    assert ModuleAnnouncer(wildcard, zeroconf=None, addresses=["192.0.2.4"]).txt["tp"] == "ores-http"  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ModuleAnnouncer(_Endpoint(Address("http", "plug.local", 80, "/ores/v1"), module), zeroconf=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ble://"):
        ModuleAnnouncer(_Endpoint(Address("ble", "AA:BB:CC:DD:EE:FF", 0), module), zeroconf=None)  # type: ignore[arg-type]
    long_vendor = StaticModule(info=DeviceInfo(DeviceKind.METER, Identity("V" * 80, "M", "S")))
    with pytest.raises(ValueError, match="too long"):
        ModuleAnnouncer(_Endpoint(Address("http", "127.0.0.1", 80, "/x"), long_vendor), zeroconf=None)  # type: ignore[arg-type]


async def test_announce_all_update_and_goodbye(
    stack: AsyncExitStack, zcs: tuple[AsyncZeroconf, AsyncZeroconf]
) -> None:
    modules_zc, observer_zc = zcs
    stype = unique_service_type()
    plug = await start_ores_http_server(StaticModule(info=PLUG))
    stack.push_async_callback(plug.stop)
    battery = await start_sunspec_server(StaticModule(info=BATTERY), unit=2, profile="der")
    stack.push_async_callback(battery.stop)
    watcher = RawWatcher(observer_zc, stype)
    stack.push_async_callback(watcher.close)

    announcers = await announce_all([plug, battery], zeroconf=modules_zc, service_type=stype, probe=False)
    for announcer in announcers:
        stack.push_async_callback(announcer.stop)
    names = [a.name for a in announcers]
    await watcher.wait_for(
        lambda: all(watcher.count(n, ServiceStateChange.Added) for n in names), "both announcements"
    )

    plug_info, plug_txt = await _resolve_txt(observer_zc, stype, names[0])
    assert plug_txt == {**announcers[0].txt, "unit": "1"}
    assert plug_info.port == plug.address.port
    assert plug_info.parsed_addresses() == ["127.0.0.1"]
    _, battery_txt = await _resolve_txt(observer_zc, stype, names[1])
    assert (battery_txt["tp"], battery_txt["unit"], battery_txt["kind"]) == (
        "sunspec-modbus",
        "2",
        "energystorage",
    )

    await announcers[0].set_provisioned(True)
    assert announcers[0].provisioned
    await watcher.wait_for(lambda: watcher.count(names[0], ServiceStateChange.Updated), "the TXT update")
    _, plug_txt = await _resolve_txt(observer_zc, stype, names[0])
    assert plug_txt["prov"] == "1"

    for announcer in announcers:
        await announcer.stop()
    await watcher.wait_for(
        lambda: all(watcher.count(n, ServiceStateChange.Removed) for n in names), "both goodbyes"
    )


async def test_name_conflict_gets_a_suffix(
    stack: AsyncExitStack, zcs: tuple[AsyncZeroconf, AsyncZeroconf]
) -> None:
    """Two modules claiming the same vendor and serial: the second one's probe renames it."""
    first_zc, second_zc = zcs
    stype = unique_service_type()
    servers = [await start_ores_http_server(StaticModule(info=PLUG)) for _ in range(2)]
    for server in servers:
        stack.push_async_callback(server.stop)
    first = ModuleAnnouncer(servers[0], zeroconf=first_zc, service_type=stype, probe=False)
    await first.start()
    stack.push_async_callback(first.stop)
    second = ModuleAnnouncer(servers[1], zeroconf=second_zc, service_type=stype)
    await second.start()
    stack.push_async_callback(second.stop)
    assert first.name == f"Plugco-PL-0001-B.{stype}"
    assert second.name == f"Plugco-PL-0001-B-2.{stype}"


async def test_announce_all_on_a_closed_zeroconf_raises() -> None:
    server = await start_ores_http_server(StaticModule(info=PLUG))
    try:
        async with loopback_zeroconf() as aiozc:
            pass
        with pytest.raises(DiscoveryError, match="cannot register"):
            await announce_all([server], zeroconf=aiozc, service_type=unique_service_type(), probe=False)
    finally:
        await server.stop()
