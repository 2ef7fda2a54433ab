"""A simulated module on the network as a SunSpec device over Modbus TCP (a real pymodbus server).

``start_sunspec_server`` builds a SunSpec register map for one ``SimulatedModule`` from the official model
definitions (``devices.sunspec_map``, which reads pysunspec2's model files): model 1 from the module's
identity, then the models of the chosen profile ("legacy": 1+120+103+123 for an inverter, 1+120+103+124+802
for a battery; "der": 1+701+702+704 and 1+701+702+704+713+802; a meter is 1+203 in both), then the end
model.  The map lives in a pymodbus ``SimDevice`` whose action hook does the work: on a read it refreshes
the measured points from ``module.telemetry()`` (at most every ``REFRESH_S``, and right after any write), so
200 servers in one process stay cheap; on a write it checks that every register belongs to a writable
point, and when the write touches a control's enable point (123 ``WMaxLim_Ena``, 704 ``WMaxLimPctEna`` /
``WSetEna``, 124 ``StorCtl_Mod``) it turns the control block into a ``Setpoint`` for ``module.apply``.  A
``ValueError`` from the module becomes the Modbus exception ILLEGAL_DATA_VALUE and the write is not stored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from devices.drivers.base import Address
from devices.model import DeviceKind, OperatingState, Setpoint, Telemetry
from devices.sim.base import SimulatedModule
from devices.sunspec_map import (
    END_MODEL_ID,
    SUNS_MARKER,
    ModelLayout,
    PointDef,
    encode_raw,
    model_layout,
    scale_to_raw,
    state_to_sunspec,
)

__all__ = ["PROFILES", "REFRESH_S", "SunSpecSimServer", "profile_models", "start_sunspec_server"]

_LOGGER = logging.getLogger(__name__)

#: Measured points are refreshed from the module at most this often (and right after a write).
REFRESH_S = 0.1
PROFILES = ("legacy", "der")

_MODELS: dict[tuple[str, DeviceKind], tuple[int, ...]] = {
    ("legacy", DeviceKind.MICROINVERTER): (1, 120, 103, 123),
    ("legacy", DeviceKind.ENERGYSTORAGE): (1, 120, 103, 124, 802),
    ("legacy", DeviceKind.METER): (1, 203),
    ("der", DeviceKind.MICROINVERTER): (1, 701, 702, 704),
    ("der", DeviceKind.ENERGYSTORAGE): (1, 701, 702, 704, 713, 802),
    ("der", DeviceKind.METER): (1, 203),
}

#: The scale factors the simulator reports (fixed, as most real devices do); ratings get one that fits.
_FIXED_SF: dict[str, int] = {
    "A_SF": -2,
    "V_SF": -1,
    "W_SF": 0,
    "Hz_SF": -2,
    "VA_SF": 0,
    "VAr_SF": 0,
    "VAR_SF": 0,
    "Var_SF": 0,
    "PF_SF": -3,
    "WH_SF": 0,
    "TotWh_SF": 0,
    "TotVarh_SF": 0,
    "Tmp_SF": -1,
    "WMaxLimPct_SF": -2,
    "OutPFSet_SF": -3,
    "VArPct_SF": -2,
    "InOutWRte_SF": -2,
    "WChaDisChaGra_SF": 0,
    "MinRsvPct_SF": -1,
    "ChaState_SF": -1,
    "SoC_SF": -1,
    "SoH_SF": -1,
    "DoD_SF": -1,
    "CellV_SF": -3,
    "AMax_SF": 0,
    "WSet_SF": 0,
    "WSetPct_SF": -2,
    "VarSet_SF": 0,
    "VarSetPct_SF": -2,
    "Pct_SF": -1,
    "S_SF": 0,
}
_NOMINAL_VOLTAGE_V = 230.0
_BATTERY_VOLTAGE_V = 48.0


def profile_models(profile: str, kind: DeviceKind) -> tuple[int, ...]:
    """The SunSpec models a simulated module of ``kind`` offers in ``profile``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown SunSpec profile {profile!r}: use one of {', '.join(PROFILES)}")
    try:
        return _MODELS[(profile, kind)]
    except KeyError:
        raise ValueError(f"SunSpec has no device profile for a {kind.value}") from None


