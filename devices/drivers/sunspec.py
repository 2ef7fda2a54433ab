"""The SunSpec Modbus TCP driver: inverters, batteries and grid meters that publish a SunSpec register map.

``probe`` finds the ``SunS`` marker (holding registers 40000, then 0, then 50000), walks the model chain to
the end model, reads identity from model 1 and decides the kind: a meter when a 201-204 model is present,
energy storage when 124, 713 or 802 is, a microinverter when 101-103 or 701 is.  It then compiles, once, a
read plan from the official model definitions (``devices.sunspec_map``): which registers to fetch (models
that sit next to each other share one request of at most 125 registers), and one ``struct.Struct`` per
request that decodes every point the hub uses, with the register index of its scale factor.  ``read`` is
then a request or two and one ``unpack`` each.  ``apply`` writes model 123 or 704 (inverter limit) or 124 or
704 (battery power); ``docs/sunspec.md`` documents every point, its sign and what gets a device rejected.

The hub's sign convention (``devices.model``) needs no flip anywhere: inverter models 101-103 and DER model
701 report ``W`` positive while injecting (producing, or discharging a battery), and meter models 201-204
report ``W`` positive while importing from the grid.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from devices.drivers.base import DEFAULT_TIMEOUT_S, Address
from devices.errors import CommandRejected, DeviceError, DeviceUnreachable, NotSupported, ProtocolError
from devices.model import (
    Capabilities,
    DeviceInfo,
    DeviceKind,
    Identity,
    OperatingState,
    Setpoint,
    Telemetry,
)
from devices.sunspec_map import (
    BASE_ADDRESSES,
    END_MODEL_ID,
    MAX_READ_REGISTERS,
    SF_MAX,
    SF_MIN,
    SUNS_MARKER,
    ModelLayout,
    PointDef,
    UnknownModel,
    decode_string,
    model_layout,
    scale_to_raw,
    state_table,
)

__all__ = ["SunSpecDriver"]

_LOGGER = logging.getLogger(__name__)

_INVERTER_MODELS = (101, 102, 103)
_METER_MODELS = (201, 202, 203, 204)
_STORAGE_MODELS = (802, 713, 124)
#: A device with more models than this is taken for a broken chain.
_MAX_MODELS = 100
_SF_UNIMPLEMENTED = -0x8000
_POW10 = tuple(10**k for k in range(SF_MAX + 1))
#: Byte strings that are "SunS" with its bytes or registers swapped, or in the wrong case.
_NEAR_MARKERS = frozenset({b"uSSn", b"nSSu", b"SnuS"})


class _ExceptionReply(Exception):
    """The module answered a request with a Modbus exception (internal: callers translate it)."""

    def __init__(self, code: int, address: int, count: int) -> None:
        super().__init__(code, address, count)
        self.code = code
        self.address = address
        self.count = count

    @property
    def reason(self) -> str:
        try:
            name = ExcCodes(self.code).name
        except ValueError:
            name = "unknown"
        return f"Modbus exception {self.code} ({name})"


# ---------------------------------------------------------------------------------------- read plans


@dataclass(frozen=True, slots=True)
class _Model:
    """One model instance found in the chain."""

    model_id: int
    address: int  # of its ID register
    length: int  # its L register
    layout: ModelLayout | None = None

    def point(self, name: str) -> PointDef:
        assert self.layout is not None
        return self.layout.point(name)

    def address_of(self, name: str) -> int:
        return self.address + self.point(name).offset


@dataclass(frozen=True, slots=True)
class _Ref:
    """Where a decoded point sits in a plan's flat value list, with its scale factor's position."""

    label: str  # "103.W (40084)", for messages
    index: int
    unimplemented: int | None
    sf_index: int  # -1: no scale-factor point
    sf_label: str
    sf_fixed: int
    symbols: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class _Region:
    """One read request and the struct that decodes the points it carries."""

    address: int
    count: int
    registers: struct.Struct  # packs the registers back to bytes
    fields: struct.Struct  # unpacks the wanted points from those bytes
    description: str


@dataclass(frozen=True, slots=True)
class _ReadPlan:
    regions: tuple[_Region, ...]
    refs: Mapping[str, _Ref]  # "103.W" -> ref
    id_checks: tuple[tuple[int, int, int], ...]  # (value index, expected model id, address)

    def ref(self, model_id: int, name: str) -> _Ref | None:
        return self.refs.get(f"{model_id}.{name}")

    def refs_of(self, pairs: Iterable[tuple[int, str]]) -> tuple[_Ref, ...]:
        found = (self.ref(model_id, name) for model_id, name in pairs)
        return tuple(ref for ref in found if ref is not None)


def _compile(wanted: Iterable[tuple[_Model, Iterable[str]]]) -> _ReadPlan:
    """Compile the points wanted from each model (plus their scale factors and the model IDs) into as few
    requests as possible: adjacent points share a request while it spans at most 125 registers."""
    entries: dict[int, tuple[str, PointDef, _Model]] = {}
    for model, names in wanted:
        assert model.layout is not None
        for name in ("ID", *names):
            point = model.point(name)
            entries[model.address + point.offset] = (name, point, model)
            if isinstance(point.sf, str):
                sf_point = model.point(point.sf)
                entries[model.address + sf_point.offset] = (point.sf, sf_point, model)
    # Group per model first, so that a model is never split over two requests when one would carry it.
    per_model: dict[int, list[tuple[int, tuple[str, PointDef, _Model]]]] = {}
    for entry in sorted(entries.items()):
        per_model.setdefault(entry[1][2].address, []).append(entry)
    groups: list[list[tuple[int, tuple[str, PointDef, _Model]]]] = []
    for model_entries in per_model.values():
        first = model_entries[0][0]
        last_address, (_, last_point, _) = model_entries[-1]
        end = last_address + last_point.size
        if end - first <= MAX_READ_REGISTERS:
            if groups and end - groups[-1][0][0] <= MAX_READ_REGISTERS:
                groups[-1].extend(model_entries)
            else:
                groups.append(list(model_entries))
            continue
        for entry in model_entries:  # a model wider than one request: cut it point by point
            address, (_, point, _) = entry
            if groups and address + point.size - groups[-1][0][0] <= MAX_READ_REGISTERS:
                groups[-1].append(entry)
            else:
                groups.append([entry])
    regions: list[_Region] = []
    positions: dict[str, tuple[int, PointDef, _Model]] = {}
    id_checks: list[tuple[int, int, int]] = []
    index = 0
    for group in groups:
        start = group[0][0]
        cursor = start
        fmt = ">"
        models: list[str] = []
        for address, (name, point, model) in group:
            if address > cursor:
                fmt += f"{2 * (address - cursor)}x"
            fmt += point.struct_code
            cursor = address + point.size
            positions[f"{model.model_id}.{name}"] = (index, point, model)
            if name == "ID":
                id_checks.append((index, model.model_id, model.address))
            if str(model.model_id) not in models:
                models.append(str(model.model_id))
            index += 1
        count = cursor - start
        regions.append(
            _Region(
                address=start,
                count=count,
                registers=struct.Struct(f">{count}H"),
                fields=struct.Struct(fmt),
                description=f"model {'+'.join(models)}",
            )
        )
    refs: dict[str, _Ref] = {}
    for key, (idx, point, model) in positions.items():
        sf_index, sf_label, sf_fixed = -1, "", 0
        if isinstance(point.sf, str):
            sf_key = f"{model.model_id}.{point.sf}"
            sf_index = positions[sf_key][0]
            sf_label = f"{sf_key} ({model.address_of(point.sf)})"
        elif isinstance(point.sf, int):
            sf_fixed = point.sf
        refs[key] = _Ref(
            label=f"{key} ({model.address + point.offset})",
            index=idx,
            unimplemented=point.unimplemented,
            sf_index=sf_index,
            sf_label=sf_label,
            sf_fixed=sf_fixed,
            symbols=point.symbols,
        )
    return _ReadPlan(tuple(regions), refs, tuple(id_checks))


def _scaled(values: Sequence[Any], ref: _Ref) -> float | None:
    """A point's engineering value, ``None`` when not implemented; a broken scale factor raises."""
    value = values[ref.index]
    if value == ref.unimplemented or (isinstance(value, float) and math.isnan(value)):
        return None
    sf = ref.sf_fixed
    if ref.sf_index >= 0:
        sf = values[ref.sf_index]
        if sf == _SF_UNIMPLEMENTED:
            raise ProtocolError(
                f"{ref.label} = {value} but its scale factor {ref.sf_label} is not implemented"
            )
        if not SF_MIN <= sf <= SF_MAX:
            raise ProtocolError(
                f"scale factor {ref.sf_label} = {sf} is outside {SF_MIN}..{SF_MAX} (used by {ref.label})"
            )
    if sf < 0:
        return float(value / _POW10[-sf])
    return float(value * _POW10[sf])


