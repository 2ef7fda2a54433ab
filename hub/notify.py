"""Alerts: what the homeowner should know about, raised from live state and cleared when it resolves.

An alert has a kind (``device_offline``, ``device_fault``, ``identity_mismatch``, ``low_soc``,
``over_temperature``, ``grid_outage``), a severity, a device (or none, for site-wide alerts) and a lifetime:
it is *active* while its condition holds, and it can be acknowledged.  The same condition never raises two
alerts.  ``Alerts.evaluate`` derives them from the live state after each poll round; raising and clearing
publish events on the bus, which the push stream forwards to apps.  Alerts are kept in memory (a bounded
history of the last 500); they are rebuilt from live state after a restart.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from devices.model import DeviceKind, OperatingState
from hub.state import EventBus, LiveState

MAX_ALERTS = 500
FAULT_KINDS = frozenset({"device_offline", "device_fault", "identity_mismatch", "over_temperature"})


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    kind: str
    severity: str  # info | warning | critical
    device_id: str | None
    message: str
    raised_at: float
    cleared_at: float | None = None
    acknowledged: bool = False

    @property
    def active(self) -> bool:
        return self.cleared_at is None


class Alerts:
    def __init__(self, bus: EventBus, *, low_soc_pct: float = 15.0, max_temperature_c: float = 60.0) -> None:
        self._bus = bus
        self._ids = itertools.count(1)
        self._alerts: OrderedDict[int, Alert] = OrderedDict()
        self._active: dict[tuple[str, str | None], int] = {}
        #: Bumped whenever an alert is raised, cleared or acknowledged.
        self.version = 0
        self.low_soc_pct = low_soc_pct
        self.max_temperature_c = max_temperature_c

    def raise_(self, kind: str, severity: str, device_id: str | None, message: str) -> Alert:
        key = (kind, device_id)
        existing = self._active.get(key)
        if existing is not None:
            return self._alerts[existing]
        alert = Alert(next(self._ids), kind, severity, device_id, message, time.time())
        self._alerts[alert.id] = alert
        self._active[key] = alert.id
        while len(self._alerts) > MAX_ALERTS:
            _, old = self._alerts.popitem(last=False)
            if old.active:
                self._active.pop((old.kind, old.device_id), None)
        self.version += 1
        self._bus.publish("alert.raised", alert=alert_dict(alert))
        return alert

    def clear(self, kind: str, device_id: str | None) -> None:
        alert_id = self._active.pop((kind, device_id), None)
        if alert_id is None or alert_id not in self._alerts:
            return
        alert = replace(self._alerts[alert_id], cleared_at=time.time())
        self._alerts[alert_id] = alert
        self.version += 1
        self._bus.publish("alert.cleared", alert=alert_dict(alert))

    def set(self, condition: bool, kind: str, severity: str, device_id: str | None, message: str) -> None:
        if condition:
            self.raise_(kind, severity, device_id, message)
        else:
            self.clear(kind, device_id)

    def acknowledge(self, ids: list[int]) -> list[int]:
        done = []
        for alert_id in ids:
            alert = self._alerts.get(alert_id)
            if alert is not None and not alert.acknowledged:
                self._alerts[alert_id] = replace(alert, acknowledged=True)
                self.version += 1
                done.append(alert_id)
        return done

    def list(self, *, active_only: bool = False, device_id: str | None = None) -> list[Alert]:
        return [
            a
            for a in reversed(self._alerts.values())
            if (not active_only or a.active) and (device_id is None or a.device_id == device_id)
        ]

    def forget_device(self, device_id: str) -> None:
        for kind, dev in list(self._active):
            if dev == device_id:
                self.clear(kind, dev)

    def evaluate(self, state: LiveState, *, offline_after: int = 3) -> None:
        """Bring alerts in line with the live state (a module is offline after ``offline_after`` failed
        polls in a row, as the pollers count them)."""
        outage = False
        for live in state.devices.values():
            dev = live.device_id
            stats = live.stats
            offline = not live.online and stats.consecutive_failures >= offline_after
            self.set(offline, "device_offline", "warning", dev, f"{dev} is not answering: {stats.last_error}")
            self.set(
                live.identity_mismatch is not None,
                "identity_mismatch",
                "critical",
                dev,
                live.identity_mismatch or "",
            )
            tel = live.telemetry
            if tel is None or not live.online:
                continue
            self.set(
                tel.state is OperatingState.FAULT, "device_fault", "critical", dev, f"{dev} reports a fault"
            )
            hot = tel.temperature_c is not None and tel.temperature_c >= self.max_temperature_c
            self.set(hot, "over_temperature", "critical", dev, f"{dev} is at {tel.temperature_c} °C")
            if live.kind is DeviceKind.ENERGYSTORAGE:
                low = tel.soc_pct is not None and tel.soc_pct <= self.low_soc_pct
                self.set(
                    low, "low_soc", "info", dev, f"battery {dev} is at {tel.soc_pct:.0f} %" if low else ""
                )
            if live.kind is DeviceKind.METER and tel.grid_ok is False:
                outage = True
        self.set(
            outage,
            "grid_outage",
            "critical",
            None,
            "the grid is down: the home runs on its own (island mode)",
        )


def alert_dict(alert: Alert) -> dict[str, Any]:
    return {
        "id": alert.id,
        "kind": alert.kind,
        "severity": alert.severity,
        "device_id": alert.device_id,
        "message": alert.message,
        "raised_at": alert.raised_at,
        "cleared_at": alert.cleared_at,
        "acknowledged": alert.acknowledged,
        "active": alert.active,
    }