def _fit_sf(point: PointDef, *values: float | None) -> int:
    """The smallest scale factor (from -3, the finest) at which every value fits the point's type."""
    known = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if not known:
        return 0
    for sf in range(-3, 11):
        try:
            for v in known:
                scale_to_raw(point, v, sf, clamp=False)
        except ValueError:
            continue
        return sf
    return 10


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one point sits in the register image, and the scale factor it is reported with."""

    index: int
    point: PointDef
    sf: int | None


class _Image:
    """A SunSpec register map: the ``SunS`` marker, the models in order, the end model.

    ``regs[i]`` is the register at ``base + i``.  Points are addressed as ``(model_id, point_name)``.
    """

    def __init__(self, model_ids: Sequence[int]) -> None:
        self.regs: list[int] = list(SUNS_MARKER)
        self.layouts: dict[int, ModelLayout] = {}
        self.starts: dict[int, int] = {}
        for model_id in model_ids:
            layout = model_layout(model_id)
            self.layouts[model_id] = layout
            self.starts[model_id] = len(self.regs)
            for point in layout.points.values():
                self.regs.extend(encode_raw(point, None))
            self.regs[self.starts[model_id]] = model_id
            self.regs[self.starts[model_id] + 1] = layout.length
        self.regs.extend((END_MODEL_ID, 0))
        self.writable = bytearray(len(self.regs))
        for model_id, layout in self.layouts.items():
            for point in layout.points.values():
                if point.writable:
                    first = self.starts[model_id] + point.offset
                    self.writable[first : first + point.size] = b"\1" * point.size
        self._slots: dict[tuple[int, str], _Slot] = {}

    def has(self, model_id: int) -> bool:
        return model_id in self.layouts

    def point(self, model_id: int, name: str) -> tuple[int, PointDef]:
        point = self.layouts[model_id].point(name)
        return self.starts[model_id] + point.offset, point

    def set_raw(self, model_id: int, name: str, raw: int | float | str | None) -> None:
        index, point = self.point(model_id, name)
        self.regs[index : index + point.size] = encode_raw(point, raw)

    def set_sf(self, model_id: int, name: str, sf: int) -> None:
        self.set_raw(model_id, name, sf)

    def freeze_slots(self) -> None:
        """Resolve every scaled point's scale factor once the static part of the image is written."""
        for model_id, layout in self.layouts.items():
            for point in layout.points.values():
                index = self.starts[model_id] + point.offset
                sf: int | None = None
                if isinstance(point.sf, int):
                    sf = point.sf
                elif isinstance(point.sf, str):
                    sf_raw = self.get_raw(self.regs, model_id, point.sf)
                    sf = int(sf_raw) if isinstance(sf_raw, int) else None
                self._slots[(model_id, point.name)] = _Slot(index, point, sf)

    def slot(self, model_id: int, name: str) -> _Slot:
        return self._slots[(model_id, name)]

    def put(self, regs: list[int], model_id: int, name: str, value: float | None) -> None:
        """Write an engineering value into ``regs`` with the point's frozen scale factor."""
        slot = self._slots[(model_id, name)]
        if value is None or not math.isfinite(value):
            raw: int | None = None
        elif slot.sf is None:
            raw = scale_to_raw(slot.point, value, 0, clamp=True)
        else:
            raw = scale_to_raw(slot.point, value, slot.sf, clamp=True)
        regs[slot.index : slot.index + slot.point.size] = encode_raw(slot.point, raw)

    def get_raw(self, regs: Sequence[int], model_id: int, name: str) -> int | float | bytes | None:
        """A point's raw value in ``regs`` (``None`` when it holds the not-implemented sentinel)."""
        index, point = self.point(model_id, name)
        data = struct.pack(f">{point.size}H", *regs[index : index + point.size])
        (value,) = struct.unpack(">" + point.struct_code, data)
        if isinstance(value, float) and math.isnan(value):
            return None
        if value == point.unimplemented:
            return None
        return value  # type: ignore[no-any-return]

    def get_int(self, regs: Sequence[int], model_id: int, name: str) -> int | None:
        value = self.get_raw(regs, model_id, name)
        return value if isinstance(value, int) else None

    def get_scaled(self, regs: Sequence[int], model_id: int, name: str) -> float | None:
        value = self.get_int(regs, model_id, name)
        if value is None:
            return None
        point = self.layouts[model_id].point(name)
        sf = point.sf if isinstance(point.sf, int) else None
        if isinstance(point.sf, str):
            sf = self.get_int(regs, model_id, point.sf)
            if sf is None:
                raise ValueError(f"scale factor {point.sf} of {name} is not implemented")
        return float(value) if not sf else value * 10.0**sf

    def touched(self, model_id: int, name: str, first: int, count: int) -> bool:
        index, point = self.point(model_id, name)
        return index < first + count and first < index + point.size