def _enum(values: Sequence[Any], ref: _Ref) -> int | None:
    value = values[ref.index]
    if value == ref.unimplemented:
        return None
    return int(value)


def _first(values: Sequence[Any], refs: tuple[_Ref, ...]) -> float | None:
    for ref in refs:
        value = _scaled(values, ref)
        if value is not None:
            return value
    return None


# ------------------------------------------------------------------------------- what a device offers


@dataclass(frozen=True, slots=True)
class _TelemetryPlan:
    """How to turn one fetch into a ``Telemetry`` (each field: alternatives, first implemented wins)."""

    fetch: _ReadPlan
    power: tuple[_Ref, ...] = ()
    energy_out: tuple[_Ref, ...] = ()
    energy_in: tuple[_Ref, ...] = ()
    voltage: tuple[_Ref, ...] = ()
    current: tuple[_Ref, ...] = ()
    frequency: tuple[_Ref, ...] = ()
    temperature: tuple[_Ref, ...] = ()
    soc: tuple[_Ref, ...] = ()
    soh: tuple[_Ref, ...] = ()
    states: tuple[tuple[_Ref, Mapping[int, OperatingState]], ...] = ()
    limit: tuple[_Ref, _Ref] | None = None  # (percent, enable)
    grid_failure: tuple[_Ref, int] | None = None  # (event bitfield, power-failure mask)

    def telemetry(self, values: Sequence[Any]) -> Telemetry:
        state = OperatingState.RUNNING
        if self.states:
            state = OperatingState.UNKNOWN
            for ref, table in self.states:
                raw = _enum(values, ref)
                if raw is not None:
                    state = table.get(raw, OperatingState.UNKNOWN)
                    break
        limit: float | None = None
        if self.limit is not None:
            pct_ref, ena_ref = self.limit
            enabled = _enum(values, ena_ref)
            disabled = enabled == ena_ref.symbols.get("DISABLED", 0)
            limit = 100.0 if disabled else _scaled(values, pct_ref)
        grid_ok: bool | None = None
        if self.grid_failure is not None:
            events = _enum(values, self.grid_failure[0])
            grid_ok = None if events is None else not events & self.grid_failure[1]
        return Telemetry(
            ts=time.time(),
            state=state,
            power_w=_first(values, self.power),
            energy_out_wh=_first(values, self.energy_out),
            energy_in_wh=_first(values, self.energy_in),
            voltage_v=_first(values, self.voltage),
            current_a=_first(values, self.current),
            frequency_hz=_first(values, self.frequency),
            temperature_c=_first(values, self.temperature),
            soc_pct=_first(values, self.soc),
            soh_pct=_first(values, self.soh),
            power_limit_pct=limit,
            grid_ok=grid_ok,
        )


