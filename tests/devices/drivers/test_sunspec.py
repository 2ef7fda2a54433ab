"""Tests for the SunSpec Modbus TCP driver against real pymodbus servers on 127.0.0.1.

Two kinds of server: the hub's own simulated modules (``devices.sim.sunspec_server``, both profiles), and raw
pymodbus servers whose registers are made here with pysunspec2's own encoder (``sunspec2.device.Model``), so
that the driver is also checked against an implementation that is not ours, and so that a test can break
one register on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import sunspec2.device as ss_device
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, ReadHoldingRegistersResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from devices.drivers.base import Address, Driver
from devices.drivers.sunspec import SunSpecDriver
from devices.errors import CommandRejected, DeviceUnreachable, NotSupported, ProtocolError
from devices.model import (
    Capabilities,
    DeviceInfo,
    DeviceKind,
    Identity,
    OperatingState,
    Setpoint,
    Telemetry,
)
from devices.sim.base import StaticModule
from devices.sim.sunspec_server import SunSpecSimServer, start_sunspec_server
from tests.serving import serving

LOGGER = "devices.drivers.sunspec"
PROFILES = ["legacy", "der"]

INVERTER_INFO = DeviceInfo(
    DeviceKind.MICROINVERTER,
    Identity("Acme Solar", "MI-800", "INV-0001", "2.4.1"),
    Capabilities(rated_power_w=800.0),
)
INVERTER_SAMPLE = Telemetry(
    ts=0.0,
    power_w=612.0,
    energy_out_wh=123456.0,
    voltage_v=231.4,
    current_a=2.65,
    frequency_hz=50.02,
    temperature_c=41.5,
)
BATTERY_INFO = DeviceInfo(
    DeviceKind.ENERGYSTORAGE,
    Identity("Acme Storage", "B-10", "BAT-0001", "1.0.0"),
    Capabilities(
        rated_power_w=5000.0,
        capacity_wh=10000.0,
        max_charge_w=4000.0,
        max_discharge_w=5000.0,
        min_soc_pct=10.0,
        max_soc_pct=95.0,
    ),
)
BATTERY_SAMPLE = Telemetry(
    ts=0.0,
    power_w=-1500.0,  # charging
    energy_out_wh=5000.0,
    energy_in_wh=6000.0,
    voltage_v=230.0,
    current_a=6.52,
    frequency_hz=49.98,
    temperature_c=25.0,
    soc_pct=55.5,
    soh_pct=98.0,
)
METER_INFO = DeviceInfo(
    DeviceKind.METER, Identity("Acme Meters", "M-3", "MTR-0001", "0.9"), Capabilities(controllable=False)
)
METER_SAMPLE = Telemetry(
    ts=0.0,
    power_w=-2100.0,  # exporting
    energy_out_wh=9876.0,
    energy_in_wh=5432.0,
    voltage_v=229.9,
    current_a=9.13,
    frequency_hz=50.0,
    grid_ok=True,
)


# ------------------------------------------------------------------------------------------ fixtures

StartSim = Callable[..., Awaitable[SunSpecSimServer]]


@pytest.fixture
async def sim() -> AsyncIterator[StartSim]:
    async for start in serving(start_sunspec_server):
        yield start


@pytest.fixture
async def drivers() -> AsyncIterator[Callable[..., SunSpecDriver]]:
    made: list[SunSpecDriver] = []

    def _make(address: Address, timeout: float = 2.0) -> SunSpecDriver:
        driver = SunSpecDriver(address, timeout=timeout)
        made.append(driver)
        return driver

    yield _make
    for driver in made:
        await driver.close()


@dataclass
class RawDevice:
    """Hand-made holding registers at ``base``; ``overrides`` (address -> value) are applied on every access
    and ``short_reads`` (request address -> registers to answer) cut replies short."""

    registers: list[int]
    base: int = 40000
    overrides: dict[int, int] = field(default_factory=dict)
    short_reads: dict[int, int] = field(default_factory=dict)
    #: While set and not yet fired, every request waits for it (a module that stops answering).
    stall: asyncio.Event | None = None


@dataclass
class RawServer:
    server: ModbusTcpServer
    address: Address

    async def stop(self) -> None:
        listener = self.server.transport
        await self.server.shutdown()  # type: ignore[no-untyped-call]
        if isinstance(listener, asyncio.Server):
            await listener.wait_closed()


StartRaw = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def raw() -> AsyncIterator[StartRaw]:
    servers: list[RawServer] = []

    async def _start(device: RawDevice, port: int = 0) -> RawServer:
        async def action(
            _fc: int, start: int, _address: int, _count: int, registers: list[int], _values: Any
        ) -> ExcCodes | None:
            if device.stall is not None:
                await device.stall.wait()
            for address, value in device.overrides.items():
                registers[address - start] = value
            return None

        last_request: list[int] = [-1]

        def trace_pdu(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
            if not sending and isinstance(pdu, ReadHoldingRegistersRequest):
                last_request[0] = pdu.address
            elif sending and isinstance(pdu, ReadHoldingRegistersResponse):
                keep = device.short_reads.get(last_request[0])
                if keep is not None:
                    pdu.registers = list(pdu.registers)[:keep]
            return pdu

        block = SimData(address=device.base, values=device.registers, datatype=DataType.REGISTERS)
        server = ModbusTcpServer(
            SimDevice(id=1, simdata=[block], action=action), address=("127.0.0.1", port), trace_pdu=trace_pdu
        )
        await server.serve_forever(background=True)
        listener = server.transport
        assert isinstance(listener, asyncio.Server)
        bound = listener.sockets[0].getsockname()[1]
        started = RawServer(server, Address("modbus", "127.0.0.1", bound))
        servers.append(started)
        return started

    yield _start
    for started in servers:
        await started.stop()


def model_regs(model_id: int, **raw: Any) -> list[int]:
    """A model's registers as pysunspec2 encodes them (raw point values; unset points not implemented)."""
    model = ss_device.Model(model_id=model_id)
    for name, value in raw.items():
        model.points[name].set_value(value)
    data = model.get_mb()
    return list(struct.unpack(f">{len(data) // 2}H", data))


