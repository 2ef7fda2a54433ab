"""The ORES device model: what a module is, what it can do, what it measures and what it is told.

This is the domain layer shared by drivers, the simulator and the hub.  It knows nothing of wire protocols.
Everything here is an immutable, slotted dataclass so that a sample can be handed between tasks and threads
without copying.

Sign convention (the one rule for the whole hub)
-------------------------------------------------
``power_w`` of every device is the real AC power the device **delivers into the home's wiring**, in W:

* microinverter: positive while producing (never meaningfully negative);
* energystorage: positive while discharging, negative while charging;
* meter (the grid connection point): positive while importing from the grid, negative while exporting;
* smartplug: negative while its load consumes (a plug drawing 60 W reports ``power_w = -60``).

So the household consumption is ``load = pv + battery + grid`` (the sum of all sources' ``power_w``), and the
sum of ``power_w`` over every device on the bus, including metered loads, plus the unmetered load is zero.
Energy counters follow the same rule: ``energy_out_wh`` counts energy delivered into the home (production,
discharge, grid import), ``energy_in_wh`` energy taken from it (charge, grid export, plug consumption).

Units are part of every field name: W, Wh, V, A, Hz, °C (``_c``), % (``_pct``).  Timestamps are POSIX seconds
in UTC (``ts``); the API renders them as ISO 8601.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "Capabilities",
    "DeviceInfo",
    "DeviceKind",
    "Identity",
    "OperatingState",
    "Setpoint",
    "Telemetry",
    "make_device_id",
]


class _TolerantEnum(enum.StrEnum):
    """A string enum that maps unknown wire values to ``UNKNOWN`` instead of raising."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls.__members__.get("UNKNOWN")


class DeviceKind(_TolerantEnum):
    """What a module is.  The values are the ORES API path names."""

    MICROINVERTER = "microinverter"
    ENERGYSTORAGE = "energystorage"
    METER = "meter"
    SMARTPLUG = "smartplug"
    UNKNOWN = "unknown"


class OperatingState(_TolerantEnum):
    """Coarse operating state reported by a module (or derived by the hub for offline modules)."""

    OFF = "off"
    STARTING = "starting"
    RUNNING = "running"
    THROTTLED = "throttled"  # running below its available power because of a limit
    STANDBY = "standby"
    FAULT = "fault"
    OFFLINE = "offline"  # set by the hub when the module stops answering
    UNKNOWN = "unknown"


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def make_device_id(vendor: str, serial: str) -> str:
    """The hub's stable id for a module: vendor and serial, never its address.

    >>> make_device_id("Acme Solar", "SN 001")
    'acme-solar_SN-001'
    """
    v = _ID_UNSAFE.sub("-", vendor.strip()).strip("-").lower() or "unknown"
    s = _ID_UNSAFE.sub("-", serial.strip()).strip("-") or "unknown"
    return f"{v}_{s}"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a module is: vendor + serial identify it; model and firmware describe it."""

    vendor: str
    model: str
    serial: str
    firmware_version: str = ""

    @property
    def device_id(self) -> str:
        return make_device_id(self.vendor, self.serial)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a module can do.  ``None`` means not applicable or not reported.

    rated_power_w: nameplate AC power (inverter output, battery max discharge, plug max load), W.
    capacity_wh: usable battery energy at 100 % SoH, Wh.
    max_charge_w / max_discharge_w: battery power limits, W (both positive numbers).
    min_soc_pct / max_soc_pct: the SoC window the battery keeps to, %.
    controllable: the module accepts setpoints at all.
    priority: for smart plugs, the shedding order (lower sheds first).
    critical: for smart plugs, a load that must stay on during an outage (medical, fridge).
    """

    rated_power_w: float | None = None
    capacity_wh: float | None = None
    max_charge_w: float | None = None
    max_discharge_w: float | None = None
    min_soc_pct: float | None = None
    max_soc_pct: float | None = None
    controllable: bool = True
    priority: int | None = None
    critical: bool = False


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Everything a probe learns about a module."""

    kind: DeviceKind
    identity: Identity
    capabilities: Capabilities = field(default_factory=Capabilities)

    @property
    def device_id(self) -> str:
        return self.identity.device_id


@dataclass(frozen=True, slots=True)
class Telemetry:
    """One sample of a module's measurements (sign convention: see the module docstring).

    Fields a kind does not have stay ``None``.  ``power_limit_pct`` is the active inverter limit in % of
    rated power; ``on`` is a smart plug's relay; ``grid_ok`` is false while the meter sees a grid outage.
    """

    ts: float
    state: OperatingState = OperatingState.RUNNING
    power_w: float | None = None
    energy_out_wh: float | None = None
    energy_in_wh: float | None = None
    voltage_v: float | None = None
    current_a: float | None = None
    frequency_hz: float | None = None
    temperature_c: float | None = None
    soc_pct: float | None = None
    soh_pct: float | None = None
    power_limit_pct: float | None = None
    on: bool | None = None
    grid_ok: bool | None = None

    def with_state(self, state: OperatingState) -> Telemetry:
        return replace(self, state=state)


@dataclass(frozen=True, slots=True)
class Setpoint:
    """What the hub tells a module.  Only the fields relevant to its kind are set.

    power_limit_pct: microinverter active-power limit, 0..100 % of rated power.
    battery_power_w: energystorage target, W, with the hub's sign: positive discharges, negative charges,
        zero holds.  ``None`` leaves the battery to its own (self-consumption) logic.
    on: smart plug relay.
    release: return the module to its own default behaviour now (inverter 100 %, battery self-consumption,
        plug on); the other fields are then ignored.  This is what the hub's watchdog sends when a command's
        time-to-live ends.
    """

    power_limit_pct: float | None = None
    battery_power_w: float | None = None
    on: bool | None = None
    release: bool = False

    def is_empty(self) -> bool:
        return (
            not self.release
            and self.power_limit_pct is None
            and self.battery_power_w is None
            and self.on is None
        )