@dataclass(frozen=True, slots=True)
class _Device:
    """Everything a probe learnt: the models, the kind, and the compiled plans."""

    info: DeviceInfo
    models: Mapping[int, _Model]
    plan: _TelemetryPlan
    limit_model: _Model | None  # 704 or 123
    battery_model: _Model | None  # 704 or 124
    control_plan: _ReadPlan | None  # scale factors (and 124 WChaMax) read before a write


# --------------------------------------------------------------------------------------------- driver


class SunSpecDriver:
    """One SunSpec device over Modbus TCP (``modbus://HOST:PORT?unit=N``)."""

    protocol: ClassVar[str] = "sunspec-modbus"
    schemes: ClassVar[tuple[str, ...]] = ("modbus",)

    def __init__(self, address: Address, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.address = address
        self._timeout = timeout
        self._client: AsyncModbusTcpClient | None = None
        self._device: _Device | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SunSpecDriver({self.address})"

    # ---------------------------------------------------------------------------------- public API

    async def probe(self) -> DeviceInfo:
        async with self._lock:
            try:
                self._device = None
                device = await self._probe()
            except BaseException as err:
                raise self._failure("probe", err)  # noqa: B904 (chained inside)
            self._device = device
            return device.info

    async def read(self) -> Telemetry:
        async with self._lock:
            try:
                device = self._device or await self._reprobe()
                values = await self._fetch(device.plan.fetch)
                return device.plan.telemetry(values)
            except BaseException as err:
                raise self._failure("read", err)  # noqa: B904 (chained inside)

    async def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
        async with self._lock:
            try:
                device = self._device or await self._reprobe()
                await self._apply(device, setpoint, revert_after_s)
            except BaseException as err:
                raise self._failure("apply", err)  # noqa: B904 (chained inside)

    async def close(self) -> None:
        self._drop_connection()

    # ------------------------------------------------------------------------------------ failures

    def _failure(self, operation: str, err: BaseException) -> BaseException:
        """Log why ``operation`` failed and return the exception to raise (chained to the cause)."""
        if not isinstance(err, Exception):  # cancelled (a caller's deadline), interrupted
            self._drop_connection()  # a request may still be in flight: never reuse that stream
            return err
        if isinstance(err, _ExceptionReply):
            wrapped: DeviceError = ProtocolError(
                f"reading {err.count} registers at {err.address} failed: {err.reason}"
            )
            wrapped.__cause__ = err
            err = wrapped
        elif not isinstance(err, DeviceError):
            _LOGGER.exception("SunSpec %s of %s failed unexpectedly", operation, self.address)
            wrapped = ProtocolError(f"unexpected failure: {err!r}")
            wrapped.__cause__ = err
            err = wrapped
        if isinstance(err, NotSupported):
            level = logging.DEBUG
        elif isinstance(err, DeviceUnreachable):
            level = logging.INFO
        else:
            level = logging.WARNING
        _LOGGER.log(level, "SunSpec %s of %s failed: %s", operation, self.address, err)
        return err

    # ---------------------------------------------------------------------------------- transport

    def _drop_connection(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def _connected(self) -> AsyncModbusTcpClient:
        client = self._client
        if client is not None and client.connected:
            return client
        self._drop_connection()
        client = AsyncModbusTcpClient(
            self.address.host,
            port=self.address.port,
            name=f"sunspec {self.address}",
            timeout=self._timeout + 1.0,  # our own deadline below fires first
            retries=0,
            reconnect_delay=0,  # no background reconnection: the next call reconnects
            reconnect_delay_max=0,
        )
        try:
            async with asyncio.timeout(self._timeout):
                connected = await client.connect()
        except TimeoutError:
            connected = False
        except BaseException:
            client.close()
            raise
        if not connected:
            client.close()
            raise DeviceUnreachable(
                f"cannot connect to {self.address.host}:{self.address.port} "
                f"(refused, or no answer within {self._timeout:g} s)"
            )
        self._client = client
        return client

    async def _read(self, address: int, count: int) -> list[int]:
        """``count`` holding registers; raises ``_ExceptionReply`` for a Modbus exception answer."""
        client = await self._connected()
        try:
            async with asyncio.timeout(self._timeout):
                reply = await client.read_holding_registers(address, count=count, device_id=self.address.unit)
        except TimeoutError as err:
            self._drop_connection()
            raise DeviceUnreachable(
                f"no answer within {self._timeout:g} s to a read of {count} registers at {address}"
            ) from err
        except (ConnectionException, ModbusIOException) as err:
            self._drop_connection()
            raise DeviceUnreachable(f"connection lost reading {count} registers at {address}: {err}") from err
        except ModbusException as err:
            self._drop_connection()
            raise ProtocolError(
                f"malformed reply to a read of {count} registers at {address}: {err}"
            ) from err
        if reply.isError():
            raise _ExceptionReply(reply.exception_code, address, count)
        registers = list(reply.registers)
        if len(registers) != count:
            raise ProtocolError(f"short read: asked {count} registers at {address}, got {len(registers)}")
        return registers

    async def _write(self, address: int, registers: list[int], what: str) -> None:
        client = await self._connected()
        try:
            async with asyncio.timeout(self._timeout):
                reply = await client.write_registers(address, registers, device_id=self.address.unit)
        except TimeoutError as err:
            self._drop_connection()
            raise DeviceUnreachable(f"no answer within {self._timeout:g} s to the write of {what}") from err
        except (ConnectionException, ModbusIOException) as err:
            self._drop_connection()
            raise DeviceUnreachable(f"connection lost writing {what}: {err}") from err
        except ModbusException as err:
            self._drop_connection()
            raise ProtocolError(f"malformed reply to the write of {what}: {err}") from err
        if reply.isError():
            reason = _ExceptionReply(reply.exception_code, address, len(registers)).reason
            raise CommandRejected(f"the module refused {what} at {address}: {reason}")

    async def _fetch(self, plan: _ReadPlan) -> list[Any]:
        values: list[Any] = []
        for region in plan.regions:
            try:
                registers = await self._read(region.address, region.count)
            except _ExceptionReply as err:
                raise ProtocolError(
                    f"reading {region.description} ({region.count} registers at {region.address}) failed: "
                    f"{err.reason}; the register map is shorter than its model chain says"
                ) from err
            values.extend(region.fields.unpack(region.registers.pack(*registers)))
        for index, model_id, address in plan.id_checks:
            if values[index] != model_id:
                self._device = None  # the map changed (firmware update?): probe again next time
                raise ProtocolError(f"model {model_id} is no longer at {address} (found id {values[index]})")
        return values

    # --------------------------------------------------------------------------------------- probe

    async def _reprobe(self) -> _Device:
        self._device = await self._probe()
        return self._device

    async def _probe(self) -> _Device:
        base = await self._find_marker()
        chain = await self._walk_chain(base)
        models: dict[int, _Model] = {}
        for model in chain:
            models.setdefault(model.model_id, model)  # the first instance of a model is the one used
        ids = [model.model_id for model in chain]
        if 1 not in models:
            raise ProtocolError(f"the model chain at {base} has no common model (1): models {ids}")
        meter = next((m for m in ids if m in _METER_MODELS), None)
        inverter = next((m for m in ids if m in _INVERTER_MODELS), None)
        der = 701 if 701 in models else None
        storage = [m for m in _STORAGE_MODELS if m in models]
        if meter is not None:
            kind = DeviceKind.METER
        elif storage:
            kind = DeviceKind.ENERGYSTORAGE
        elif der is not None or inverter is not None:
            kind = DeviceKind.MICROINVERTER
        else:
            raise NotSupported(
                f"SunSpec device with models {ids} has no inverter (101-103, 701), storage (124, 713, 802) "
                "or meter (201-204) model"
            )
        if kind is DeviceKind.ENERGYSTORAGE and der is None and inverter is None:
            raise NotSupported(
                f"SunSpec storage with models {ids} has no inverter model (101-103, 701) for its power"
            )
        ac_model = der if der is not None else inverter
        if kind is DeviceKind.METER:
            used = {1, meter}
        else:
            used = {1, *storage, *(m for m in (120, 123, 702, 704) if m in models)}
            if ac_model is not None:
                used.add(ac_model)
        for model_id in sorted(m for m in used if m is not None):
            models[model_id] = self._with_layout(models[model_id])

        identity = await self._identity(models[1])
        plan = self._telemetry_plan(kind, models, meter, der, inverter)
        capabilities, control_plan = await self._capabilities(kind, models)
        limit_model = battery_model = None
        if kind is DeviceKind.MICROINVERTER:
            limit_model = models.get(704) or models.get(123)
        elif kind is DeviceKind.ENERGYSTORAGE:
            battery_model = models.get(704) or models.get(124)
        controllable = limit_model is not None or battery_model is not None
        if not controllable:
            capabilities = replace(capabilities, controllable=False)
        info = DeviceInfo(kind=kind, identity=identity, capabilities=capabilities)
        device = _Device(info, models, plan, limit_model, battery_model, control_plan)
        # One full read now, so that a device with broken scale factors is rejected at probe time.
        device.plan.telemetry(await self._fetch(plan.fetch))
        _LOGGER.debug(
            "SunSpec %s at %s: %s %s, models %s",
            kind.value,
            self.address,
            identity.vendor,
            identity.serial,
            ids,
        )
        return device

    async def _find_marker(self) -> int:
        seen: list[str] = []
        for base in BASE_ADDRESSES:
            try:
                registers = await self._read(base, 2)
            except _ExceptionReply as err:
                seen.append(f"{base}: {err.reason}")
                continue
            if tuple(registers) == SUNS_MARKER:
                return base
            data = struct.pack(">2H", *registers)
            if data in _NEAR_MARKERS or data.lower() == b"suns":
                raise ProtocolError(
                    f"wrong SunSpec marker at {base}: {data!r} instead of b'SunS' (byte order?)"
                )
            seen.append(f"{base}: {data!r}")
        raise NotSupported(f"no SunS marker at {', '.join(map(str, BASE_ADDRESSES))} ({'; '.join(seen)})")

    async def _walk_chain(self, base: int) -> list[_Model]:
        chain: list[_Model] = []
        address = base + 2
        for _ in range(_MAX_MODELS):
            if address + 1 > 0xFFFF:
                raise ProtocolError(f"the model chain runs past the end of the register space at {address}")
            try:
                model_id, length = await self._read(address, 2)
            except _ExceptionReply as err:
                # Some devices do not answer for the L of the end model: look at its ID alone.
                try:
                    (model_id,) = await self._read(address, 1)
                except _ExceptionReply:
                    model_id = -1
                if model_id != END_MODEL_ID:
                    raise ProtocolError(
                        f"the model chain is broken at {address}: {err.reason} (no end model 0xFFFF)"
                    ) from err
                return chain
            if model_id == END_MODEL_ID:
                return chain
            if model_id == 0:
                raise ProtocolError(f"the model chain is broken at {address}: model id 0")
            chain.append(_Model(model_id, address, length))
            address += 2 + length
        raise ProtocolError(f"the model chain at {base} has no end model after {_MAX_MODELS} models")

    @staticmethod
    def _with_layout(model: _Model) -> _Model:
        try:
            layout = model_layout(model.model_id)
        except UnknownModel as err:  # only models the hub uses get here, and pysunspec2 defines them all
            raise ProtocolError(str(err)) from err
        if model.length not in layout.accepted_lengths:
            need = " or ".join(map(str, layout.accepted_lengths))
            raise ProtocolError(
                f"model {model.model_id} at {model.address} has length {model.length}, "
                f"its definition needs {need}"
            )
        return _Model(model.model_id, model.address, model.length, layout)

    async def _identity(self, common: _Model) -> Identity:
        names = ("Mn", "Md", "Vr", "SN")
        plan = _compile([(common, names)])
        values = await self._fetch(plan)
        text = {name: decode_string(values[plan.refs[f"1.{name}"].index]) for name in names}
        if not text["Mn"]:
            raise ProtocolError(f"model 1 at {common.address} has no manufacturer (Mn)")
        if not text["SN"]:
            raise ProtocolError(f"model 1 at {common.address} has no serial number (SN)")
        return Identity(vendor=text["Mn"], model=text["Md"], serial=text["SN"], firmware_version=text["Vr"])

    @staticmethod
    def _telemetry_plan(
        kind: DeviceKind,
        models: Mapping[int, _Model],
        meter: int | None,
        der: int | None,
        inverter: int | None,
    ) -> _TelemetryPlan:
        wanted: list[tuple[_Model, tuple[str, ...]]] = []
        names: tuple[str, ...]
        if kind is DeviceKind.METER:
            assert meter is not None
            wanted.append((models[meter], ("W", "TotWhImp", "TotWhExp", "PhV", "PhVphA", "A", "Hz", "Evt")))
        else:
            if der is not None:
                names = ("W", "TotWhInj", "TotWhAbs", "LNV", "VL1", "A", "Hz", "TmpCab", "TmpSnk", "TmpAmb")
                wanted.append((models[701], (*names, "InvSt", "St")))
            else:
                assert inverter is not None
                names = ("W", "WH", "PhVphA", "A", "Hz", "TmpCab", "TmpSnk", "TmpOt", "St")
                wanted.append((models[inverter], names))
            if kind is DeviceKind.MICROINVERTER:
                if 704 in models:
                    wanted.append((models[704], ("WMaxLimPct", "WMaxLimPctEna")))
                elif 123 in models:
                    wanted.append((models[123], ("WMaxLimPct", "WMaxLim_Ena")))
            else:
                soc_points: tuple[tuple[int, tuple[str, ...]], ...] = (
                    (802, ("SoC", "SoH")),
                    (713, ("SoC", "SoH")),
                    (124, ("ChaState",)),
                )
                for model_id, soc_names in soc_points:
                    if model_id in models:
                        wanted.append((models[model_id], soc_names))
        fetch = _compile(wanted)
        if kind is DeviceKind.METER:
            assert meter is not None
            evt = fetch.ref(meter, "Evt")
            assert evt is not None
            failure = 1 << evt.symbols["M_EVENT_Power_Failure"]
            return _TelemetryPlan(
                fetch=fetch,
                power=fetch.refs_of([(meter, "W")]),  # SunSpec meters: positive = import, as the hub
                energy_out=fetch.refs_of([(meter, "TotWhImp")]),
                energy_in=fetch.refs_of([(meter, "TotWhExp")]),
                voltage=fetch.refs_of([(meter, "PhV"), (meter, "PhVphA")]),
                current=fetch.refs_of([(meter, "A")]),
                frequency=fetch.refs_of([(meter, "Hz")]),
                grid_failure=(evt, failure),
            )
        limit = None
        for model_id, ena in ((704, "WMaxLimPctEna"), (123, "WMaxLim_Ena")):
            pct_ref, ena_ref = fetch.ref(model_id, "WMaxLimPct"), fetch.ref(model_id, ena)
            if pct_ref is not None and ena_ref is not None:
                limit = (pct_ref, ena_ref)
                break
        if der is not None:
            st = fetch.ref(701, "St")
            assert st is not None
            on_off = {st.symbols["OFF"]: OperatingState.OFF, st.symbols["ON"]: OperatingState.RUNNING}
            inv_st = fetch.ref(701, "InvSt")
            assert inv_st is not None
            return _TelemetryPlan(
                fetch=fetch,
                power=fetch.refs_of([(701, "W")]),  # DER sign: positive = injecting, as the hub
                energy_out=fetch.refs_of([(701, "TotWhInj")]),
                energy_in=fetch.refs_of([(701, "TotWhAbs")]),
                voltage=fetch.refs_of([(701, "LNV"), (701, "VL1")]),
                current=fetch.refs_of([(701, "A")]),
                frequency=fetch.refs_of([(701, "Hz")]),
                temperature=fetch.refs_of([(701, "TmpCab"), (701, "TmpSnk"), (701, "TmpAmb")]),
                soc=fetch.refs_of([(802, "SoC"), (713, "SoC"), (124, "ChaState")]),
                soh=fetch.refs_of([(802, "SoH"), (713, "SoH")]),
                states=((inv_st, state_table(701, "InvSt")), (st, on_off)),
                limit=limit,
            )
        assert inverter is not None
        st = fetch.ref(inverter, "St")
        assert st is not None
        return _TelemetryPlan(
            fetch=fetch,
            power=fetch.refs_of([(inverter, "W")]),  # inverter sign: positive = producing, as the hub
            energy_out=fetch.refs_of([(inverter, "WH")]),
            voltage=fetch.refs_of([(inverter, "PhVphA")]),
            current=fetch.refs_of([(inverter, "A")]),
            frequency=fetch.refs_of([(inverter, "Hz")]),
            temperature=fetch.refs_of([(inverter, "TmpCab"), (inverter, "TmpSnk"), (inverter, "TmpOt")]),
            soc=fetch.refs_of([(802, "SoC"), (713, "SoC"), (124, "ChaState")]),
            soh=fetch.refs_of([(802, "SoH"), (713, "SoH")]),
            states=((st, state_table(inverter, "St")),),
            limit=limit,
        )

    async def _capabilities(
        self, kind: DeviceKind, models: Mapping[int, _Model]
    ) -> tuple[Capabilities, _ReadPlan | None]:
        if kind is DeviceKind.METER:
            return Capabilities(controllable=False), None
        points = {
            120: ("WRtg", "WHRtg", "MaxChaRte", "MaxDisChaRte"),
            702: ("WMaxRtg", "WChaRteMaxRtg", "WDisChaRteMaxRtg"),
            713: ("WHRtg",),
            802: ("WHRtg", "WChaRteMax", "WDisChaRteMax", "SoCMax", "SoCMin", "SocRsvMax", "SoCRsvMin"),
            124: ("WChaMax", "MinRsvPct"),
        }
        wanted = [(models[m], names) for m, names in points.items() if m in models]
        control: list[tuple[_Model, tuple[str, ...]]] = []
        if kind is DeviceKind.MICROINVERTER:
            if 704 in models:
                control.append((models[704], ("WMaxLimPct",)))
            elif 123 in models:
                control.append((models[123], ("WMaxLimPct",)))
        elif 704 in models:
            control.append((models[704], ("WSet",)))
        elif 124 in models:
            control.append((models[124], ("WChaMax", "OutWRte")))
        control_plan = _compile(control) if control else None
        if not wanted:
            return Capabilities(), control_plan
        plan = _compile(wanted)
        values = await self._fetch(plan)

        def first(*pairs: tuple[int, str]) -> float | None:
            return _first(values, plan.refs_of(pairs))

        rated = first((120, "WRtg"), (702, "WMaxRtg"))
        if kind is DeviceKind.MICROINVERTER:
            return Capabilities(rated_power_w=rated), control_plan
        max_charge = first((702, "WChaRteMaxRtg"), (802, "WChaRteMax"), (120, "MaxChaRte"), (124, "WChaMax"))
        max_discharge = first(
            (702, "WDisChaRteMaxRtg"), (802, "WDisChaRteMax"), (120, "MaxDisChaRte"), (124, "WChaMax")
        )
        return (
            Capabilities(
                rated_power_w=rated if rated is not None else max_discharge,
                capacity_wh=first((713, "WHRtg"), (802, "WHRtg"), (120, "WHRtg")),
                max_charge_w=max_charge,
                max_discharge_w=max_discharge,
                min_soc_pct=first((802, "SoCRsvMin"), (802, "SoCMin"), (124, "MinRsvPct")),
                max_soc_pct=first((802, "SocRsvMax"), (802, "SoCMax")),
            ),
            control_plan,
        )

    # --------------------------------------------------------------------------------------- apply

    async def _apply(self, device: _Device, setpoint: Setpoint, revert_after_s: float | None) -> None:
        kind = device.info.kind
        if setpoint.on is not None:
            raise NotSupported("SunSpec devices have no relay: 'on' is for smart plugs")
        if kind is DeviceKind.METER:
            if setpoint.release or setpoint.is_empty():
                return
            raise NotSupported("a SunSpec meter takes no setpoints")
        if kind is DeviceKind.MICROINVERTER:
            if setpoint.battery_power_w is not None and not setpoint.release:
                raise NotSupported("battery_power_w is for energy storage; this is an inverter")
            model = device.limit_model
            if model is None:
                raise NotSupported("this inverter has no control model (123 or 704)")
            if setpoint.release:
                await self._release(model, "WMaxLimPctEna" if model.model_id == 704 else "WMaxLim_Ena")
            elif setpoint.power_limit_pct is not None:
                await self._write_limit(device, model, setpoint.power_limit_pct, revert_after_s)
            return
        if setpoint.power_limit_pct is not None and not setpoint.release:
            raise NotSupported("power_limit_pct is for inverters; use battery_power_w for energy storage")
        model = device.battery_model
        if model is None:
            raise NotSupported("this storage has no control model (124 or 704)")
        if setpoint.release:
            await self._release(model, "WSetEna" if model.model_id == 704 else "StorCtl_Mod")
        elif setpoint.battery_power_w is not None:
            if model.model_id == 704:
                await self._write_wset(device, model, setpoint.battery_power_w, revert_after_s)
            else:
                await self._write_124(device, model, setpoint.battery_power_w, revert_after_s)

    async def _control_values(self, device: _Device) -> tuple[_ReadPlan, list[Any]]:
        """Fresh scale factors (and 124 WChaMax) just before a write: legacy models may change them."""
        plan = device.control_plan
        assert plan is not None
        return plan, await self._fetch(plan)

    @staticmethod
    def _sf(plan: _ReadPlan, values: Sequence[Any], model: _Model, name: str) -> int:
        ref = plan.ref(model.model_id, name)
        assert ref is not None
        if ref.sf_index < 0:
            return ref.sf_fixed
        sf = int(values[ref.sf_index])
        if sf == _SF_UNIMPLEMENTED or not SF_MIN <= sf <= SF_MAX:
            raise ProtocolError(f"cannot write {ref.label}: its scale factor {ref.sf_label} is {sf}")
        return sf

    @staticmethod
    def _raw(model: _Model, name: str, value: float, sf: int) -> int:
        try:
            return scale_to_raw(model.point(name), value, sf, clamp=False)
        except ValueError as err:
            raise CommandRejected(f"cannot write {model.model_id}.{name}: {err}") from err

    @staticmethod
    def _revert_raw(model: _Model, name: str, revert_after_s: float | None) -> int:
        """Seconds for a revert timer point; 0 (no revert) without ``revert_after_s``."""
        if revert_after_s is None:
            return 0
        limit = (1 << (16 * model.point(name).size)) - 2
        return min(max(1, math.ceil(revert_after_s)), limit)

    @staticmethod
    def _block(model: _Model, raws: Mapping[str, int]) -> tuple[int, list[int]]:
        """The start address and registers of contiguous points ``raws`` (name -> raw), in address order."""
        points = sorted((model.point(name) for name in raws), key=lambda p: p.offset)
        registers: list[int] = []
        cursor = points[0].offset
        for point in points:
            if point.offset != cursor:
                raise AssertionError(
                    f"{point.name} does not follow the previous point in model {model.model_id}"
                )
            data = struct.pack(">" + point.struct_code, raws[point.name])
            registers.extend(struct.unpack(f">{point.size}H", data))
            cursor += point.size
        return model.address + points[0].offset, registers

    async def _write_points(self, model: _Model, raws: Mapping[str, int], what: str) -> None:
        address, registers = self._block(model, raws)
        await self._write(address, registers, what)

    async def _release(self, model: _Model, enable: str) -> None:
        await self._write_points(model, {enable: 0}, f"{model.model_id}.{enable} = 0 (release)")

    async def _write_limit(
        self, device: _Device, model: _Model, pct: float, revert_after_s: float | None
    ) -> None:
        plan, values = await self._control_values(device)
        sf = self._sf(plan, values, model, "WMaxLimPct")
        raw = self._raw(model, "WMaxLimPct", pct, sf)
        what = f"{model.model_id}.WMaxLimPct = {pct:g} %"
        if model.model_id == 704:
            enabled = model.point("WMaxLimPctEna").symbol("ENABLED")
            raws = {
                "WMaxLimPctEna": enabled,
                "WMaxLimPct": raw,
                "WMaxLimPctRvrt": self._raw(model, "WMaxLimPctRvrt", 100.0, sf),
                "WMaxLimPctEnaRvrt": model.point("WMaxLimPctEnaRvrt").symbol("DISABLED"),
                "WMaxLimPctRvrtTms": self._revert_raw(model, "WMaxLimPctRvrtTms", revert_after_s),
            }
        else:
            raws = {
                "WMaxLimPct": raw,
                "WMaxLimPct_WinTms": 0,
                "WMaxLimPct_RvrtTms": self._revert_raw(model, "WMaxLimPct_RvrtTms", revert_after_s),
                "WMaxLimPct_RmpTms": 0,
                "WMaxLim_Ena": model.point("WMaxLim_Ena").symbol("ENABLED"),
            }
        await self._write_points(model, raws, what)

    async def _write_wset(
        self, device: _Device, model: _Model, watts: float, revert_after_s: float | None
    ) -> None:
        plan, values = await self._control_values(device)
        sf = self._sf(plan, values, model, "WSet")
        raws = {
            "WSetEna": model.point("WSetEna").symbol("ENABLED"),
            "WSetMod": model.point("WSetMod").symbol("WATTS"),
            "WSet": self._raw(model, "WSet", watts, sf),  # DER sign: positive = discharge, as the hub
            "WSetRvrt": 0,
            "WSetPct": 0,
            "WSetPctRvrt": 0,
            "WSetEnaRvrt": model.point("WSetEnaRvrt").symbol("DISABLED"),
            "WSetRvrtTms": self._revert_raw(model, "WSetRvrtTms", revert_after_s),
        }
        await self._write_points(model, raws, f"704.WSet = {watts:g} W")

    async def _write_124(
        self, device: _Device, model: _Model, watts: float, revert_after_s: float | None
    ) -> None:
        """Model 124: a fixed power is the window [-InWRte, +OutWRte] (% of WChaMax) closed to one point."""
        plan, values = await self._control_values(device)
        ref = plan.ref(124, "WChaMax")
        assert ref is not None
        w_max = _scaled(values, ref)
        if not w_max:
            raise NotSupported("model 124 has no WChaMax, so a battery power cannot be expressed")
        sf = self._sf(plan, values, model, "OutWRte")
        pct = watts / w_max * 100
        raws = {
            "OutWRte": self._raw(model, "OutWRte", pct, sf),
            "InWRte": self._raw(model, "InWRte", -pct, sf),
            "InOutWRte_WinTms": 0,
            "InOutWRte_RvrtTms": self._revert_raw(model, "InOutWRte_RvrtTms", revert_after_s),
        }
        what = f"124.OutWRte/InWRte = {pct:g} % of {w_max:g} W"
        await self._write_points(model, raws, what)
        mode = model.point("StorCtl_Mod")
        both = (1 << mode.symbol("CHARGE")) | (1 << mode.symbol("DiSCHARGE"))
        await self._write_points(model, {"StorCtl_Mod": both}, f"124.StorCtl_Mod = {both} ({what})")