def sunspec_map(*models: list[int], marker: bytes = b"SunS") -> list[int]:
    regs = list(struct.unpack(">2H", marker))
    for model in models:
        regs.extend(model)
    return [*regs, 0xFFFF, 0]


COMMON = model_regs(1, Mn="Raw Co", Md="R1", SN="RAW-1", Vr="0.1")
INVERTER_103 = {
    "W": 500,
    "W_SF": 0,
    "Hz": 5001,
    "Hz_SF": -2,
    "WH": 777,
    "WH_SF": 0,
    "A": 218,
    "A_SF": -2,
    "PhVphA": 2301,
    "V_SF": -1,
    "St": 4,
    "TmpCab": 300,
    "Tmp_SF": -1,
}
#: Register address of 103.W_SF in ``sunspec_map(COMMON, model_regs(103, ...))`` (marker 2 + model 1: 68).
W_SF_ADDRESS = 40000 + 2 + 68 + 15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------- simulated modules: inverter


@pytest.mark.parametrize("profile", PROFILES)
async def test_inverter_probe_read_and_limit(sim: StartSim, drivers: Any, profile: str) -> None:
    module = StaticModule(INVERTER_INFO, INVERTER_SAMPLE)
    server = await sim(module, profile=profile)
    driver = drivers(server.address)
    assert isinstance(driver, Driver)

    info = await driver.probe()
    assert info.kind is DeviceKind.MICROINVERTER
    assert info.identity == INVERTER_INFO.identity
    assert info.capabilities.rated_power_w == 800.0
    assert info.capabilities.controllable

    sample = await driver.read()
    assert sample.power_w == 612.0  # positive: producing
    assert sample.energy_out_wh == 123456.0
    assert sample.voltage_v == pytest.approx(231.4)
    assert sample.current_a == pytest.approx(2.65)
    assert sample.frequency_hz == pytest.approx(50.02)
    assert sample.temperature_c == pytest.approx(41.5)
    assert sample.state is OperatingState.RUNNING
    assert sample.power_limit_pct == 100.0  # no limit enabled
    assert sample.soc_pct is None

    await driver.apply(Setpoint(power_limit_pct=37.5), revert_after_s=30)
    assert module.received == [(Setpoint(power_limit_pct=37.5), 30.0)]
    assert (await driver.read()).power_limit_pct == 37.5

    await driver.apply(Setpoint(power_limit_pct=80.0))
    assert module.received[-1] == (Setpoint(power_limit_pct=80.0), None)

    await driver.apply(Setpoint(release=True))
    assert module.received[-1] == (Setpoint(release=True), None)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(
    "state",
    [
        OperatingState.OFF,
        OperatingState.STARTING,
        OperatingState.THROTTLED,
        OperatingState.FAULT,
        OperatingState.STANDBY,
    ],
)
async def test_inverter_states_round_trip(
    sim: StartSim, drivers: Any, profile: str, state: OperatingState
) -> None:
    server = await sim(StaticModule(INVERTER_INFO, replace(INVERTER_SAMPLE, state=state)), profile=profile)
    assert (await drivers(server.address).read()).state is state


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("legacy", OperatingState.UNKNOWN),  # 103 St not implemented
        ("der", OperatingState.RUNNING),  # 701 InvSt not implemented: St (ON) decides
    ],
)
async def test_unimplemented_state(
    sim: StartSim, drivers: Any, profile: str, expected: OperatingState
) -> None:
    module = StaticModule(INVERTER_INFO, replace(INVERTER_SAMPLE, state=OperatingState.UNKNOWN))
    server = await sim(module, profile=profile)
    assert (await drivers(server.address).read()).state is expected


