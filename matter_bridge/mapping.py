"""Which Matter device a module becomes, and the values of its clusters: pure functions, no I/O.

A module kind maps to one bridged endpoint kind of ``bridge.mjs`` (microinverter → ``solar``, energystorage →
``battery``, meter → ``meter``, smartplug → ``plug``); its telemetry maps to attribute values in Matter units
(mW, mV, mA, mWh, battery percentage in half-percent).  Signs: Matter's ActivePower is positive while the
*device* imports power, so a device's value is ``-power_w`` in the hub's convention (power delivered into the
home, see ``devices.model``): production and discharge are negative, a plug's draw positive.  The grid meter is
the exception: its Electrical Sensor stands for the home's connection, positive while the home imports, which
is the hub's own sign.  Endpoint ids are derived from device ids by a hash, so they are stable, short and safe.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, Final, Literal

from devices.model import DeviceKind, Telemetry
from hub.registry import DeviceRecord

__all__ = [
    "MAX_MW",
    "EndpointKind",
    "diff_values",
    "endpoint_id",
    "endpoint_info",
    "endpoint_kind",
    "endpoint_values",
    "unique_id",
]

EndpointKind = Literal["solar", "battery", "meter", "plug"]
Values = dict[str, dict[str, Any]]

_KINDS: Final[Mapping[DeviceKind, EndpointKind]] = {
    DeviceKind.MICROINVERTER: "solar",
    DeviceKind.ENERGYSTORAGE: "battery",
    DeviceKind.METER: "meter",
    DeviceKind.SMARTPLUG: "plug",
}
#: The measurement range the bridge declares for ActivePower (±100 kW in mW); values are clamped to it.
MAX_MW: Final = 100_000_000
_MAX_MV: Final = 1_000_000_000  # 1 MV
_MAX_MA: Final = 1_000_000_000
_MAX_MWH: Final = 10**15
#: Below this (W) a battery counts as idle, not charging.
_IDLE_W: Final = 5.0

# PowerSource.BatChargeState
_CHARGING, _FULL, _NOT_CHARGING = 1, 2, 3


def endpoint_kind(kind: DeviceKind) -> EndpointKind | None:
    """The bridged endpoint kind for a module kind, or None for kinds Matter does not show."""
    return _KINDS.get(kind)


def endpoint_id(device_id: str) -> str:
    """A stable endpoint id for a module (the bridge accepts ``[A-Za-z0-9_-]{1,64}``; device ids may hold dots)."""
    return "m" + hashlib.blake2b(device_id.encode(), digest_size=12).hexdigest()


def unique_id(hub_id: str, device_id: str) -> str:
    """Bridged Device Basic Information's UniqueID: 32 hex characters, stable, different from the serial."""
    return hashlib.blake2b(f"{hub_id}/{device_id}".encode(), digest_size=16).hexdigest()


def endpoint_info(record: DeviceRecord, hub_id: str, *, reachable: bool) -> dict[str, Any]:
    """The ``info`` of the bridge's ``add``: names shown by controllers (bridge.mjs cuts them to 32 chars)."""
    ident = record.identity
    return {
        "name": record.name or f"{ident.vendor} {ident.model}",
        "vendor": ident.vendor,
        "product": ident.model,
        "serial": ident.serial,
        "uniqueId": unique_id(hub_id, record.device_id),
        "softwareVersion": ident.firmware_version,
        "reachable": reachable,
    }


def _int(value: float | None, scale: float, limit: int) -> int | None:
    scaled = None if value is None else value * scale
    if scaled is None or not math.isfinite(scaled):
        return None if scaled is None or math.isnan(scaled) else (limit if scaled > 0 else -limit)
    return max(-limit, min(limit, round(scaled)))


def _energy(wh: float | None) -> dict[str, int] | None:
    mwh = _int(wh, 1000, _MAX_MWH)
    return None if mwh is None else {"energy": max(0, mwh)}


def endpoint_values(kind: DeviceKind, telemetry: Telemetry | None, *, online: bool) -> Values:
    """Every attribute the hub keeps up to date on a module's endpoint, from its latest sample.

    Unknown measurements are null, as Matter asks; an offline module keeps its last values and is not
    ``reachable``.
    """
    ek = _KINDS.get(kind)
    values: Values = {"bridgedDeviceBasicInformation": {"reachable": online}}
    if ek is None:
        return values
    tel = telemetry or Telemetry(ts=0.0)
    sign = 1 if ek == "meter" else -1
    power = _int(None if tel.power_w is None else sign * tel.power_w, 1000, MAX_MW)
    current = None
    if tel.current_a is not None and power is not None:
        current = _int(math.copysign(abs(tel.current_a), power or 1), 1000, _MAX_MA)
    values["electricalPowerMeasurement"] = {
        "activePower": power,
        "voltage": _int(tel.voltage_v, 1000, _MAX_MV),
        "activeCurrent": current,
    }
    # Imported/exported from the device's point of view (the meter's: the home's).
    delivered, taken = _energy(tel.energy_out_wh), _energy(tel.energy_in_wh)
    imported, exported = (delivered, taken) if ek == "meter" else (taken, delivered)
    values["electricalEnergyMeasurement"] = {
        "cumulativeEnergyImported": imported,
        "cumulativeEnergyExported": exported,
    }
    if ek == "battery":
        pct = None if tel.soc_pct is None else _int(min(100.0, max(0.0, tel.soc_pct)), 2, 200)
        if tel.power_w is not None and tel.power_w < -_IDLE_W:
            state = _CHARGING
        elif tel.soc_pct is not None and tel.soc_pct >= 99.5:
            state = _FULL
        else:
            state = _NOT_CHARGING
        values["powerSource"] = {"batPercentRemaining": pct, "batChargeState": state}
    elif ek == "plug" and tel.on is not None:
        values["onOff"] = {"onOff": tel.on}
    return values


def diff_values(old: Values, new: Values) -> Values:
    """The part of ``new`` that differs from ``old`` (what an ``update`` has to carry)."""
    out: Values = {}
    for behavior, attrs in new.items():
        before = old.get(behavior, {})
        changed = {k: v for k, v in attrs.items() if k not in before or before[k] != v}
        if changed:
            out[behavior] = changed
    return out
