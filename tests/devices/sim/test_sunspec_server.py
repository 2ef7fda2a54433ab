"""Tests for the simulated SunSpec Modbus TCP server: real pymodbus servers on 127.0.0.1, read by the
official pysunspec2 client (run in a thread so that the server's loop keeps serving) and written with a real
pymodbus client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import sunspec2.modbus.client as ss_client
from pymodbus.client import AsyncModbusTcpClient

from devices.model import (
    DeviceInfo,
    DeviceKind,
    Identity,
    OperatingState,
    Setpoint,
)
from devices.sim.base import SimServer, StaticModule
from devices.sim.sunspec_server import SunSpecSimServer, start_sunspec_server
from devices.sunspec_map import model_layout
from tests.devices.drivers.test_sunspec import (
    BATTERY_INFO,
    BATTERY_SAMPLE,
    INVERTER_INFO,
    INVERTER_SAMPLE,
    METER_INFO,
    METER_SAMPLE,
)
from tests.serving import serving

# The same modules the driver tests use; the simulated inverter here also reports that a limit throttles it.
INVERTER = StaticModule(INVERTER_INFO, replace(INVERTER_SAMPLE, state=OperatingState.THROTTLED))
BATTERY = StaticModule(BATTERY_INFO, BATTERY_SAMPLE)
METER = StaticModule(METER_INFO, METER_SAMPLE)
MODULES = {"inverter": INVERTER, "battery": BATTERY, "meter": METER}
EXPECTED_MODELS = {
    ("legacy", "inverter"): [1, 120, 103, 123],
    ("legacy", "battery"): [1, 120, 103, 124, 802],
    ("legacy", "meter"): [1, 203],
    ("der", "inverter"): [1, 701, 702, 704],
    ("der", "battery"): [1, 701, 702, 704, 713, 802],
    ("der", "meter"): [1, 203],
}


def fresh(module: StaticModule) -> StaticModule:
    return StaticModule(module.info, module.sample)


Start = Callable[..., Awaitable[SunSpecSimServer]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    async for start_ in serving(start_sunspec_server):
        yield start_


@pytest.fixture
async def modbus() -> AsyncIterator[Callable[[SunSpecSimServer], Awaitable[AsyncModbusTcpClient]]]:
    clients: list[AsyncModbusTcpClient] = []

    async def _connect(server: SunSpecSimServer) -> AsyncModbusTcpClient:
        client = AsyncModbusTcpClient("127.0.0.1", port=server.address.port, reconnect_delay=0, timeout=2)
        clients.append(client)
        assert await client.connect()
        return client

    yield _connect
    for client in clients:
        client.close()


async def scan(port: int, unit: int = 1) -> ss_client.SunSpecModbusClientDeviceTCP:
    """The official pysunspec2 client, blocking, in a worker thread; the thread pool is shut down after."""
    device = ss_client.SunSpecModbusClientDeviceTCP(slave_id=unit, ipaddr="127.0.0.1", ipport=port, timeout=5)
    try:
        await asyncio.to_thread(device.scan)
    finally:
        await asyncio.get_running_loop().shutdown_default_executor()
    return device


def address_of(server: SunSpecSimServer, model_id: int, point: str, base: int = 40000) -> int:
    """The register address of a point, found by walking the served model list (lengths from definitions)."""
    address = base + 2
    for mid in server.models:
        layout = model_layout(mid)
        if mid == model_id:
            return address + layout.point(point).offset
        address += 2 + layout.length
    raise AssertionError(f"model {model_id} not served")


# ---------------------------------------------------------------------------------------- lifecycle


async def test_port_zero_binds_an_ephemeral_port_and_stop_is_idempotent() -> None:
    server = await start_sunspec_server(fresh(INVERTER), unit=7)
    as_protocol: SimServer = server  # checked by mypy: it satisfies the SimServer protocol
    assert as_protocol.module is not None
    assert server.address.scheme == "modbus"
    assert server.address.port > 0
    assert server.address.unit == 7
    assert str(server.address) == f"modbus://127.0.0.1:{server.address.port}?unit=7"
    client = AsyncModbusTcpClient("127.0.0.1", port=server.address.port, reconnect_delay=0, timeout=2)
    assert await client.connect()
    reply = await client.read_holding_registers(40000, count=2, device_id=7)
    assert reply.registers == [0x5375, 0x6E53]  # "SunS"
    await server.stop()
    await server.stop()
    client.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.address.port)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


@pytest.mark.parametrize("profile", ["nope", ""])
async def test_unknown_profile_is_refused(profile: str) -> None:
    with pytest.raises(ValueError, match="profile"):
        await start_sunspec_server(fresh(INVERTER), profile=profile)


async def test_smart_plug_has_no_sunspec_profile() -> None:
    plug = StaticModule(DeviceInfo(DeviceKind.SMARTPLUG, Identity("Acme", "P", "PLUG-1")))
    with pytest.raises(ValueError, match="smartplug"):
        await start_sunspec_server(plug)


# ------------------------------------------------------------------------------- pysunspec2 reads it


@pytest.mark.parametrize("profile", ["legacy", "der"])
@pytest.mark.parametrize("name", ["inverter", "battery", "meter"])
async def test_pysunspec2_scans_the_simulated_module(start: Start, profile: str, name: str) -> None:
    module = fresh(MODULES[name])
    server = await start(module, profile=profile)
    device = await scan(server.address.port)

    assert [m.model_id for m in device.model_list] == EXPECTED_MODELS[(profile, name)]
    assert all(not m.error_info for m in device.model_list), [m.error_info for m in device.model_list]
    common = device.models[1][0]
    ident = module.info.identity
    assert (common.Mn.value, common.Md.value, common.SN.value, common.Vr.value) == (
        ident.vendor,
        ident.model,
        ident.serial,
        ident.firmware_version,
    )
    t = module.sample
    if name == "meter":
        meter = device.models[203][0]
        assert meter.W.cvalue == t.power_w  # SunSpec meter: positive = import; here exporting
        assert meter.TotWhImp.cvalue == t.energy_out_wh
        assert meter.TotWhExp.cvalue == t.energy_in_wh
        assert meter.PhVphA.cvalue == pytest.approx(t.voltage_v)
        assert meter.A.cvalue == pytest.approx(t.current_a)
        assert meter.Hz.cvalue == pytest.approx(t.frequency_hz)
        assert meter.Evt.value == 0
        return
    caps = module.info.capabilities
    if profile == "legacy":
        inv = device.models[103][0]
        assert inv.W.cvalue == t.power_w
        assert inv.WH.cvalue == t.energy_out_wh
        assert inv.PhVphA.cvalue == pytest.approx(t.voltage_v)
        assert inv.A.cvalue == pytest.approx(t.current_a)
        assert inv.Hz.cvalue == pytest.approx(t.frequency_hz)
        assert inv.TmpCab.cvalue == pytest.approx(t.temperature_c)
        assert device.models[120][0].WRtg.cvalue == caps.rated_power_w
    else:
        der = device.models[701][0]
        assert der.W.cvalue == t.power_w
        assert der.TotWhInj.cvalue == t.energy_out_wh
        assert der.LNV.cvalue == pytest.approx(t.voltage_v)
        assert der.Hz.cvalue == pytest.approx(t.frequency_hz)
        assert device.models[702][0].WMaxRtg.cvalue == caps.rated_power_w
    if name == "inverter":
        st = device.models[103][0].St.value if profile == "legacy" else device.models[701][0].InvSt.value
        assert st == (5 if profile == "legacy" else 4)  # THROTTLED in both enumerations
        return
    battery = device.models[802][0]
    assert battery.SoC.cvalue == pytest.approx(t.soc_pct)
    assert battery.SoH.cvalue == pytest.approx(t.soh_pct)
    assert battery.WHRtg.cvalue == caps.capacity_wh
    assert battery.SoCMin.cvalue == caps.min_soc_pct
    assert battery.SoCMax.cvalue == caps.max_soc_pct
    if profile == "legacy":
        assert device.models[124][0].ChaState.cvalue == pytest.approx(t.soc_pct)
        assert device.models[124][0].WChaMax.cvalue == caps.max_charge_w
    else:
        assert device.models[701][0].TotWhAbs.cvalue == t.energy_in_wh
        assert device.models[713][0].SoC.cvalue == pytest.approx(t.soc_pct)
        assert device.models[713][0].WHRtg.cvalue == caps.capacity_wh


@pytest.mark.parametrize("base", [0, 50000])
async def test_marker_elsewhere_is_found_by_pysunspec2(start: Start, base: int) -> None:
    server = await start(fresh(METER), base_address=base)
    device = await scan(server.address.port)
    assert device.base_addr == base
    assert device.models[203][0].W.cvalue == -2100


async def test_unit_id_is_served(start: Start) -> None:
    server = await start(fresh(METER), unit=5)
    device = await scan(server.address.port, unit=5)
    assert device.models[1][0].SN.value == "MTR-0001"


# ---------------------------------------------------------------------------------- live measurements


async def test_measurements_follow_the_module(start: Start, modbus: Any) -> None:
    module = fresh(INVERTER)
    server = await start(module)
    client = await modbus(server)
    w_address = address_of(server, 103, "W")

    async def read_w() -> int:
        reply = await client.read_holding_registers(w_address, count=1, device_id=1)
        assert not reply.isError()
        return int(reply.registers[0])

    assert await read_w() == 612
    module.sample = replace(module.sample, power_w=300.0)
    deadline = time.monotonic() + 5
    while await read_w() != 300:
        assert time.monotonic() < deadline, "the simulator never refreshed W"
        await asyncio.sleep(0.02)


# -------------------------------------------------------------------------------------------- writes


async def test_write_of_model_123_reaches_the_module(start: Start, modbus: Any) -> None:
    module = fresh(INVERTER)
    server = await start(module)
    client = await modbus(server)
    first = address_of(server, 123, "WMaxLimPct")
    # WMaxLimPct (SF -2), WinTms, RvrtTms, RmpTms, WMaxLim_Ena
    reply = await client.write_registers(first, [4250, 0, 30, 0, 1], device_id=1)
    assert not reply.isError()
    assert module.received == [(Setpoint(power_limit_pct=42.5), 30.0)]
    reply = await client.read_holding_registers(first, count=1, device_id=1)
    assert reply.registers == [4250]

    reply = await client.write_registers(address_of(server, 123, "WMaxLim_Ena"), [0], device_id=1)
    assert not reply.isError()
    assert module.received[-1] == (Setpoint(release=True), None)


async def test_module_refusal_becomes_illegal_data_value(start: Start, modbus: Any) -> None:
    module = fresh(INVERTER)
    server = await start(module)
    client = await modbus(server)
    first = address_of(server, 123, "WMaxLimPct")
    reply = await client.write_registers(first, [15000, 0, 0, 0, 1], device_id=1)  # 150 %: refused
    assert reply.isError()
    assert reply.exception_code == 3  # ILLEGAL_DATA_VALUE
    assert module.received == []
    reply = await client.read_holding_registers(first, count=1, device_id=1)
    assert reply.registers == [10000]  # the refused write was not stored


async def test_write_to_read_only_point_is_an_illegal_address(start: Start, modbus: Any) -> None:
    server = await start(fresh(INVERTER))
    client = await modbus(server)
    reply = await client.write_registers(address_of(server, 103, "W"), [1], device_id=1)
    assert reply.isError()
    assert reply.exception_code == 2  # ILLEGAL_DATA_ADDRESS


@pytest.mark.parametrize(
    ("out_pct", "in_pct", "expected"),
    [
        (-3085, 3085, Setpoint(battery_power_w=-1234.0)),  # window closed at -30.85 % of 4000 W: charge
        (5000, -5000, Setpoint(battery_power_w=2000.0)),  # +50 %: discharge
        (0, 0, Setpoint(battery_power_w=0.0)),  # hold
        (5000, 5000, Setpoint(release=True)),  # a window, not a point: the battery's own logic
    ],
)
async def test_model_124_window_becomes_a_battery_setpoint(
    start: Start, modbus: Any, out_pct: int, in_pct: int, expected: Setpoint
) -> None:
    module = fresh(BATTERY)
    server = await start(module)
    client = await modbus(server)
    rates = [v & 0xFFFF for v in (out_pct, in_pct)] + [0, 60]  # OutWRte, InWRte, WinTms, RvrtTms
    assert not (
        await client.write_registers(address_of(server, 124, "OutWRte"), rates, device_id=1)
    ).isError()
    assert module.received == []  # nothing is committed before StorCtl_Mod
    assert not (
        await client.write_registers(address_of(server, 124, "StorCtl_Mod"), [3], device_id=1)
    ).isError()
    setpoint, revert = module.received[-1]
    assert setpoint.release == expected.release
    if expected.battery_power_w is not None:
        assert setpoint.battery_power_w == pytest.approx(expected.battery_power_w)
    assert revert == (None if expected.release else 60.0)


async def test_model_124_empty_window_is_refused(start: Start, modbus: Any) -> None:
    module = fresh(BATTERY)
    server = await start(module)
    client = await modbus(server)
    rates = [(-5000) & 0xFFFF, (-5000) & 0xFFFF]  # discharge <= -2000 W and charge <= -2000 W: empty
    assert not (
        await client.write_registers(address_of(server, 124, "OutWRte"), rates, device_id=1)
    ).isError()
    reply = await client.write_registers(address_of(server, 124, "StorCtl_Mod"), [3], device_id=1)
    assert reply.isError()
    assert reply.exception_code == 3
    assert module.received == []


async def test_model_704_wset_uses_the_der_sign(start: Start, modbus: Any) -> None:
    module = fresh(BATTERY)
    server = await start(module, profile="der")
    client = await modbus(server)
    watts = (-1800) & 0xFFFFFFFF  # int32, charge
    block = [1, 1, watts >> 16, watts & 0xFFFF]  # WSetEna, WSetMod=WATTS, WSet
    assert not (
        await client.write_registers(address_of(server, 704, "WSetEna"), block, device_id=1)
    ).isError()
    assert module.received == [(Setpoint(battery_power_w=-1800.0), None)]
    assert not (await client.write_registers(address_of(server, 704, "WSetEna"), [0], device_id=1)).isError()
    assert module.received[-1] == (Setpoint(release=True), None)
