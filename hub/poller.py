"""Driving the drivers: one independent task per module, with timeouts, backoff and offline detection.

A ``DeviceLink`` owns one module's driver.  Its task connects (probe, checking the module is still the one
registered), then polls ``read()`` at the hub's poll rate, records each sample in the live state and the
history, and writes the arbiter's effective command when it changes or when the cyclic rewrite is due.  Every
call is bounded by a timeout.  Failures are retried with exponential backoff and jitter; after
``offline_after`` consecutive failures the module is marked offline (never deleted).  Because each module has
its own task, a slow or dead module never delays the others.  ``LinkManager`` starts and stops links as the
registry changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from devices.drivers.base import Address, Driver, driver_for_protocol
from devices.errors import DeviceError, DeviceUnreachable, NotSupported, ProtocolError
from devices.model import DeviceInfo, OperatingState, Setpoint, Telemetry
from hub.control import Command, ControlArbiter, ControlSource
from hub.history import History
from hub.registry import DeviceRecord, Registry
from hub.state import LiveState

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PollConfig:
    poll_interval_s: float = 1.0
    timeout_s: float = 2.0
    offline_after: int = 3
    max_backoff_s: float = 30.0
    cyclic_write_s: float = 10.0
    # The module reverts to its own default if it hears nothing for this long (module-side watchdog).
    module_revert_s: float = 60.0


class DeviceLink:
    """The hub's side of the conversation with one registered module."""

    def __init__(
        self,
        record: DeviceRecord,
        *,
        state: LiveState,
        history: History | None,
        arbiter: ControlArbiter,
        config: PollConfig,
        on_identity: Callable[[DeviceRecord, DeviceInfo], None] | None = None,
        driver_factory: Callable[[Address, float], Driver] | None = None,
    ) -> None:
        self.record = record
        self._state = state
        self._history = history
        self._arbiter = arbiter
        self.config = config
        self._on_identity = on_identity
        self._driver_factory = driver_factory
        self._driver: Driver | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._io_lock = asyncio.Lock()  # one driver call at a time
        self._written: Command | None = None
        self._written_at = 0.0
        self.live = state.add(record.device_id, record.kind)

    @property
    def device_id(self) -> str:
        return self.record.device_id

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"link:{self.device_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_driver()

    def poke(self) -> None:
        """Poll (and write) now instead of waiting for the next tick."""
        self._wake.set()

    # ------------------------------------------------------------------------------------------ connection

    def _new_driver(self) -> Driver:
        address = Address.parse(self.record.address)
        if self._driver_factory is not None:
            return self._driver_factory(address, self.config.timeout_s)
        driver = driver_for_protocol(self.record.protocol)(address, timeout=self.config.timeout_s)
        credential = self.record.settings.get("credential")
        set_credential = getattr(driver, "set_credential", None)
        if credential and set_credential is not None:
            set_credential(credential)  # a provisioned module answers only with its credential
        return driver

    async def _close_driver(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            with contextlib.suppress(Exception):
                await driver.close()

    async def _connect(self) -> Driver:
        driver = self._new_driver()
        try:
            info = await asyncio.wait_for(driver.probe(), self.config.timeout_s * 2)
        except BaseException:
            with contextlib.suppress(Exception):
                await driver.close()
            raise
        if info.device_id != self.device_id:
            await driver.close()
            msg = f"{self.record.address} now answers as {info.device_id}, not {self.device_id}"
            self.live.identity_mismatch = msg
            self._state.changed(self.device_id)
            raise NotSupported(msg)
        self.live.identity_mismatch = None
        if self._on_identity is not None and (
            info.identity != self.record.identity or info.capabilities != self.record.capabilities
        ):
            self._on_identity(self.record, info)
        self._written = None  # a (re)connected module gets its command again
        self._state.changed(self.device_id)
        return driver

    # ------------------------------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        cfg = self.config
        while True:
            delay = cfg.poll_interval_s
            started = time.monotonic()
            try:
                sample = await self._read()
            except (DeviceError, TimeoutError) as err:
                reason = str(err) or type(err).__name__
                delay = self._failed(reason)
                if isinstance(err, ProtocolError | TimeoutError) or self.live.stats.consecutive_failures > 1:
                    await self._close_driver()
            else:
                self._succeeded(sample, (time.monotonic() - started) * 1000)
                await self._write_if_due()
            self.live.stats.next_poll_in_s = delay
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, delay - (time.monotonic() - started)))

    async def _read(self) -> Telemetry:
        async with self._io_lock:
            if self._driver is None:
                self._driver = await self._connect()
            return await asyncio.wait_for(self._driver.read(), self.config.timeout_s)

    async def read_now(self) -> Telemetry:
        """Read one sample now (diagnostics, ``POST /hub/communicate``); it counts as a poll."""
        started = time.monotonic()
        try:
            sample = await self._read()
        except (DeviceError, TimeoutError) as err:
            self._failed(str(err) or type(err).__name__)
            if isinstance(err, TimeoutError):
                raise DeviceUnreachable(f"{self.device_id} did not answer in time") from err
            raise
        self._succeeded(sample, (time.monotonic() - started) * 1000)
        return sample

    async def reconnect(self) -> None:
        """Drop the connection; the next poll (started now) opens a new one and probes again."""
        async with self._io_lock:
            await self._close_driver()
        self.poke()

    def _failed(self, reason: str) -> float:
        now = time.time()
        stats = self.live.stats
        stats.failed(reason, now)
        if stats.consecutive_failures == 1:
            _LOGGER.info("%s: poll failed (%s); retrying", self.device_id, reason)
        if stats.consecutive_failures >= self.config.offline_after and self.live.online:
            _LOGGER.warning(
                "%s is offline after %s failures: %s", self.device_id, stats.consecutive_failures, reason
            )
            self._state.set_online(self.device_id, False, reason)
            if self.live.telemetry is not None:
                self.live.telemetry = self.live.telemetry.with_state(OperatingState.OFFLINE)
                self._state.changed(self.device_id)
        elif stats.consecutive_failures == self.config.offline_after:
            # It never came online since the hub started: say so once.
            self._state.bus.publish("device.offline", device_id=self.device_id, reason=reason)
        backoff = self.config.poll_interval_s * 2 ** min(stats.consecutive_failures - 1, 16)
        return float(min(self.config.max_backoff_s, backoff) * random.uniform(0.8, 1.2))

    def _succeeded(self, sample: Telemetry, latency_ms: float) -> None:
        now = time.time()
        # The hub's clock stamps every sample: a module's own clock may be unset, drifting or simulated.
        sample = replace(sample, ts=now)
        self.live.stats.ok(latency_ms, now)
        self.live.telemetry = sample
        self._state.changed(self.device_id)
        if not self.live.online:
            _LOGGER.info("%s is online", self.device_id)
            self._state.set_online(self.device_id, True)
        if self._history is not None:
            self._history.record(self.device_id, sample)

    # ------------------------------------------------------------------------------------------ commands

    async def _write_if_due(self) -> None:
        cmd = self._arbiter.effective(self.device_id)
        changed = self._written is None or cmd.setpoint != self._written.setpoint
        cyclic_due = (
            cmd.source is not ControlSource.DEFAULT
            and time.monotonic() - self._written_at >= self.config.cyclic_write_s
        )
        if not (changed or cyclic_due):
            return
        if self._written is None and cmd.source is ControlSource.DEFAULT:
            # Nothing was ever commanded since connecting: leave the module in its own default, no write.
            self._written = cmd
            return
        with contextlib.suppress(DeviceError, TimeoutError):
            await self.write(cmd)

    async def write(self, cmd: Command | None = None) -> Command:
        """Write the effective (or given) command now; raises ``DeviceError`` if the module refuses."""
        cmd = cmd or self._arbiter.effective(self.device_id)
        async with self._io_lock:
            if self._driver is None:
                self._driver = await self._connect()
            revert = None if cmd.source is ControlSource.DEFAULT else self.config.module_revert_s
            try:
                await asyncio.wait_for(
                    self._driver.apply(cmd.setpoint, revert_after_s=revert), self.config.timeout_s
                )
            except TimeoutError as err:
                raise DeviceError(f"writing to {self.device_id} timed out") from err
            except DeviceError as err:
                _LOGGER.warning("%s refused %s: %s", self.device_id, cmd.setpoint, err)
                raise
            self._written = cmd
            self._written_at = time.monotonic()
            self._state.changed(self.device_id)
            self._state.bus.publish(
                "control.applied",
                device_id=self.device_id,
                source=cmd.source.value,
                setpoint=_setpoint_dict(cmd.setpoint),
            )
            return cmd

    @property
    def written(self) -> Command | None:
        return self._written

    async def probe(self) -> DeviceInfo:
        """A fresh probe over a separate connection (diagnostics)."""
        driver = self._new_driver()
        try:
            return await asyncio.wait_for(driver.probe(), self.config.timeout_s * 2)
        finally:
            await driver.close()