# -------------------------------------------------------------------------- simulated modules: battery


@pytest.mark.parametrize("profile", PROFILES)
async def test_storage_probe_read_and_power(sim: StartSim, drivers: Any, profile: str) -> None:
    module = StaticModule(BATTERY_INFO, BATTERY_SAMPLE)
    server = await sim(module, profile=profile)
    driver = drivers(server.address)

    info = await driver.probe()
    assert info.kind is DeviceKind.ENERGYSTORAGE
    assert info.identity == BATTERY_INFO.identity
    caps = info.capabilities
    assert caps.rated_power_w == 5000.0
    assert caps.capacity_wh == 10000.0
    assert caps.max_charge_w == 4000.0
    assert caps.max_discharge_w == 5000.0
    assert caps.min_soc_pct == 10.0
    assert caps.max_soc_pct == 95.0

    sample = await driver.read()
    assert sample.power_w == -1500.0  # negative: charging
    assert sample.soc_pct == pytest.approx(55.5)
    assert sample.soh_pct == pytest.approx(98.0)
    assert sample.energy_out_wh == 5000.0  # discharged
    assert sample.energy_in_wh == (6000.0 if profile == "der" else None)  # 103 has no absorbed counter
    assert sample.frequency_hz == pytest.approx(49.98)

    module.sample = replace(BATTERY_SAMPLE, power_w=2500.0)
    await driver.apply(Setpoint(battery_power_w=-1234.0), revert_after_s=60)  # the write also refreshes
    assert (await driver.read()).power_w == 2500.0  # positive: discharging
    setpoint, revert = module.received[-1]
    assert setpoint.battery_power_w == pytest.approx(-1234.0)
    assert revert == 60.0

    await driver.apply(Setpoint(battery_power_w=2000.0))
    setpoint, revert = module.received[-1]
    assert setpoint.battery_power_w == pytest.approx(2000.0)
    assert revert is None

    await driver.apply(Setpoint(battery_power_w=0.0))
    assert module.received[-1][0].battery_power_w == 0.0

    await driver.apply(Setpoint(release=True))
    assert module.received[-1] == (Setpoint(release=True), None)
    assert len(module.received) == 4


# ---------------------------------------------------------------------------- simulated modules: meter


@pytest.mark.parametrize("profile", PROFILES)
async def test_meter_probe_and_read_signs(sim: StartSim, drivers: Any, profile: str) -> None:
    module = StaticModule(METER_INFO, METER_SAMPLE)
    server = await sim(module, profile=profile)
    driver = drivers(server.address)

    info = await driver.probe()
    assert info.kind is DeviceKind.METER
    assert info.identity == METER_INFO.identity
    assert not info.capabilities.controllable

    sample = await driver.read()
    assert sample.power_w == -2100.0  # negative: exporting
    assert sample.energy_out_wh == 9876.0  # imported
    assert sample.energy_in_wh == 5432.0  # exported
    assert sample.voltage_v == pytest.approx(229.9)
    assert sample.current_a == pytest.approx(9.13)
    assert sample.grid_ok is True

    importing = StaticModule(METER_INFO, replace(METER_SAMPLE, power_w=3300.0, grid_ok=False))
    sample = await drivers((await sim(importing, profile=profile)).address).read()
    assert sample.power_w == 3300.0  # positive: importing
    assert sample.grid_ok is False


