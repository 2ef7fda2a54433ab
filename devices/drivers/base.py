"""The driver interface and the ordered registry of driver plugins.

A driver speaks one module protocol to one module at one address.  It has three operations: ``probe`` (learn
the module's kind, identity and capabilities, or raise ``NotSupported``), ``read`` (one telemetry sample) and
``apply`` (write a setpoint).  Drivers bound every network call by their own timeout and raise only
``devices.errors`` exceptions; retries, backoff and offline detection live one layer up (``hub.poller``) so
that every protocol gets the same behaviour.  Plugins register with ``register_driver`` in probe order.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from devices.errors import DeviceError, NotSupported
from devices.model import DeviceInfo, Setpoint, Telemetry

_LOGGER = logging.getLogger(__name__)
_BLE_ADDRESS = re.compile(
    r"(?:[0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}|[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}"
)

DEFAULT_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Address:
    """Where a module answers, as a URL-like string.

    ``modbus://HOST:PORT?unit=N`` for SunSpec Modbus TCP (port defaults to 502, unit to 1);
    ``http://HOST:PORT/BASE`` for ORES-HTTP (base path defaults to ``/ores/v1``);
    ``ble://AA:BB:CC:DD:EE:FF`` for a BLE module (the host is its Bluetooth address; port 0).
    """

    scheme: str
    host: str
    port: int
    path: str = ""
    unit: int = 1

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse an address; raises ``ValueError`` with a readable reason."""
        if "://" not in text:
            raise ValueError("address must look like modbus://host:port or http://host:port/path")
        if text.strip().lower().startswith("ble://"):
            ble = text.strip()[6:]
            if not _BLE_ADDRESS.fullmatch(ble):
                raise ValueError("a BLE address looks like ble://AA:BB:CC:DD:EE:FF")
            return cls("ble", ble.upper(), 0)
        parts = urlsplit(text.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("modbus", "http"):
            raise ValueError(f"unsupported scheme {scheme!r}: use modbus or http")
        if not parts.hostname:
            raise ValueError("address has no host")
        try:
            port = parts.port
        except ValueError as err:
            raise ValueError(f"invalid port: {err}") from err
        if scheme == "modbus":
            unit_values = parse_qs(parts.query).get("unit", ["1"])
            try:
                unit = int(unit_values[0])
            except ValueError as err:
                raise ValueError("unit must be an integer") from err
            if not 0 <= unit <= 247:
                raise ValueError("unit must be 0..247")
            return cls("modbus", parts.hostname, port or 502, "", unit)
        path = parts.path.rstrip("/") or "/ores/v1"
        return cls("http", parts.hostname, port or 80, path)

    def __str__(self) -> str:
        if self.scheme == "ble":
            return f"ble://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme == "modbus":
            return f"modbus://{host}:{self.port}?unit={self.unit}"
        return f"{self.scheme}://{host}:{self.port}{self.path}"


@runtime_checkable
class Driver(Protocol):
    """One module over one protocol.  All methods raise only ``devices.errors.DeviceError`` subclasses."""

    #: Short protocol name, e.g. ``"sunspec-modbus"`` or ``"ores-http"``.
    protocol: ClassVar[str]
    #: URL schemes this driver can try.
    schemes: ClassVar[tuple[str, ...]]

    address: Address

    async def probe(self) -> DeviceInfo:
        """Connect, check the protocol and read identity and capabilities.

        Raises ``NotSupported`` when the address answers but not in this protocol, ``DeviceUnreachable``
        when nothing answers, ``ProtocolError`` when the answer is malformed.
        """

    async def read(self) -> Telemetry:
        """One telemetry sample, with the hub's sign convention (see ``devices.model``)."""

    async def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
        """Write a setpoint.  With ``revert_after_s`` the module itself returns to its default if it hears
        nothing more from the hub for that long (a module-side watchdog), where its protocol allows."""

    async def close(self) -> None:
        """Release the connection.  Safe to call twice."""


class DriverFactory(Protocol):
    """A driver class: constructible from an address, with its protocol name and URL schemes."""

    @property
    def protocol(self) -> str: ...

    @property
    def schemes(self) -> tuple[str, ...]: ...

    def __call__(self, address: Address, *, timeout: float = DEFAULT_TIMEOUT_S) -> Driver: ...


_REGISTRY: list[DriverFactory] = []


def register_driver(factory: DriverFactory) -> DriverFactory:
    """Add a driver class to the end of the probe order (usable as a class decorator)."""
    if factory not in _REGISTRY:
        _REGISTRY.append(factory)
    return factory


def replace_driver(factory: DriverFactory) -> DriverFactory | None:
    """Put ``factory`` in the place of the registered driver of the same protocol (or at the end); returns
    the one it replaced, so it can be put back.  For integrators wrapping a driver, and for tests."""
    for i, old in enumerate(_REGISTRY):
        if old.protocol == factory.protocol:
            _REGISTRY[i] = factory
            return old
    _REGISTRY.append(factory)
    return None


def registered_drivers() -> tuple[DriverFactory, ...]:
    return tuple(_REGISTRY)


def driver_for_protocol(protocol: str) -> DriverFactory:
    for factory in _REGISTRY:
        if factory.protocol == protocol:
            return factory
    raise NotSupported(f"no driver for protocol {protocol!r}")


async def probe_address(
    address: Address, *, protocol: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> tuple[Driver, DeviceInfo]:
    """Try each registered driver that fits the address's scheme, in registry order.

    Returns the first driver whose ``probe`` succeeds, with what it learnt.  Raises the most informative
    error seen: a ``ProtocolError`` or ``DeviceUnreachable`` beats ``NotSupported``.
    """
    candidates = [
        f for f in _REGISTRY if address.scheme in f.schemes and (protocol is None or f.protocol == protocol)
    ]
    if not candidates:
        raise NotSupported(f"no driver speaks {address.scheme}:// (protocol {protocol or 'any'})")
    best: DeviceError | None = None
    for factory in candidates:
        driver = factory(address, timeout=timeout)
        try:
            info = await driver.probe()
        except DeviceError as err:
            await driver.close()
            _LOGGER.debug("probe of %s with %s failed: %s", address, factory.protocol, err)
            if best is None or isinstance(best, NotSupported):
                best = err
            continue
        return driver, info
    assert best is not None
    raise best


@dataclass(frozen=True, slots=True)
class FirmwareSlots:
    """A module's firmware as it reports it: the running (active) slot, the other (inactive) slot, and the
    state of an update in progress.

    state: ``idle``, ``receiving``, ``verifying``, ``installing``, ``rebooting``, ``failed``; unknown values
    are kept as they come.  ``received_bytes`` counts the bytes of the image being received (resume point).
    """

    active_version: str
    inactive_version: str | None
    state: str
    received_bytes: int = 0
    error: str | None = None


@runtime_checkable
class FirmwareCapable(Protocol):
    """A driver that can move a signed firmware image to its module (ORES-HTTP and BLE drivers).

    The hub has verified the image before it calls these; the module verifies it again itself.  Raises only
    ``devices.errors`` exceptions; ``CommandRejected`` carries the module's reason for refusing.
    """

    async def firmware_status(self) -> FirmwareSlots: ...

    async def firmware_begin(self, manifest: bytes, signature: bytes) -> int:
        """Announce an image (the manifest's canonical bytes and its signature).  Returns how many bytes of
        that same image the module already holds (0, or more when resuming an interrupted transfer)."""

    async def firmware_chunk(self, offset: int, data: bytes) -> int:
        """Send ``data`` at ``offset``; returns the module's new received byte count."""

    async def firmware_install(self) -> None:
        """The whole image is there: the module verifies it, writes its inactive slot and reboots into it."""

    async def firmware_rollback(self) -> None:
        """Boot the previous slot again (after a failed health check)."""
