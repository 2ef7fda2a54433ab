"""Control arbitration: which setpoint a module should have right now, and why.

Three layers, highest first (the priorities of the smart-grid-manager reference):

1. **api** — a direct command from a user or app.  It carries a time-to-live; when that ends the command
   is gone and the layers below decide again.
2. **schedule** — setpoints for 15-minute UTC slots.
3. **default** — the watchdog: ``Setpoint(release=True)``, the module's own safe behaviour (inverter at
   100 %, battery in self-consumption, plug on).

``ControlArbiter`` is pure bookkeeping with an injectable clock; ``hub.poller`` asks it for the effective
command on every cycle, writes it on change, and rewrites non-default commands cyclically so a module that
rebooted comes back to the intended value.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from devices.model import Setpoint

SLOT_S = 15 * 60
RELEASE = Setpoint(release=True)


class ControlSource(enum.StrEnum):
    API = "api"
    SCHEDULE = "schedule"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Command:
    """An effective command: the setpoint, the layer it comes from, and until when it holds."""

    setpoint: Setpoint
    source: ControlSource
    issued_at: float
    expires_at: float | None = None
    issued_by: str | None = None


@dataclass(frozen=True, slots=True)
class ScheduleSlot:
    """A setpoint for a whole number of 15-minute slots: ``start`` and ``end`` are POSIX seconds, aligned."""

    start: float
    end: float
    setpoint: Setpoint

    def __post_init__(self) -> None:
        if self.start % SLOT_S or self.end % SLOT_S:
            raise ValueError("schedule slots must start and end on 15-minute boundaries (UTC)")
        if self.end <= self.start:
            raise ValueError("schedule slot ends before it starts")


class ControlArbiter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._api: dict[str, Command] = {}
        self._schedules: dict[str, tuple[ScheduleSlot, ...]] = {}
        #: Bumped on every change of commands or schedules (not on expiry, which is a matter of time).
        self.version = 0

    def command(self, device_id: str, setpoint: Setpoint, ttl_s: float, issued_by: str | None) -> Command:
        """Set a direct (api-layer) command for ``ttl_s`` seconds."""
        now = self._clock()
        cmd = Command(setpoint, ControlSource.API, now, now + ttl_s, issued_by)
        self._api[device_id] = cmd
        self.version += 1
        return cmd

    def release(self, device_id: str) -> bool:
        """End a direct command early.  Returns whether there was one."""
        self.version += 1
        return self._api.pop(device_id, None) is not None

    def set_schedule(self, device_id: str, slots: Iterable[ScheduleSlot]) -> None:
        ordered = tuple(sorted(slots, key=lambda s: s.start))
        for a, b in itertools.pairwise(ordered):
            if b.start < a.end:
                raise ValueError("schedule slots overlap")
        self.version += 1
        if ordered:
            self._schedules[device_id] = ordered
        else:
            self._schedules.pop(device_id, None)

    def schedule(self, device_id: str) -> tuple[ScheduleSlot, ...]:
        return self._schedules.get(device_id, ())

    def forget(self, device_id: str) -> None:
        self.version += 1
        self._api.pop(device_id, None)
        self._schedules.pop(device_id, None)

    def effective(self, device_id: str) -> Command:
        now = self._clock()
        cmd = self._api.get(device_id)
        if cmd is not None:
            if cmd.expires_at is None or now < cmd.expires_at:
                return cmd
            del self._api[device_id]
        for slot in self._schedules.get(device_id, ()):
            if slot.start <= now < slot.end:
                return Command(slot.setpoint, ControlSource.SCHEDULE, slot.start, slot.end)
        return Command(RELEASE, ControlSource.DEFAULT, now)