async def test_meter_takes_no_setpoints(sim: StartSim, drivers: Any) -> None:
    module = StaticModule(METER_INFO, METER_SAMPLE)
    driver = drivers((await sim(module)).address)
    await driver.apply(Setpoint(release=True))  # nothing to release: a no-op
    with pytest.raises(NotSupported, match="meter"):
        await driver.apply(Setpoint(battery_power_w=100.0))
    assert module.received == []


# --------------------------------------------------------------------------------- setpoint rejection


async def test_setpoints_a_kind_cannot_take_are_not_supported(sim: StartSim, drivers: Any) -> None:
    inverter = drivers((await sim(StaticModule(INVERTER_INFO, INVERTER_SAMPLE))).address)
    battery = drivers((await sim(StaticModule(BATTERY_INFO, BATTERY_SAMPLE))).address)
    with pytest.raises(NotSupported, match="battery_power_w"):
        await inverter.apply(Setpoint(battery_power_w=100.0))
    with pytest.raises(NotSupported, match="power_limit_pct"):
        await battery.apply(Setpoint(power_limit_pct=50.0))
    with pytest.raises(NotSupported, match="relay"):
        await inverter.apply(Setpoint(on=True))


@pytest.mark.parametrize("profile", PROFILES)
async def test_module_refusal_is_command_rejected(
    sim: StartSim, drivers: Any, profile: str, caplog: pytest.LogCaptureFixture
) -> None:
    module = StaticModule(INVERTER_INFO, INVERTER_SAMPLE)
    driver = drivers((await sim(module, profile=profile)).address)
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(CommandRejected, match="ILLEGAL_VALUE"):
        await driver.apply(Setpoint(power_limit_pct=150.0))  # StaticModule refuses > 100 %
    assert "refused" in caplog.text
    assert "WMaxLimPct = 150 %" in caplog.text
    assert module.received == []
    assert (await driver.read()).power_limit_pct == 100.0  # the driver still works


async def test_unencodable_setpoint_is_command_rejected(sim: StartSim, drivers: Any) -> None:
    module = StaticModule(INVERTER_INFO, INVERTER_SAMPLE)
    driver = drivers((await sim(module)).address)
    with pytest.raises(CommandRejected, match="does not fit"):
        await driver.apply(Setpoint(power_limit_pct=-5.0))  # uint16
    assert module.received == []


# ------------------------------------------------------------------------------- probing and addresses


async def test_read_without_probe_probes_first(sim: StartSim, drivers: Any) -> None:
    server = await sim(StaticModule(METER_INFO, METER_SAMPLE))
    assert (await drivers(server.address).read()).power_w == -2100.0


@pytest.mark.parametrize("base", [0, 50000])
async def test_marker_is_searched_at_0_and_50000(sim: StartSim, drivers: Any, base: int) -> None:
    server = await sim(StaticModule(INVERTER_INFO, INVERTER_SAMPLE), base_address=base)
    assert (await drivers(server.address).probe()).identity.serial == "INV-0001"


async def test_nothing_listening_is_unreachable(drivers: Any, caplog: pytest.LogCaptureFixture) -> None:
    driver = drivers(Address("modbus", "127.0.0.1", free_port()), timeout=5.0)
    with (
        caplog.at_level(logging.DEBUG, logger=LOGGER),
        pytest.raises(DeviceUnreachable, match="cannot connect"),
    ):
        await driver.probe()
    assert "cannot connect" in caplog.text


async def test_close_is_idempotent_and_the_next_call_reconnects(sim: StartSim, drivers: Any) -> None:
    server = await sim(StaticModule(METER_INFO, METER_SAMPLE))
    driver = drivers(server.address)
    await driver.probe()
    await driver.close()
    await driver.close()
    assert (await driver.read()).power_w == -2100.0


