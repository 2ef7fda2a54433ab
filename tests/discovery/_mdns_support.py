"""Shared helpers for the mDNS tests: loopback zeroconf instances, a recording sink, a raw browser.

Every test uses its own random service type, so announcements from tests running in parallel on the same
machine (or a real ORES module on the loopback) never reach another test's browser.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

from discovery.base import Sighting, Source
from discovery.mdns import open_zeroconf

T = TypeVar("T")

DEADLINE_S = 10.0


def unique_service_type(prefix: str = "ores-t") -> str:
    """A fresh DNS-SD service type (at most 15 characters), e.g. ``_ores-t1a2b3c4d._tcp.local.``."""
    return f"_{prefix}{secrets.token_hex(4)}._tcp.local."


async def poll_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """Poll a condition that has no event of its own (browser counters) every 20 ms, with a deadline."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - the browser's counters have no event to wait on
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


@asynccontextmanager
async def loopback_zeroconf() -> AsyncIterator[AsyncZeroconf]:
    aiozc = open_zeroconf(["127.0.0.1"])
    try:
        yield aiozc
    finally:
        await aiozc.async_close()


class _Waitable:
    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], T], what: str, timeout: float = DEADLINE_S) -> T:
        """Wait until ``predicate()`` is truthy and return it; fail the test after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    result = predicate()
                    if result:
                        return result
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


class RecordingSink(_Waitable):
    """A ``SightingSink`` that records every report and wakes waiters."""

    def __init__(self) -> None:
        super().__init__()
        self.sightings: list[Sighting] = []
        self.gones: list[tuple[Source, str, str]] = []
        self.rejections: list[tuple[Source, str, str]] = []

    def seen(self, sighting: Sighting) -> None:
        self.sightings.append(sighting)
        self._notify()

    def gone(self, source: Source, key: str, reason: str) -> None:
        self.gones.append((source, key, reason))
        self._notify()

    def rejected(self, source: Source, key: str, reason: str) -> None:
        self.rejections.append((source, key, reason))
        self._notify()

    def seen_for(self, key: str) -> list[Sighting]:
        return [s for s in self.sightings if s.key == key]

    def rejection_for(self, key: str) -> str | None:
        reasons = [reason for _, k, reason in self.rejections if k == key]
        return reasons[-1] if reasons else None

    def gone_keys(self) -> set[str]:
        return {key for _, key, _ in self.gones}


class RawWatcher(_Waitable):
    """A plain zeroconf browser recording (name, state change) events, as a module looking for a hub would."""

    def __init__(self, aiozc: AsyncZeroconf, service_type: str) -> None:
        super().__init__()
        self.events: list[tuple[str, ServiceStateChange]] = []
        self._browser = AsyncServiceBrowser(aiozc.zeroconf, service_type, handlers=[self._on_change])

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        self.events.append((name, state_change))
        self._notify()

    def count(self, name: str, change: ServiceStateChange) -> int:
        return sum(1 for n, c in self.events if n == name and c is change)

    async def close(self) -> None:
        await self._browser.async_cancel()