def _setpoint_dict(sp: Setpoint) -> dict[str, object]:
    return {
        k: getattr(sp, k) for k in ("power_limit_pct", "battery_power_w", "on", "release") if getattr(sp, k)
    }


class LinkManager:
    """One ``DeviceLink`` per registered module."""

    def __init__(
        self,
        registry: Registry,
        state: LiveState,
        history: History | None,
        arbiter: ControlArbiter,
        config: PollConfig,
    ) -> None:
        self._registry = registry
        self._state = state
        self._history = history
        self._arbiter = arbiter
        self.config = config
        self.links: dict[str, DeviceLink] = {}
        self._bg: set[asyncio.Task[None]] = set()

    def start_all(self) -> None:
        for record in self._registry.all():
            self.add(record)

    def add(self, record: DeviceRecord) -> DeviceLink:
        old = self.links.get(record.device_id)
        if (
            old is not None
            and old.record.address == record.address
            and old.record.protocol == record.protocol
        ):
            credential_changed = old.record.settings.get("credential") != record.settings.get("credential")
            old.record = record
            if credential_changed:
                self._spawn(old.reconnect())  # the open connection still speaks with the old credential
            return old
        if old is not None:
            self._spawn(old.stop())
        link = DeviceLink(
            record,
            state=self._state,
            history=self._history,
            arbiter=self._arbiter,
            config=self.config,
            on_identity=self._identity_changed,
        )
        self.links[record.device_id] = link
        link.start()
        return link

    async def remove(self, device_id: str) -> None:
        link = self.links.pop(device_id, None)
        if link is not None:
            await link.stop()
        self._state.remove(device_id)
        self._arbiter.forget(device_id)

    def _identity_changed(self, record: DeviceRecord, info: DeviceInfo) -> None:
        """A module came back with new firmware or capabilities: keep the registry true."""
        self._spawn(self._update_identity(record.device_id, info))

    async def _update_identity(self, device_id: str, info: DeviceInfo) -> None:
        updated = await self._registry.update(
            device_id, identity=info.identity, capabilities=info.capabilities
        )
        link = self.links.get(device_id)
        if link is not None and updated is not None:
            link.record = updated

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def stop(self) -> None:
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.stop() for link in links), return_exceptions=True)
        for task in list(self._bg):
            task.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