class _SunSpecDevice:
    """The register map of one simulated module, and the hook pymodbus calls on every access."""

    def __init__(self, module: SimulatedModule, *, unit: int, profile: str) -> None:
        self.module = module
        info = module.info
        self.kind = info.kind
        self.models = profile_models(profile, self.kind)
        self.image = _Image(self.models)
        self._caps = info.capabilities
        self._unit = unit
        self._refreshed_at = -math.inf
        self._stale = True
        self._build_static()
        self.image.freeze_slots()
        self.refresh(self.image.regs)

    # -------------------------------------------------------------------------------- static part

    def _build_static(self) -> None:
        img = self.image
        info = self.module.info
        ident = info.identity
        caps = self._caps
        for name, sf in _FIXED_SF.items():
            for model_id, layout in img.layouts.items():
                if name in layout.points:
                    img.set_sf(model_id, name, sf)
        img.set_raw(1, "Mn", ident.vendor)
        img.set_raw(1, "Md", ident.model)
        img.set_raw(1, "Opt", "")
        img.set_raw(1, "Vr", ident.firmware_version)
        img.set_raw(1, "SN", ident.serial)
        img.set_raw(1, "DA", self._unit)
        storage = self.kind is DeviceKind.ENERGYSTORAGE
        rated = caps.rated_power_w
        max_charge = caps.max_charge_w if caps.max_charge_w is not None else rated
        max_discharge = caps.max_discharge_w if caps.max_discharge_w is not None else rated
        if img.has(120):
            self._rating(120, "WRtg", "WRtg_SF", rated)
            self._rating(120, "VARtg", "VARtg_SF", rated)
            self._rating(120, "ARtg", "ARtg_SF", None if rated is None else rated / _NOMINAL_VOLTAGE_V)
            var = None if rated is None else rated * 0.44
            vars_sf = _fit_sf(img.layouts[120].point("VArRtgQ1"), var)
            img.set_sf(120, "VArRtg_SF", vars_sf)
            img.set_sf(120, "PFRtg_SF", -2)
            for quadrant, sign in (("Q1", 1), ("Q2", 1), ("Q3", -1), ("Q4", -1)):
                self._put_static(120, f"VArRtg{quadrant}", None if var is None else sign * var)
                self._put_static(120, f"PFRtg{quadrant}", sign * 1.0)
            img.set_raw(
                120, "DERTyp", img.layouts[120].point("DERTyp").symbol("PV_STOR" if storage else "PV")
            )
            if storage:
                self._rating(120, "WHRtg", "WHRtg_SF", caps.capacity_wh)
                self._rating(120, "MaxChaRte", "MaxChaRte_SF", max_charge)
                self._rating(120, "MaxDisChaRte", "MaxDisChaRte_SF", max_discharge)
        if img.has(123):
            conn = img.layouts[123].point("Conn")
            img.set_raw(123, "Conn", conn.symbol("CONNECT"))
            for name in ("Conn_WinTms", "Conn_RvrtTms", "WMaxLimPct_WinTms", "WMaxLimPct_RvrtTms"):
                img.set_raw(123, name, 0)
            img.set_raw(123, "WMaxLimPct_RmpTms", 0)
            img.set_raw(123, "WMaxLim_Ena", 0)
            img.set_raw(123, "OutPFSet_Ena", 0)
            img.set_raw(123, "VArPct_Ena", 0)
            self._put_static(123, "WMaxLimPct", 100.0)
            self._put_static(123, "OutPFSet", 1.0)
        if img.has(124):
            self._rating(124, "WChaMax", "WChaMax_SF", max_charge)
            self._put_static(124, "WChaGra", 100.0)
            self._put_static(124, "WDisChaGra", 100.0)
            img.set_raw(124, "StorCtl_Mod", 0)
            self._put_static(124, "MinRsvPct", caps.min_soc_pct)
            self._put_static(124, "OutWRte", 100.0)
            self._put_static(124, "InWRte", 100.0)
            for name in ("InOutWRte_WinTms", "InOutWRte_RvrtTms", "InOutWRte_RmpTms"):
                img.set_raw(124, name, 0)
        if img.has(802):
            self._rating(
                802,
                "AHRtg",
                "AHRtg_SF",
                None if caps.capacity_wh is None else caps.capacity_wh / _BATTERY_VOLTAGE_V,
            )
            self._rating(802, "WHRtg", "WHRtg_SF", caps.capacity_wh)
            sf = _fit_sf(img.layouts[802].point("WChaRteMax"), max_charge, max_discharge)
            img.set_sf(802, "WChaDisChaMax_SF", sf)
            self._put_static(802, "WChaRteMax", max_charge)
            self._put_static(802, "WDisChaRteMax", max_discharge)
            self._put_static(802, "SoCMax", caps.max_soc_pct)
            self._put_static(802, "SoCMin", caps.min_soc_pct)
            for name, symbol in (("LocRemCtl", "REMOTE"), ("Typ", "LITHIUM_ION"), ("SetOp", "CONNECT")):
                img.set_raw(802, name, img.layouts[802].point(name).symbol(symbol))
            img.set_raw(802, "SetInvState", img.layouts[802].point("SetInvState").symbol("INVERTER_STARTED"))
            for name in ("Evt1", "Evt2", "EvtVnd1", "EvtVnd2", "AlmRst"):
                img.set_raw(802, name, 0)
            self._put_static(802, "V", _BATTERY_VOLTAGE_V)
        if img.has(701):
            img.set_raw(701, "ACType", img.layouts[701].point("ACType").symbol("SINGLE_PHASE"))
            img.set_raw(701, "ConnSt", img.layouts[701].point("ConnSt").symbol("CONNECTED"))
            img.set_raw(701, "Alrm", 0)
            self._put_static(701, "PF", 1.0)
            self._put_static(701, "Var", 0.0)
        if img.has(702):
            w_sf = _fit_sf(img.layouts[702].point("WMaxRtg"), rated, max_charge, max_discharge)
            img.set_sf(702, "W_SF", w_sf)
            img.set_sf(702, "VA_SF", w_sf)
            self._put_static(702, "WMaxRtg", rated)
            self._put_static(702, "VAMaxRtg", rated)
            self._put_static(702, "WMax", rated)
            self._put_static(702, "VAMax", rated)
            if storage:
                for name, value in (
                    ("WChaRteMaxRtg", max_charge),
                    ("WDisChaRteMaxRtg", max_discharge),
                    ("WChaRteMax", max_charge),
                    ("WDisChaRteMax", max_discharge),
                ):
                    self._put_static(702, name, value)
            for name, value in (("VNomRtg", 230.0), ("VMaxRtg", 253.0), ("VMinRtg", 207.0)):
                self._put_static(702, name, value)
                self._put_static(702, name.removesuffix("Rtg"), value)
            amps = None if rated is None else rated / _NOMINAL_VOLTAGE_V
            img.set_sf(702, "A_SF", -1 if amps is None or amps < 3000 else 0)
            self._put_static(702, "AMaxRtg", amps)
            self._put_static(702, "AMax", amps)
            modes = img.layouts[702].point("CtrlModes")
            bits = 1 << modes.symbol("MAX_W")
            if storage:
                bits |= 1 << modes.symbol("FIXED_W")
            img.set_raw(702, "CtrlModes", bits)
        if img.has(704):
            for name in ("WMaxLimPctEna", "WMaxLimPctEnaRvrt", "WSetEna", "WSetEnaRvrt"):
                img.set_raw(704, name, 0)
            img.set_raw(704, "WSetMod", img.layouts[704].point("WSetMod").symbol("WATTS"))
            for name in ("WMaxLimPctRvrtTms", "WMaxLimPctRvrtRem", "WSetRvrtTms", "WSetRvrtRem"):
                img.set_raw(704, name, 0)
            self._put_static(704, "WMaxLimPct", 100.0)
            self._put_static(704, "WMaxLimPctRvrt", 100.0)
            for name in ("WSet", "WSetRvrt", "WSetPct", "WSetPctRvrt"):
                self._put_static(704, name, 0.0)
        if img.has(713):
            self._rating(713, "WHRtg", "WH_SF", caps.capacity_wh)
            img.set_raw(713, "Sta", img.layouts[713].point("Sta").symbol("OK"))
        if img.has(203):
            img.set_raw(203, "Evt", 0)

    def _rating(self, model_id: int, name: str, sf_name: str, value: float | None) -> None:
        """A nameplate value with a scale factor chosen so that it fits."""
        point = self.image.layouts[model_id].point(name)
        sf = _fit_sf(point, value)
        self.image.set_sf(model_id, sf_name, sf)
        self._put_static(model_id, name, value)

    def _put_static(self, model_id: int, name: str, value: float | None) -> None:
        point = self.image.layouts[model_id].point(name)
        sf = 0
        if isinstance(point.sf, int):
            sf = point.sf
        elif isinstance(point.sf, str):
            sf_raw = self.image.get_int(self.image.regs, model_id, point.sf)
            sf = sf_raw if sf_raw is not None else 0
        raw = None if value is None else scale_to_raw(point, value, sf, clamp=True)
        self.image.set_raw(model_id, name, raw)

    # ------------------------------------------------------------------------------- measurements

    def refresh(self, regs: list[int]) -> None:
        """Copy the module's current measurements into ``regs``."""
        t = self.module.telemetry()
        img = self.image
        put = img.put
        if img.has(103):
            put(regs, 103, "A", t.current_a)
            put(regs, 103, "AphA", t.current_a)
            put(regs, 103, "PhVphA", t.voltage_v)
            put(regs, 103, "W", t.power_w)
            put(regs, 103, "VA", None if t.power_w is None else abs(t.power_w))
            put(regs, 103, "Hz", t.frequency_hz)
            put(regs, 103, "WH", t.energy_out_wh)
            put(regs, 103, "TmpCab", t.temperature_c)
            self._put_enum(regs, 103, "St", state_to_sunspec(103, "St", t.state))
        if img.has(701):
            on = t.state not in (OperatingState.OFF, OperatingState.OFFLINE)
            st = img.layouts[701].point("St").symbol("ON" if on else "OFF")
            self._put_enum(regs, 701, "St", st)
            self._put_enum(regs, 701, "InvSt", state_to_sunspec(701, "InvSt", t.state))
            for total, phase in (("W", "WL1"), ("A", "AL1"), ("LNV", "VL1")):
                value = {"W": t.power_w, "A": t.current_a, "LNV": t.voltage_v}[total]
                put(regs, 701, total, value)
                put(regs, 701, phase, value)
            put(regs, 701, "VA", None if t.power_w is None else abs(t.power_w))
            put(regs, 701, "Hz", t.frequency_hz)
            put(regs, 701, "TotWhInj", t.energy_out_wh)
            put(regs, 701, "TotWhAbs", t.energy_in_wh)
            put(regs, 701, "TmpCab", t.temperature_c)
        if img.has(123):
            self._put_limit(regs, 123, "WMaxLimPct", "WMaxLim_Ena", t.power_limit_pct)
        if img.has(704):
            self._put_limit(regs, 704, "WMaxLimPct", "WMaxLimPctEna", t.power_limit_pct)
        if img.has(124):
            put(regs, 124, "ChaState", t.soc_pct)
            self._put_enum(regs, 124, "ChaSt", self._charge_state(124, t))
        if img.has(802):
            put(regs, 802, "SoC", t.soc_pct)
            put(regs, 802, "SoH", t.soh_pct)
            put(regs, 802, "W", t.power_w)
            put(regs, 802, "A", None if t.power_w is None else t.power_w / _BATTERY_VOLTAGE_V)
            self._put_enum(regs, 802, "ChaSt", self._charge_state(802, t))
            state = img.layouts[802].point("State")
            self._put_enum(
                regs, 802, "State", state.symbol("FAULT" if t.state is OperatingState.FAULT else "CONNECTED")
            )
        if img.has(713):
            put(regs, 713, "SoC", t.soc_pct)
            put(regs, 713, "SoH", t.soh_pct)
            capacity = self._caps.capacity_wh
            put(
                regs,
                713,
                "WHAvail",
                None if capacity is None or t.soc_pct is None else capacity * t.soc_pct / 100,
            )
        if img.has(203):
            put(regs, 203, "A", t.current_a)
            put(regs, 203, "AphA", t.current_a)
            put(regs, 203, "PhV", t.voltage_v)
            put(regs, 203, "PhVphA", t.voltage_v)
            put(regs, 203, "Hz", t.frequency_hz)
            put(regs, 203, "W", t.power_w)  # SunSpec meters: positive = import, as the hub
            put(regs, 203, "WphA", t.power_w)
            put(regs, 203, "TotWhImp", t.energy_out_wh)
            put(regs, 203, "TotWhExp", t.energy_in_wh)
            failure = 1 << img.layouts[203].point("Evt").symbol("M_EVENT_Power_Failure")
            self._put_enum(regs, 203, "Evt", failure if t.grid_ok is False else 0)

    def _put_enum(self, regs: list[int], model_id: int, name: str, raw: int | None) -> None:
        slot = self.image.slot(model_id, name)
        regs[slot.index : slot.index + slot.point.size] = encode_raw(slot.point, raw)

    def _put_limit(self, regs: list[int], model_id: int, pct: str, ena: str, limit: float | None) -> None:
        if limit is None:
            return  # the module does not report its limit: the registers keep what the hub wrote
        self.image.put(regs, model_id, pct, limit)
        self._put_enum(regs, model_id, ena, 1 if limit < 100 else 0)

    def _charge_state(self, model_id: int, t: Telemetry) -> int:
        symbols = self.image.layouts[model_id].point("ChaSt")
        if t.power_w is None or abs(t.power_w) < 1:
            return symbols.symbol("HOLDING")
        return symbols.symbol("DISCHARGING" if t.power_w > 0 else "CHARGING")

    # -------------------------------------------------------------------------------------- writes

    def commands(self, regs: Sequence[int], first: int, count: int) -> list[tuple[Setpoint, float | None]]:
        """The setpoints a write of ``count`` registers at image index ``first`` commits (``regs``: after it).

        Raises ``ValueError`` for a control block that makes no sense.
        """
        img = self.image
        out: list[tuple[Setpoint, float | None]] = []
        if img.has(123) and img.touched(123, "WMaxLim_Ena", first, count):
            out.append(self._limit_command(regs, 123, "WMaxLim_Ena", "WMaxLimPct", "WMaxLimPct_RvrtTms"))
        if img.has(704) and img.touched(704, "WMaxLimPctEna", first, count):
            out.append(self._limit_command(regs, 704, "WMaxLimPctEna", "WMaxLimPct", "WMaxLimPctRvrtTms"))
        if img.has(704) and img.touched(704, "WSetEna", first, count):
            out.append(self._wset_command(regs))
        if img.has(124) and img.touched(124, "StorCtl_Mod", first, count):
            out.append(self._storage_command(regs))
        return out

    def _revert(self, regs: Sequence[int], model_id: int, name: str) -> float | None:
        seconds = self.image.get_int(regs, model_id, name)
        return float(seconds) if seconds else None

    def _limit_command(
        self, regs: Sequence[int], model_id: int, ena: str, pct: str, rvrt: str
    ) -> tuple[Setpoint, float | None]:
        enabled = self.image.get_int(regs, model_id, ena)
        if enabled == 0:
            return Setpoint(release=True), None
        if enabled != 1:
            raise ValueError(f"{ena} must be 0 (disabled) or 1 (enabled), not {enabled}")
        limit = self.image.get_scaled(regs, model_id, pct)
        if limit is None:
            raise ValueError(f"{pct} is not set")
        return Setpoint(power_limit_pct=limit), self._revert(regs, model_id, rvrt)

    def _wset_command(self, regs: Sequence[int]) -> tuple[Setpoint, float | None]:
        img = self.image
        enabled = img.get_int(regs, 704, "WSetEna")
        if enabled == 0:
            return Setpoint(release=True), None
        if enabled != 1:
            raise ValueError(f"WSetEna must be 0 or 1, not {enabled}")
        mode = img.get_int(regs, 704, "WSetMod")
        mod_point = img.layouts[704].point("WSetMod")
        if mode == mod_point.symbol("WATTS"):
            watts = img.get_scaled(regs, 704, "WSet")
        elif mode == mod_point.symbol("W_MAX_PCT"):
            pct = img.get_scaled(regs, 704, "WSetPct")
            rated = self._caps.rated_power_w
            if rated is None:
                raise ValueError("WSetMod W_MAX_PCT needs a rated power, which this module does not have")
            watts = None if pct is None else pct * rated / 100
        else:
            raise ValueError(f"unknown WSetMod {mode}")
        if watts is None:
            raise ValueError("WSet is not set")
        # Model 704 WSet has the DER sign: positive injects (discharges), as the hub.
        return Setpoint(battery_power_w=watts), self._revert(regs, 704, "WSetRvrtTms")

    def _storage_command(self, regs: Sequence[int]) -> tuple[Setpoint, float | None]:
        """Model 124: the charge/discharge window [-InWRte, +OutWRte] % of WChaMax; a single point is a
        fixed power; a wider window leaves the battery to its own logic (the simulator models no limits)."""
        img = self.image
        mode = img.get_int(regs, 124, "StorCtl_Mod")
        if mode is None:
            raise ValueError("StorCtl_Mod is not set")
        if mode == 0:
            return Setpoint(release=True), None
        mod_point = img.layouts[124].point("StorCtl_Mod")
        charge_limited = bool(mode & (1 << mod_point.symbol("CHARGE")))
        discharge_limited = bool(mode & (1 << mod_point.symbol("DiSCHARGE")))
        w_max = img.get_scaled(regs, 124, "WChaMax")
        if not w_max:
            raise ValueError("WChaMax is not set")
        high, low = math.inf, -math.inf
        if discharge_limited:
            out_pct = img.get_scaled(regs, 124, "OutWRte")
            if out_pct is None:
                raise ValueError("OutWRte is not set")
            high = out_pct * w_max / 100
        if charge_limited:
            in_pct = img.get_scaled(regs, 124, "InWRte")
            if in_pct is None:
                raise ValueError("InWRte is not set")
            low = -in_pct * w_max / 100
        if low > high + 1e-9:
            raise ValueError(f"empty charge/discharge window: {low:g} W .. {high:g} W")
        revert = self._revert(regs, 124, "InOutWRte_RvrtTms")
        if math.isclose(low, high, abs_tol=1e-6 * w_max):
            return Setpoint(battery_power_w=high), revert
        return Setpoint(release=True), None

    # --------------------------------------------------------------------------------- pymodbus hook

    async def action(  # noqa: PLR0917 (pymodbus calls it positionally)
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Called by pymodbus before every access; ``registers`` is the live block starting at the base."""
        del function_code, count
        if set_values is None:
            now = time.monotonic()
            if self._stale or now - self._refreshed_at >= REFRESH_S:
                self._stale = False
                self._refreshed_at = now
                try:
                    self.refresh(registers)
                except Exception:  # a broken module must not take the server down
                    _LOGGER.exception("SunSpec simulator: refreshing %s failed", self.module.info.device_id)
                    return ExcCodes.DEVICE_FAILURE
            return None
        first = address - start_address
        values = [int(v) for v in set_values]
        writable = self.image.writable
        if first < 0 or first + len(values) > len(writable) or not all(writable[first : first + len(values)]):
            return ExcCodes.ILLEGAL_ADDRESS
        after = list(registers)
        after[first : first + len(values)] = values
        try:
            commands = self.commands(after, first, len(values))
        except ValueError as err:
            _LOGGER.info("SunSpec simulator: rejected write at %s: %s", address, err)
            return ExcCodes.ILLEGAL_VALUE
        for setpoint, revert in commands:
            try:
                self.module.apply(setpoint, revert_after_s=revert)
            except ValueError as err:
                _LOGGER.info("SunSpec simulator: module refused %s: %s", setpoint, err)
                return ExcCodes.ILLEGAL_VALUE
            except Exception:
                _LOGGER.exception("SunSpec simulator: module failed on %s", setpoint)
                return ExcCodes.DEVICE_FAILURE
        self._stale = True
        return None


class SunSpecSimServer:
    """A running SunSpec Modbus TCP endpoint for one simulated module (satisfies ``SimServer``)."""

    def __init__(
        self, server: ModbusTcpServer, device: _SunSpecDevice, address: Address, profile: str
    ) -> None:
        self._server = server
        self._device = device
        self._address = address
        self._stopped = False
        self.profile = profile

    @property
    def address(self) -> Address:
        return self._address

    @property
    def module(self) -> SimulatedModule:
        return self._device.module

    @property
    def models(self) -> tuple[int, ...]:
        """The SunSpec model ids this endpoint serves, in map order (1 first)."""
        return self._device.models

    async def stop(self) -> None:
        """Close the listening socket and every client connection.  Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        listener = self._server.transport
        await self._server.shutdown()  # type: ignore[no-untyped-call]
        if isinstance(listener, asyncio.Server):
            listener.close()
            await listener.wait_closed()


async def start_sunspec_server(
    module: SimulatedModule,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    unit: int = 1,
    profile: str = "legacy",
    base_address: int = 40000,
) -> SunSpecSimServer:
    """Serve ``module`` as a SunSpec device on ``host:port`` (0: an ephemeral port, reported in ``address``).

    ``base_address`` is where the ``SunS`` marker sits (40000 by default; 0 and 50000 are the other places
    the SunSpec specification lets a device use).  Raises ``ValueError`` for an unknown profile or a module
    kind SunSpec cannot describe, ``OSError`` when the port cannot be bound.
    """
    if not 0 <= unit <= 247:
        raise ValueError("unit must be 0..247")
    device = _SunSpecDevice(module, unit=unit, profile=profile)
    if base_address + len(device.image.regs) > 0x10000:
        raise ValueError(f"a SunSpec map at {base_address} does not fit the Modbus address space")
    block = SimData(address=base_address, values=device.image.regs, datatype=DataType.REGISTERS)
    sim_device = SimDevice(id=unit, simdata=[block], action=device.action)
    server = ModbusTcpServer(sim_device, address=(host, port))
    try:
        await server.serve_forever(background=True)
    except RuntimeError as err:
        await server.shutdown()  # type: ignore[no-untyped-call]
        raise OSError(f"cannot listen on {host}:{port}") from err
    listener = server.transport
    if not isinstance(listener, asyncio.Server) or not listener.sockets:
        await server.shutdown()  # type: ignore[no-untyped-call]
        raise OSError(f"cannot listen on {host}:{port}")
    bound_port = int(listener.sockets[0].getsockname()[1])
    address = Address("modbus", host, bound_port, "", unit)
    _LOGGER.debug("SunSpec simulator for %s (%s) on %s", module.info.device_id, profile, address)
    return SunSpecSimServer(server, device, address, profile)