# --------------------------------------------------------------------- raw servers: a foreign encoder


async def test_device_encoded_by_pysunspec2_is_read(raw: StartRaw, drivers: Any) -> None:
    server = await raw(RawDevice(sunspec_map(COMMON, model_regs(103, **INVERTER_103))))
    driver = drivers(server.address)
    info = await driver.probe()
    assert info.kind is DeviceKind.MICROINVERTER
    assert info.identity == Identity("Raw Co", "R1", "RAW-1", "0.1")
    assert not info.capabilities.controllable  # no 123 / 704
    sample = await driver.read()
    assert sample.power_w == 500.0
    assert sample.frequency_hz == pytest.approx(50.01)
    assert sample.energy_out_wh == 777.0
    assert sample.current_a == pytest.approx(2.18)
    assert sample.voltage_v == pytest.approx(230.1)
    assert sample.temperature_c == pytest.approx(30.0)
    assert sample.power_limit_pct is None
    with pytest.raises(NotSupported, match="no control model"):
        await driver.apply(Setpoint(power_limit_pct=50.0))


async def test_meter_encoded_by_pysunspec2_keeps_the_sunspec_sign(raw: StartRaw, drivers: Any) -> None:
    meter = model_regs(
        203, W=-750, W_SF=1, TotWhImp=100, TotWhExp=2000, TotWh_SF=0, PhV=2302, V_SF=-1, Hz=50, Hz_SF=0, Evt=4
    )
    server = await raw(RawDevice(sunspec_map(COMMON, meter)))
    sample = await drivers(server.address).read()
    assert sample.power_w == -7500.0  # W * 10**W_SF, negative: exporting
    assert sample.energy_out_wh == 100.0
    assert sample.energy_in_wh == 2000.0
    assert sample.voltage_v == pytest.approx(230.2)
    assert sample.grid_ok is False  # Evt bit 2: power failure


