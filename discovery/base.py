"""What a discovery source reports: sightings of modules, and their disappearance.

A source (the mDNS browser, the BLE scanner) turns what it hears into ``Sighting`` values and hands them to a
``SightingSink`` (the hub's onboarding service).  A sighting is a *claim*: the vendor, model and serial come
from an unauthenticated announcement; nothing in it is trusted until the module proves its identity.  Sources
validate what they parse and drop malformed announcements with a logged reason (``DiscoveryError`` is the root
exception of this layer; sources never let it escape into the network library's callbacks).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from devices.drivers.base import Address
from devices.model import DeviceKind, make_device_id


class DiscoveryError(Exception):
    """Root of the discovery layer's errors: a malformed announcement, mostly."""


class MalformedAnnouncement(DiscoveryError):
    """An mDNS TXT record or BLE advertisement that does not follow the documented format."""


class Source(enum.StrEnum):
    MDNS = "mdns"
    BLE = "ble"


@dataclass(frozen=True, slots=True)
class Sighting:
    """One module heard on the network.

    ``key`` identifies the announcement (mDNS service instance name, or BLE address); ``address`` is where the
    hub can reach the module (``None`` for a BLE-only module, which is reached through ``ble_address``);
    ``protocol`` is the driver protocol to use (``ores-http``, ``sunspec-modbus`` or ``ble-gatt``).
    ``unprovisioned`` is the module's own flag: it has no hub yet.  ``raw`` keeps the parsed announcement
    fields for diagnostics.
    """

    source: Source
    key: str
    kind: DeviceKind
    vendor: str
    model: str
    serial: str
    protocol: str
    address: Address | None = None
    ble_address: str | None = None
    protocol_version: str = "1.0"
    unprovisioned: bool = True
    rssi: int | None = None
    raw: dict[str, str] = field(default_factory=dict)

    @property
    def claimed_id(self) -> str:
        """The device id this announcement claims (vendor + serial); proven only by authentication."""
        return make_device_id(self.vendor, self.serial)


class SightingSink(Protocol):
    """Where sources report.  Both methods are called on the event loop and must not block."""

    def seen(self, sighting: Sighting) -> None:
        """A module announced itself (first time, or again with possibly changed data)."""

    def gone(self, source: Source, key: str, reason: str) -> None:
        """An announcement ended: an mDNS goodbye or lapsed TTL, a BLE device not heard for a while."""

    def rejected(self, source: Source, key: str, reason: str) -> None:
        """An announcement was malformed and dropped; ``reason`` says why (shown in the API)."""
