"""The BLE discovery source: a bleak scanner filtered on the ORES service UUID, turning adverts into sightings.

``BleScanner`` owns one ``bleak.BleakScanner`` whose detection callback is ``BleScanner._on_advertisement``.
Each advertisement's service data under ``ORES_SERVICE_UUID`` is parsed (``devices.ble_wire``, format in
docs/ble.md) into a ``Sighting`` for the sink, or dropped with a logged reason via ``sink.rejected``; the
callback never raises into bleak.  BLE modules repeat their advert several times a second, so a device is
reported again only when its announcement changes or every ``report_interval_s``; a device not heard for
``gone_after_s`` is reported ``gone`` by a periodic sweep (the clock is injectable, so tests need no sleeps).
The number of devices tracked is bounded, and a flood of new addresses cannot displace the ones already
tracked.  A machine without a usable Bluetooth adapter makes ``start`` log one warning and leave the scanner
inert: the hub keeps running without BLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from devices.ble_wire import ORES_SERVICE_UUID, BleAnnouncement, parse_advertisement
from discovery.base import MalformedAnnouncement, Sighting, SightingSink, Source

__all__ = ["BLE_PROTOCOL", "BleScanner", "ScannerFactory"]

_LOGGER = logging.getLogger(__name__)

#: The driver protocol a BLE sighting names (``devices.drivers.ble.BleGattDriver.protocol``).
BLE_PROTOCOL = "ble-gatt"


class _Scanner(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ScannerFactory(Protocol):
    """Builds the scanner; ``bleak.BleakScanner`` itself is one."""

    def __call__(
        self,
        detection_callback: Callable[[BLEDevice, AdvertisementData], None],
        service_uuids: list[str],
    ) -> _Scanner: ...


@dataclass(frozen=True, slots=True)
class _Tracked:
    """A device reported to the sink: what it announced, when it was last reported and last heard."""

    announcement: BleAnnouncement
    local_name: str | None
    reported_at: float
    heard_at: float


@dataclass(frozen=True, slots=True)
class _Rejection:
    reason: str
    reported_at: float


class BleScanner:
    """The BLE discovery source (see the module docstring)."""

    def __init__(
        self,
        sink: SightingSink,
        *,
        scanner_factory: ScannerFactory = BleakScanner,
        clock: Callable[[], float] = time.monotonic,
        report_interval_s: float = 30.0,
        gone_after_s: float = 60.0,
        sweep_interval_s: float = 5.0,
        max_devices: int = 1024,
    ) -> None:
        if not (report_interval_s > 0 and gone_after_s > 0 and sweep_interval_s > 0):
            raise ValueError("intervals must be positive")
        if max_devices < 1:
            raise ValueError("max_devices must be at least 1")
        self._sink = sink
        self._factory = scanner_factory
        self._clock = clock
        self._report_interval_s = report_interval_s
        self._gone_after_s = gone_after_s
        self._sweep_interval_s = sweep_interval_s
        self._max_devices = max_devices
        self._scanner: _Scanner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._rejections: dict[str, _Rejection] = {}
        self._full_logged = False
        self.unavailable_reason: str | None = None

    @property
    def running(self) -> bool:
        """The radio is scanning (``False`` before ``start``, after ``stop`` and without an adapter)."""
        return self._scanner is not None

    @property
    def tracked(self) -> frozenset[str]:
        """Keys (BLE addresses) of the devices currently reported present."""
        return frozenset(self._tracked)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start scanning.  Without a usable adapter, log one warning and stay inert (never raises)."""
        if self._scanner is not None:
            return
        try:
            scanner = self._factory(
                detection_callback=self._on_advertisement, service_uuids=[ORES_SERVICE_UUID]
            )
            await scanner.start()
        except (BleakError, OSError) as err:
            self._unavailable(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            return
        except Exception as err:  # an unexpected backend failure must not stop the hub either
            _LOGGER.debug("BLE scanner failed to start", exc_info=True)
            self._unavailable(f"{type(err).__name__}: {err}")
            return
        self._scanner = scanner
        self.unavailable_reason = None
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="ble-scanner-sweep")
        _LOGGER.info("BLE scanner started (service %s)", ORES_SERVICE_UUID)

    def _unavailable(self, reason: str) -> None:
        if self.unavailable_reason is None:
            _LOGGER.warning("BLE discovery unavailable, continuing without it: %s", reason)
        self.unavailable_reason = reason

    async def stop(self) -> None:
        """Stop scanning and the sweep.  Safe to call twice, and when ``start`` found no adapter."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.wait({sweeper})  # propagates our own cancellation, not the sweeper's
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            try:
                await scanner.stop()
            except (BleakError, OSError) as err:
                _LOGGER.info("BLE scanner did not stop cleanly: %s", err)
        self._tracked.clear()
        self._rejections.clear()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            self.expire()

    # ------------------------------------------------------------------ advertisements

    def _on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """bleak's detection callback: one advertisement heard.  Never raises."""
        try:
            self._handle(device, adv)
        except Exception:
            _LOGGER.exception(
                "BLE advertisement from %s could not be handled", getattr(device, "address", "?")
            )

    def _handle(self, device: BLEDevice, adv: AdvertisementData) -> None:
        key = device.address
        payload = _service_data(adv)
        if payload is None:
            # Listed the ORES service but no service data yet: with legacy advertising the service data
            # may come in the scan response, which the OS merges into a later report.
            _LOGGER.debug("BLE device %s lists the ORES service without service data", key)
            return
        now = self._clock()
        try:
            announcement = parse_advertisement(payload)
        except MalformedAnnouncement as err:
            self._reject(key, str(err), now)
            return
        self._rejections.pop(key, None)
        tracked = self._tracked.get(key)
        if tracked is None and len(self._tracked) >= self._max_devices:
            if not self._full_logged:
                _LOGGER.warning(
                    "BLE discovery tracks %d devices already; ignoring new ones until some go away",
                    self._max_devices,
                )
                self._full_logged = True
            return
        changed = tracked is None or (tracked.announcement, tracked.local_name) != (
            announcement,
            adv.local_name,
        )
        if not changed and tracked is not None and now - tracked.reported_at < self._report_interval_s:
            self._tracked[key] = replace(tracked, heard_at=now)
            return
        self._tracked[key] = _Tracked(announcement, adv.local_name, now, now)
        self._call(self._sink.seen, _sighting(key, announcement, adv))

    def _reject(self, key: str, reason: str, now: float) -> None:
        previous = self._rejections.get(key)
        if (
            previous is not None
            and previous.reason == reason
            and now - previous.reported_at < self._report_interval_s
        ):
            return
        _LOGGER.info("BLE advertisement from %s rejected: %s", key, reason)
        self._rejections.pop(key, None)
        while len(self._rejections) >= self._max_devices:
            del self._rejections[next(iter(self._rejections))]  # forget the oldest
        self._rejections[key] = _Rejection(reason, now)
        self._call(self._sink.rejected, Source.BLE, key, reason)

    def expire(self) -> list[str]:
        """Report ``gone`` for every device not heard for ``gone_after_s``; returns their keys."""
        now = self._clock()
        silent = [key for key, t in self._tracked.items() if now - t.heard_at >= self._gone_after_s]
        for key in silent:
            del self._tracked[key]
            self._call(self._sink.gone, Source.BLE, key, f"not heard for {self._gone_after_s:g} s")
        if silent:
            self._full_logged = False
        stale = [k for k, r in self._rejections.items() if now - r.reported_at >= self._gone_after_s]
        for key in stale:
            del self._rejections[key]
        return silent

    @staticmethod
    def _call(method: Callable[..., None], *args: object) -> None:
        try:
            method(*args)
        except Exception:
            _LOGGER.exception("discovery sink failed in %s", getattr(method, "__name__", method))


def _service_data(adv: AdvertisementData) -> bytes | None:
    """The service data under the ORES UUID (bleak normalises UUID keys to lower case; be lenient anyway)."""
    data = adv.service_data.get(ORES_SERVICE_UUID)
    if data is None:
        for uuid, value in adv.service_data.items():
            if uuid.lower() == ORES_SERVICE_UUID:
                return bytes(value)
        return None
    return bytes(data)


def _sighting(key: str, announcement: BleAnnouncement, adv: AdvertisementData) -> Sighting:
    raw = {
        "version": str(announcement.version),
        "kind": str(announcement.kind_code),
        "flags": f"0x{announcement.flags:02x}",
        "vendor_id": f"0x{announcement.vendor_id:04x}",
        "serial": announcement.serial,
    }
    if adv.local_name:
        raw["local_name"] = adv.local_name[:64]
    return Sighting(
        source=Source.BLE,
        key=key,
        kind=announcement.kind,
        vendor=announcement.vendor,
        model="",
        serial=announcement.serial,
        protocol=BLE_PROTOCOL,
        address=None,
        ble_address=key,
        unprovisioned=announcement.unprovisioned,
        rssi=adv.rssi,
        raw=raw,
    )