async def test_not_a_sunspec_device_is_not_supported(
    raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await raw(RawDevice([0x1234, 0x5678, 0, 0], base=40000))
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(NotSupported, match="no SunS marker"):
        await drivers(server.address).probe()
    assert "40000: b'\\x124Vx'" in caplog.text
    assert "0: Modbus exception 2 (ILLEGAL_ADDRESS)" in caplog.text


async def test_device_without_a_known_model_is_not_supported(raw: StartRaw, drivers: Any) -> None:
    server = await raw(RawDevice(sunspec_map(COMMON, model_regs(11))))
    with pytest.raises(NotSupported, match=r"models \[1, 11\] has no inverter"):
        await drivers(server.address).probe()


# ------------------------------------------------------------------- raw servers: malformed replies


async def test_wrong_marker_is_a_protocol_error(
    raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await raw(RawDevice(sunspec_map(COMMON, model_regs(103, **INVERTER_103), marker=b"uSSn")))
    with (
        caplog.at_level(logging.DEBUG, logger=LOGGER),
        pytest.raises(ProtocolError, match="wrong SunSpec marker"),
    ):
        await drivers(server.address).probe()
    assert "b'uSSn' instead of b'SunS'" in caplog.text


async def test_model_length_that_does_not_match_its_definition(
    raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    inverter = model_regs(103, **INVERTER_103)[:42]
    inverter[1] = 40  # L: 40 registers instead of the 50 of model 103
    server = await raw(RawDevice(sunspec_map(COMMON, inverter)))
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(ProtocolError, match="length 40"):
        await drivers(server.address).probe()
    assert "model 103 at 40070 has length 40, its definition needs 50" in caplog.text


async def test_truncated_map(raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture) -> None:
    registers = sunspec_map(COMMON, model_regs(103, **INVERTER_103))[: 2 + 68 + 30]  # ends inside model 103
    server = await raw(RawDevice(registers))
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(ProtocolError, match="chain is broken"):
        await drivers(server.address).probe()
    assert "the model chain is broken at 40122: Modbus exception 2 (ILLEGAL_ADDRESS)" in caplog.text


async def test_short_read(raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture) -> None:
    device = RawDevice(sunspec_map(COMMON, model_regs(103, **INVERTER_103)), short_reads={40070: 10})
    server = await raw(device)
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(ProtocolError, match="short read"):
        await drivers(server.address).probe()
    assert "short read: asked" in caplog.text
    assert "at 40070, got 10" in caplog.text


@pytest.mark.parametrize(
    ("w_sf", "reason"),
    [
        (20, "scale factor 103.W_SF (40085) = 20 is outside -10..10 (used by 103.W (40084))"),
        (-11, "scale factor 103.W_SF (40085) = -11 is outside -10..10"),
        (0x8000, "103.W (40084) = 500 but its scale factor 103.W_SF (40085) is not implemented"),
    ],
)
async def test_bad_scale_factor_rejects_the_device(
    raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture, w_sf: int, reason: str
) -> None:
    device = RawDevice(
        sunspec_map(COMMON, model_regs(103, **INVERTER_103)), overrides={W_SF_ADDRESS: w_sf & 0xFFFF}
    )
    server = await raw(device)
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(ProtocolError) as caught:
        await drivers(server.address).probe()
    assert reason in str(caught.value)
    assert reason in caplog.text


async def test_scale_factor_going_bad_after_probe(
    raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    device = RawDevice(sunspec_map(COMMON, model_regs(103, **INVERTER_103)))
    server = await raw(device)
    driver = drivers(server.address)
    await driver.probe()
    device.overrides[W_SF_ADDRESS] = 11
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(ProtocolError, match="outside"):
        await driver.read()
    assert "103.W_SF (40085) = 11" in caplog.text
    device.overrides[W_SF_ADDRESS] = 1
    assert (await driver.read()).power_w == 5000.0


async def test_unimplemented_value_is_none_whatever_its_scale_factor(raw: StartRaw, drivers: Any) -> None:
    values = {**INVERTER_103, "TmpCab": None, "Tmp_SF": None}  # not implemented: 0x8000 both
    server = await raw(RawDevice(sunspec_map(COMMON, model_regs(103, **values))))
    sample = await drivers(server.address).read()
    assert sample.temperature_c is None
    assert sample.power_w == 500.0


async def test_missing_common_model(raw: StartRaw, drivers: Any) -> None:
    server = await raw(RawDevice(sunspec_map(model_regs(103, **INVERTER_103))))
    with pytest.raises(ProtocolError, match=r"no common model \(1\)"):
        await drivers(server.address).probe()


async def test_missing_serial_number(raw: StartRaw, drivers: Any) -> None:
    common = model_regs(1, Mn="Raw Co", Md="R1")
    server = await raw(RawDevice(sunspec_map(common, model_regs(103, **INVERTER_103))))
    with pytest.raises(ProtocolError, match=r"no serial number \(SN\)"):
        await drivers(server.address).probe()


async def test_server_going_away_and_coming_back(
    raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    device = RawDevice(sunspec_map(COMMON, model_regs(103, **INVERTER_103)))
    server = await raw(device)
    driver = drivers(server.address, timeout=0.5)
    await driver.probe()
    assert (await driver.read()).power_w == 500.0

    await server.stop()
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(DeviceUnreachable):
        await driver.read()
    assert f"SunSpec read of {server.address} failed" in caplog.text

    await raw(device, port=server.address.port)  # the same module back on the same port
    assert (await driver.read()).power_w == 500.0  # reconnected transparently, no new probe needed


async def test_module_that_stops_answering(
    raw: StartRaw, drivers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    device = RawDevice(sunspec_map(COMMON, model_regs(103, **INVERTER_103)))
    server = await raw(device)
    driver = drivers(server.address, timeout=0.3)
    await driver.probe()

    device.stall = stall = asyncio.Event()
    with (
        caplog.at_level(logging.DEBUG, logger=LOGGER),
        pytest.raises(DeviceUnreachable, match="no answer within"),
    ):
        await driver.read()
    assert "no answer within 0.3 s to a read of 39 registers at 40070" in caplog.text
    # A caller's own deadline (the poller's wait_for) cancels the read: the stream is dropped as well.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(driver.read(), 0.05)

    device.stall = None
    stall.set()  # the stalled requests finish on the server (their connections are gone)
    assert (await driver.read()).power_w == 500.0
