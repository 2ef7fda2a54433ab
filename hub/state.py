"""The hub's live model and its event bus.

``LiveState`` holds, for every registered module, the latest telemetry, whether it is online, and its link
statistics; it is only ever changed on the event loop, by the pollers and the API.  ``EventBus`` fans events
out to subscribers (the push stream, the notifier) through bounded queues: a slow subscriber loses its oldest
events and is told how many, it never slows the pollers down.  ``site_flows`` derives the home's power flows
from the modules' telemetry using the sign convention of ``devices.model``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from devices.model import DeviceKind, OperatingState, Telemetry

_LOGGER = logging.getLogger(__name__)

EVENT_QUEUE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened: ``type`` is e.g. ``device.online``, ``device.offline``, ``alert.raised``,
    ``device.registered``, ``control.changed``, ``monitor.snapshot``."""

    type: str
    data: dict[str, Any]
    ts: float = field(default_factory=time.time)


class Subscription:
    """One subscriber's bounded queue; iterate it with ``async for``."""

    def __init__(self, bus: EventBus, size: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self.dropped = 0

    def _offer(self, event: Event | None) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()
                self.dropped += 1

    async def get(self) -> Event | None:
        """The next event, or ``None`` once the bus is closed."""
        return await self._queue.get()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        self._bus._subs.discard(self)


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.closed = False

    def subscribe(self, size: int = EVENT_QUEUE_SIZE) -> Subscription:
        sub = Subscription(self, size)
        if self.closed:
            sub._offer(None)
        self._subs.add(sub)
        return sub

    def publish(self, type_: str, **data: Any) -> None:
        event = Event(type_, data)
        for sub in tuple(self._subs):
            sub._offer(event)

    def close(self) -> None:
        """End every subscription (used at shutdown so push streams finish)."""
        self.closed = True
        for sub in tuple(self._subs):
            sub._offer(None)


@dataclass(slots=True)
class LinkStats:
    """How the hub's conversation with one module is going (mutable, owned by its poller)."""

    polls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_ok: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    last_latency_ms: float | None = None
    avg_latency_ms: float | None = None
    next_poll_in_s: float = 0.0

    def ok(self, latency_ms: float, now: float) -> None:
        self.polls += 1
        self.consecutive_failures = 0
        self.last_ok = now
        self.last_latency_ms = latency_ms
        self.avg_latency_ms = (
            latency_ms if self.avg_latency_ms is None else 0.9 * self.avg_latency_ms + 0.1 * latency_ms
        )

    def failed(self, reason: str, now: float) -> None:
        self.polls += 1
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = reason
        self.last_error_at = now


@dataclass(slots=True)
class DeviceLive:
    """The live view of one registered module."""

    device_id: str
    kind: DeviceKind
    online: bool = False
    telemetry: Telemetry | None = None
    online_since: float | None = None
    stats: LinkStats = field(default_factory=LinkStats)
    identity_mismatch: str | None = None


class LiveState:
    """Latest known state of every registered module."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.devices: dict[str, DeviceLive] = {}
        #: Bumped on every change (sample, online state, written command); lets the API cache its views.
        self.version = 0
        self._watchers: list[Callable[[str], None]] = []

    def watch(self, fn: Callable[[str], None]) -> Callable[[], None]:
        """Call ``fn(device_id)`` on the loop, synchronously, whenever that module's live state changes (added,
        removed, a sample, online or offline).  ``fn`` must be quick and must not raise.  Returns an unwatch."""
        self._watchers.append(fn)
        return lambda: self._watchers.remove(fn) if fn in self._watchers else None

    def _notify(self, device_id: str) -> None:
        for fn in tuple(self._watchers):
            try:
                fn(device_id)
            except Exception:
                _LOGGER.exception("live state watcher failed for %s", device_id)

    def changed(self, device_id: str | None = None) -> None:
        """Something changed (of ``device_id``, when given: its watchers are told)."""
        self.version += 1
        if device_id is not None:
            self._notify(device_id)

    def add(self, device_id: str, kind: DeviceKind) -> DeviceLive:
        live = self.devices.get(device_id)
        if live is None:
            live = self.devices[device_id] = DeviceLive(device_id, kind)
            self.version += 1
            self._notify(device_id)
        return live

    def remove(self, device_id: str) -> None:
        self.devices.pop(device_id, None)
        self.version += 1
        self._notify(device_id)

    def set_online(self, device_id: str, online: bool, reason: str | None = None) -> None:
        live = self.devices.get(device_id)
        if live is None or live.online == online:
            return
        live.online = online
        self.version += 1
        live.online_since = time.time() if online else None
        self._notify(device_id)
        self.bus.publish("device.online" if online else "device.offline", device_id=device_id, reason=reason)


@dataclass(frozen=True, slots=True)
class SiteFlows:
    """The home's power flows in W, with the hub's sign convention (see ``devices.model``).

    pv_w: production (≥ 0); battery_w: + discharging / − charging; grid_w: + importing / − exporting;
    load_w: household consumption = pv + battery + grid.  ``grid_w`` is None without a meter online, and
    then so is ``load_w``.
    """

    pv_w: float
    battery_w: float
    grid_w: float | None
    load_w: float | None
    soc_pct: float | None
    grid_ok: bool | None
    plugs_w: float


def site_flows(devices: dict[str, DeviceLive]) -> SiteFlows:
    pv = battery = plugs = 0.0
    grid: float | None = None
    grid_ok: bool | None = None
    socs: list[float] = []
    for live in devices.values():
        tel = live.telemetry
        if tel is None or not live.online or tel.state is OperatingState.OFFLINE:
            continue
        power = tel.power_w or 0.0
        if live.kind is DeviceKind.MICROINVERTER:
            pv += power
        elif live.kind is DeviceKind.ENERGYSTORAGE:
            battery += power
            if tel.soc_pct is not None:
                socs.append(tel.soc_pct)
        elif live.kind is DeviceKind.METER:
            grid = (grid or 0.0) + power
            if tel.grid_ok is not None:
                grid_ok = tel.grid_ok if grid_ok is None else grid_ok and tel.grid_ok
        elif live.kind is DeviceKind.SMARTPLUG:
            plugs += power
    soc = sum(socs) / len(socs) if socs else None
    load = pv + battery + grid if grid is not None else None
    return SiteFlows(pv, battery, grid, load, soc, grid_ok, plugs)
