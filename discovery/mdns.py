"""mDNS discovery of ORES modules, and the hub's own mDNS advertisement (python-zeroconf, asyncio API).

Modules announce ``_ores._tcp.local.`` services whose TXT record says what they are (docs/discovery.md lists
the keys and limits); ``MdnsBrowser`` browses that type, resolves each service (SRV, TXT, A/AAAA) with a
timeout, validates it strictly (``parse_txt``, ``sighting_from_service``) and reports a ``Sighting``, a
rejection with a precise reason, or the end of an announcement (goodbye or lapsed TTL) to a ``SightingSink``.
Everything an announcement can trigger is bounded: an admission token bucket, a bounded queue of pending
resolutions and a fixed number of resolver tasks, so a flood of fake announcements cannot starve the event
loop or the hub behind the sink.  ``HubAdvertiser`` announces the hub as ``_ores-hub._tcp.local.``.  The
``AsyncZeroconf`` instance is injectable and meant to be shared (one per process): whoever creates it closes
it; ``open_zeroconf`` creates one bound to the running event loop (no extra thread).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NotRunningException,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from devices.drivers.base import Address
from devices.model import DeviceKind
from discovery.base import DiscoveryError, MalformedAnnouncement, Sighting, SightingSink, Source

__all__ = [
    "DEFAULT_PATH",
    "HUB_SERVICE_TYPE",
    "MAX_SERIAL_CHARS",
    "MAX_TXT_STRING_BYTES",
    "MAX_TXT_TOTAL_BYTES",
    "MAX_VALUE_CHARS",
    "MODULE_SERVICE_TYPE",
    "PROTOCOL_VERSION",
    "TP_ORES_HTTP",
    "TP_SUNSPEC",
    "TRANSPORTS",
    "BrowserStats",
    "HubAdvertiser",
    "MdnsBrowser",
    "ResolvedService",
    "ascii_text",
    "hub_txt",
    "instance_name",
    "module_txt",
    "open_zeroconf",
    "parse_hub_txt",
    "parse_txt",
    "register_service",
    "sighting_from_service",
    "withdraw_service",
]

_LOGGER = logging.getLogger(__name__)

MODULE_SERVICE_TYPE: Final = "_ores._tcp.local."
HUB_SERVICE_TYPE: Final = "_ores-hub._tcp.local."
PROTOCOL_VERSION: Final = "1.0"
DEFAULT_PATH: Final = "/ores/v1"
TP_ORES_HTTP: Final = "ores-http"
TP_SUNSPEC: Final = "sunspec-modbus"
TRANSPORTS: Final = (TP_ORES_HTTP, TP_SUNSPEC)

MAX_TXT_STRING_BYTES: Final = 255  # one TXT string: a length byte can say no more (RFC 1035)
MAX_TXT_TOTAL_BYTES: Final = 1300  # the whole TXT record, so an answer fits one Ethernet frame (RFC 6763 6.2)
MAX_VALUE_CHARS: Final = 64
MAX_SERIAL_CHARS: Final = 32
MAX_DNS_LABEL: Final = 63

_KINDS: Final = frozenset(k.value for k in DeviceKind if k is not DeviceKind.UNKNOWN)
_VERSION = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})")
_PATH = re.compile(r"/[A-Za-z0-9._~/-]*")
_UNIT = re.compile(r"[0-9]{1,3}")
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9]+")
_SHOW_CHARS = 24

# Flood handling: a burst of drops is logged once; it ends after this long without a drop.
_FLOOD_QUIET_S = 10.0
_MAX_REMEMBERED_DROPS = 4096


# ----------------------------------------------------------------------------------------------- TXT format


def _show(raw: bytes, limit: int = _SHOW_CHARS) -> str:
    """A short, printable, quoted rendering of attacker-controlled bytes for reasons and logs."""
    text = raw[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text)
    return f"'{text}{'...' if len(raw) > limit else ''}'"


def _printable(raw: bytes, what: str) -> str:
    if not all(0x20 <= b <= 0x7E for b in raw):
        raise MalformedAnnouncement(f"{what} {_show(raw)} is not printable ASCII")
    return raw.decode("ascii")


def _decode_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str | None]:
    """Check sizes and characters of a TXT record; keys lower-cased, the first of duplicates kept."""
    if not isinstance(properties, Mapping):
        raise MalformedAnnouncement("TXT record is not a key/value mapping")
    total = 0
    fields: dict[str, str | None] = {}
    for raw_key, raw_value in properties.items():
        if not isinstance(raw_key, bytes) or not (raw_value is None or isinstance(raw_value, bytes)):
            raise MalformedAnnouncement("TXT keys and values must be bytes")
        size = len(raw_key) + (0 if raw_value is None else 1 + len(raw_value))
        if size > MAX_TXT_STRING_BYTES:
            raise MalformedAnnouncement(
                f"TXT string for key {_show(raw_key)} is {size} bytes (max {MAX_TXT_STRING_BYTES})"
            )
        total += 1 + size
        if total > MAX_TXT_TOTAL_BYTES:
            raise MalformedAnnouncement(f"TXT record is over {MAX_TXT_TOTAL_BYTES} bytes")
        if not raw_key:
            continue  # an empty TXT string (or "=value"): nothing to read, RFC 6763 6.4 says ignore it
        key = _printable(raw_key, "TXT key").lower()
        if "=" in key:
            raise MalformedAnnouncement(f"TXT key {_show(raw_key)} contains '='")
        value = None if raw_value is None else _printable(raw_value, f"value of {key!r}")
        if value is not None and len(value) > MAX_VALUE_CHARS:
            raise MalformedAnnouncement(
                f"value of {key!r} is too long ({len(value)} > {MAX_VALUE_CHARS} chars)"
            )
        fields.setdefault(key, value)  # RFC 6763 6.4: only the first occurrence of a key counts
    return fields


def _required(fields: Mapping[str, str | None], key: str) -> str:
    if key not in fields:
        raise MalformedAnnouncement(f"missing {key}")
    value = fields[key]
    if value is None:
        raise MalformedAnnouncement(f"{key} has no value")
    value = value.strip()
    if not value:
        raise MalformedAnnouncement(f"empty {key}")
    return value


def _optional(fields: Mapping[str, str | None], key: str, default: str) -> str:
    if key not in fields:
        return default
    value = fields[key]
    if value is None:
        raise MalformedAnnouncement(f"{key} has no value")
    return value.strip()


def _check_version(version: str) -> str:
    match = _VERSION.fullmatch(version)
    if match is None:
        raise MalformedAnnouncement(f"protocol version {version!r} is not MAJOR.MINOR")
    if int(match.group(1)) != 1:
        raise MalformedAnnouncement(f"unsupported protocol version {version!r} (this hub speaks 1.x)")
    return version


def _check_path(path: str) -> str:
    if not _PATH.fullmatch(path) or "//" in path:
        raise MalformedAnnouncement(f"path {path!r} is not an absolute URL path")
    return path.rstrip("/") or DEFAULT_PATH


def _check_unit(unit: str) -> str:
    if not _UNIT.fullmatch(unit) or not 0 <= int(unit) <= 247:
        raise MalformedAnnouncement(f"Modbus unit {unit!r} is not an integer 0..247")
    return str(int(unit))


def parse_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """Validate a module's ``_ores._tcp`` TXT record (as ``ServiceInfo.properties``) and normalise it.

    Returns every known key (``pv kind vendor model serial tp path unit prov``, defaults filled in, values
    stripped) plus any unknown keys (kept for diagnostics; a key without ``=`` maps to ``""``).  Raises
    ``MalformedAnnouncement`` with a precise reason for anything outside docs/discovery.md.
    """
    fields = _decode_txt(properties)
    result = {k: ("" if v is None else v) for k, v in fields.items()}
    result["pv"] = _check_version(_required(fields, "pv"))
    kind = _required(fields, "kind")
    if kind not in _KINDS:
        raise MalformedAnnouncement(f"unknown kind {kind!r}")
    result["kind"] = kind
    for key in ("vendor", "model", "serial"):
        result[key] = _required(fields, key)
    if len(result["serial"]) > MAX_SERIAL_CHARS:
        raise MalformedAnnouncement(
            f"serial is too long ({len(result['serial'])} > {MAX_SERIAL_CHARS} chars)"
        )
    transport = _required(fields, "tp")
    if transport not in TRANSPORTS:
        raise MalformedAnnouncement(
            f"unknown transport {transport!r} (tp must be one of {', '.join(TRANSPORTS)})"
        )
    result["tp"] = transport
    result["path"] = _check_path(_optional(fields, "path", DEFAULT_PATH))
    result["unit"] = _check_unit(_optional(fields, "unit", "1"))
    prov = _optional(fields, "prov", "0")
    if prov not in ("0", "1"):
        raise MalformedAnnouncement(f"prov {prov!r} is not 0 or 1")
    result["prov"] = prov
    return result


def parse_hub_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """Validate the hub's ``_ores-hub._tcp`` TXT record (``pv api id name pair``); for modules and tests."""
    fields = _decode_txt(properties)
    result = {k: ("" if v is None else v) for k, v in fields.items()}
    result["pv"] = _check_version(_required(fields, "pv"))
    api = _required(fields, "api")
    if not _PATH.fullmatch(api):
        raise MalformedAnnouncement(f"api {api!r} is not an absolute URL path")
    result["api"] = api
    result["id"] = _required(fields, "id")
    result["name"] = _optional(fields, "name", "")
    pair = _optional(fields, "pair", "0")
    if pair not in ("0", "1"):
        raise MalformedAnnouncement(f"pair {pair!r} is not 0 or 1")
    result["pair"] = pair
    return result


def _encode(txt: Mapping[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode("utf-8"): v.encode("utf-8") for k, v in txt.items()}


def module_txt(
    *,
    kind: DeviceKind | str,
    vendor: str,
    model: str,
    serial: str,
    transport: str,
    path: str = DEFAULT_PATH,
    unit: int = 1,
    provisioned: bool = False,
    protocol_version: str = PROTOCOL_VERSION,
) -> dict[str, str]:
    """The TXT record a module announces (``path`` and ``prov`` for ORES-HTTP, ``unit`` for SunSpec).

    Raises ``ValueError`` when the values cannot be announced validly (too long, not ASCII, ...).
    """
    txt = {
        "pv": protocol_version,
        "kind": str(kind),
        "vendor": vendor,
        "model": model,
        "serial": serial,
        "tp": transport,
    }
    if transport == TP_ORES_HTTP:
        txt["path"] = path
        txt["prov"] = "1" if provisioned else "0"
    else:
        txt["unit"] = str(unit)  # a SunSpec module cannot be provisioned: no prov
    try:
        parse_txt(_encode(txt))
    except (MalformedAnnouncement, UnicodeEncodeError) as err:
        raise ValueError(f"cannot announce this module: {err}") from err
    return txt


def hub_txt(*, hub_id: str, name: str, api_path: str = "/", pairing_open: bool = False) -> dict[str, str]:
    """The hub's TXT record; the site name is folded to printable ASCII and cut to 64 characters."""
    txt = {
        "pv": PROTOCOL_VERSION,
        "api": api_path,
        "id": hub_id,
        "name": ascii_text(name),
        "pair": "1" if pairing_open else "0",
    }
    try:
        parse_hub_txt(_encode(txt))
    except (MalformedAnnouncement, UnicodeEncodeError) as err:
        raise ValueError(f"cannot advertise this hub: {err}") from err
    return txt


def ascii_text(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """Fold text to printable ASCII (accents dropped, anything else becomes ``?``), at most ``limit`` chars.

    >>> ascii_text("Maison Sévérine")
    'Maison Severine'
    """
    decomposed = unicodedata.normalize("NFKD", text)
    kept = (c for c in decomposed if not unicodedata.combining(c))
    folded = "".join(c if " " <= c <= "~" else "?" for c in kept)
    return " ".join(folded.split())[:limit]


def instance_name(vendor: str, serial: str) -> str:
    """The mDNS instance name of a module: ``<vendor>-<serial>`` reduced to letters, digits and ``-``.

    >>> instance_name("Acme Solar", "SN 001/A")
    'Acme-Solar-SN-001-A'
    """
    name = _LABEL_UNSAFE.sub("-", ascii_text(f"{vendor}-{serial}", limit=4 * MAX_DNS_LABEL)).strip("-")
    return name[:MAX_DNS_LABEL].rstrip("-") or "ores-module"


# ------------------------------------------------------------------------------------------ from a service


class ResolvedService(Protocol):
    """What ``sighting_from_service`` reads: satisfied by zeroconf's ``ServiceInfo``/``AsyncServiceInfo``."""

    @property
    def name(self) -> str: ...

    @property
    def port(self) -> int | None: ...

    @property
    def properties(self) -> Mapping[bytes, bytes | None]: ...

    def parsed_scoped_addresses(self, version: IPVersion = ...) -> list[str]: ...


def _pick_host(service: ResolvedService) -> str:
    """The address to reach a module at: IPv4 first, then global IPv6, then scoped link-local IPv6."""
    ranked: list[tuple[int, int, str]] = []
    seen: list[str] = []
    for order, text in enumerate(
        service.parsed_scoped_addresses(IPVersion.V4Only) + service.parsed_scoped_addresses(IPVersion.V6Only)
    ):
        seen.append(text)
        plain, _, scope = text.partition("%")
        try:
            ip = ipaddress.ip_address(plain)
        except ValueError:
            continue
        if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and ip.is_reserved):
            continue
        if ip.version == 4:
            rank = 1 if ip.is_link_local else 0
        elif ip.is_link_local:
            if not scope:
                continue  # unusable without its interface
            rank = 3
        else:
            rank = 2
        ranked.append((rank, order, text))
    if not ranked:
        if seen:
            raise MalformedAnnouncement(f"no usable address (got {', '.join(seen[:4])})")
        raise MalformedAnnouncement("no address record")
    return min(ranked)[2]


def sighting_from_service(service: ResolvedService, *, key: str | None = None) -> Sighting:
    """Turn a resolved ``_ores._tcp`` service into a ``Sighting`` (``key`` defaults to the service name).

    Raises ``MalformedAnnouncement`` with a precise reason: a TXT problem (see ``parse_txt``), no SRV record
    or port 0, no usable address.
    """
    text = getattr(service, "text", None)
    if isinstance(text, bytes) and len(text) > MAX_TXT_TOTAL_BYTES:
        raise MalformedAnnouncement(f"TXT record is over {MAX_TXT_TOTAL_BYTES} bytes")
    fields = parse_txt(service.properties)
    port = service.port
    if port is None:
        raise MalformedAnnouncement("no SRV record (no port)")
    if not 1 <= port <= 65535:
        raise MalformedAnnouncement(f"port {port} is not 1..65535")
    host = _pick_host(service)
    if fields["tp"] == TP_SUNSPEC:
        address = Address("modbus", host, port, "", int(fields["unit"]))
    else:
        address = Address("http", host, port, fields["path"])
    return Sighting(
        source=Source.MDNS,
        key=key if key is not None else service.name,
        kind=DeviceKind(fields["kind"]),
        vendor=fields["vendor"],
        model=fields["model"],
        serial=fields["serial"],
        protocol=fields["tp"],
        address=address,
        protocol_version=fields["pv"],
        unprovisioned=fields["prov"] == "0",
        raw=fields,
    )


# ------------------------------------------------------------------------------------------------ zeroconf


def open_zeroconf(
    interfaces: Sequence[str] | None = None, *, ip_version: IPVersion | None = None
) -> AsyncZeroconf:
    """Open an ``AsyncZeroconf`` on the running event loop (all interfaces by default); the caller closes it.

    Must be called from a coroutine: zeroconf then runs on this loop instead of starting its own thread.
    ``interfaces`` lists interface addresses (``["127.0.0.1"]`` in tests).  Raises ``DiscoveryError`` when
    the multicast sockets cannot be opened.
    """
    asyncio.get_running_loop()  # RuntimeError outside a loop, before zeroconf would start a thread
    choice: list[str] | InterfaceChoice = list(interfaces) if interfaces else InterfaceChoice.All
    try:
        return AsyncZeroconf(interfaces=choice, ip_version=ip_version)
    except OSError as err:
        raise DiscoveryError(f"cannot open mDNS sockets: {err}") from err


@dataclass(frozen=True, slots=True)
class BrowserStats:
    """Counters of an ``MdnsBrowser`` (for diagnostics and tests).

    heard: service state changes received; admitted: resolutions queued; dropped: announcements refused by
    the flood guard; seen / rejected / gone: reports made to the sink; pending / in_flight: work right now.
    """

    heard: int
    admitted: int
    dropped: int
    seen: int
    rejected: int
    gone: int
    pending: int
    in_flight: int


class MdnsBrowser:
    """Browse ``_ores._tcp.local.`` and report what is heard to a ``SightingSink``.

    ``zeroconf`` is a shared instance (not closed here); without one the browser opens its own on
    ``interfaces`` (all by default) in ``start`` and closes it in ``stop``.  Flood guard: a resolution is
    admitted only with a token from a bucket of ``burst`` tokens refilled at ``rate_per_s`` and while fewer
    than ``max_pending`` wait; at most ``max_concurrent`` resolver tasks run.  A dropped announcement is heard
    again on a change of its records or at the next ``rescan()``.
    """

    def __init__(
        self,
        sink: SightingSink,
        *,
        zeroconf: AsyncZeroconf | None = None,
        interfaces: list[str] | None = None,
        service_type: str = MODULE_SERVICE_TYPE,
        max_concurrent: int = 8,
        max_pending: int = 64,
        burst: int = 64,
        rate_per_s: float = 4.0,
        resolve_timeout_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if zeroconf is not None and interfaces is not None:
            raise ValueError("pass either a shared zeroconf instance or interfaces, not both")
        if max_concurrent < 1 or max_pending < 1 or burst < 1 or rate_per_s <= 0 or resolve_timeout_s <= 0:
            raise ValueError("flood limits and the resolve timeout must be positive")
        self._sink = sink
        self._aiozc = zeroconf
        self._owns_zeroconf = False
        self._interfaces = interfaces
        self._type = service_type
        self._max_concurrent = max_concurrent
        self._max_pending = max_pending
        self._burst = float(burst)
        self._rate = rate_per_s
        self._timeout_s = resolve_timeout_s
        self._clock = clock
        self._browser: AsyncServiceBrowser | None = None
        self._running = False
        self._tokens = float(burst)
        self._refilled_at = clock()
        self._pending: dict[str, None] = {}  # insertion-ordered queue of names to resolve
        self._in_flight: set[str] = set()
        self._again: set[str] = set()  # changed while being resolved (admitted): resolve once more
        self._withdrawn: set[str] = set()  # removed while being resolved: discard the result
        self._reported: dict[str, str] = {}  # name -> last reason reported ("" for seen)
        self._workers: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flood_since: float | None = None
        self._flood_dropped = 0
        self._last_drop = 0.0
        # Names dropped by the flood guard, retried once the flood is over (bounded; oldest forgotten).
        self._dropped_names: dict[str, None] = {}
        self._retry_task: asyncio.Task[None] | None = None
        self._counts = {"heard": 0, "admitted": 0, "dropped": 0, "seen": 0, "rejected": 0, "gone": 0}

    # ---------------------------------------------------------------------------------------- lifecycle

    @property
    def zeroconf(self) -> AsyncZeroconf:
        if self._aiozc is None:
            raise DiscoveryError("the mDNS browser is not started")
        return self._aiozc

    @property
    def running(self) -> bool:
        return self._running

    @property
    def stats(self) -> BrowserStats:
        c = self._counts
        return BrowserStats(
            heard=c["heard"],
            admitted=c["admitted"],
            dropped=c["dropped"],
            seen=c["seen"],
            rejected=c["rejected"],
            gone=c["gone"],
            pending=len(self._pending),
            in_flight=len(self._in_flight),
        )

    async def start(self) -> None:
        """Open zeroconf if needed and start browsing (cached services are reported at once).  Idempotent."""
        if self._running:
            return
        if self._aiozc is None:
            self._aiozc = open_zeroconf(self._interfaces)
            self._owns_zeroconf = True
        self._running = True  # before the browser exists: it replays zeroconf's cache while it is built
        try:
            self._browser = self._new_browser()
        except DiscoveryError:
            await self.stop()
            raise
        _LOGGER.info("mDNS: browsing %s", self._type)

    async def stop(self) -> None:
        """Stop browsing, cancel resolutions and close zeroconf if this browser opened it.  Idempotent."""
        self._running = False
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        workers = list(self._workers)
        if self._retry_task is not None:
            workers.append(self._retry_task)
            self._retry_task = None
        self._dropped_names.clear()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._pending.clear()
        self._again.clear()
        self._withdrawn.clear()
        self._idle.set()
        self._end_flood(force=True)
        if self._owns_zeroconf and self._aiozc is not None:
            aiozc, self._aiozc = self._aiozc, None
            self._owns_zeroconf = False
            await aiozc.async_close()

    async def rescan(self) -> None:
        """Query the network again and re-examine every cached service (each is reported again).

        Replaces the zeroconf browser: the new one replays the cache through the flood guard and sends fresh
        queries, so services dropped during a flood or missed earlier are heard now.
        """
        if self._browser is None:
            raise DiscoveryError("the mDNS browser is not started")
        old, self._browser = self._browser, self._new_browser()
        await old.async_cancel()

    async def drain(self) -> None:
        """Wait until no resolution is pending or running (for tests and orderly shutdown)."""
        await self._idle.wait()

    def _new_browser(self) -> AsyncServiceBrowser:
        try:
            return AsyncServiceBrowser(
                self.zeroconf.zeroconf, self._type, handlers=[self.on_service_state_change]
            )
        except BadTypeInNameException as err:
            raise DiscoveryError(f"bad service type {self._type!r}: {err}") from err

    # ------------------------------------------------------------------------------------ zeroconf side

    def on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """The ``AsyncServiceBrowser`` handler (keyword-called by zeroconf, on the event loop).  Never raises."""
        try:
            self._counts["heard"] += 1
            if not self._running or service_type.lower() != self._type.lower():
                return  # stopped, or not the type this browser watches
            if state_change is ServiceStateChange.Removed:
                self._on_removed(name)
            else:
                self._admit(name)
        except Exception:
            _LOGGER.exception("mDNS: failed to handle %s of %s", state_change, name)

    def _admit(self, name: str) -> None:
        """Queue a resolution of ``name`` if the flood guard allows; every resolution costs a token."""
        if name in self._pending or name in self._again:
            return  # already queued: that resolution will read the newest records
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now
        if len(self._pending) >= self._max_pending:
            self._drop(name, now, f"more than {self._max_pending} resolutions pending")
            return
        if self._tokens < 1.0:
            self._drop(name, now, f"more than {self._burst:.0f} announcements in a burst")
            return
        self._end_flood(now=now)
        self._tokens -= 1.0
        self._counts["admitted"] += 1
        if name in self._in_flight:
            self._again.add(name)  # changed while being resolved: once more when that resolution ends
        else:
            self._enqueue(name)

    def _enqueue(self, name: str) -> None:
        self._pending[name] = None
        self._idle.clear()
        if len(self._workers) < self._max_concurrent:
            self._spawn()

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._worker(), name=f"mdns-resolve-{self._type}")
        self._workers.add(task)
        task.add_done_callback(self._worker_done)

    def _drop(self, name: str, now: float, why: str) -> None:
        self._counts["dropped"] += 1
        self._last_drop = now
        if self._flood_since is None:
            self._flood_since = now
            self._flood_dropped = 0
            _LOGGER.warning(
                "mDNS: announcement flood, dropping announcements (%s; first: %s); "
                "further drops are counted, not logged",
                why,
                _show(name.encode("utf-8", "replace"), limit=255),
            )
        self._flood_dropped += 1
        self._dropped_names.pop(name, None)
        self._dropped_names[name] = None
        while len(self._dropped_names) > _MAX_REMEMBERED_DROPS:
            del self._dropped_names[next(iter(self._dropped_names))]
        if self._running and (self._retry_task is None or self._retry_task.done()):
            self._retry_task = asyncio.get_running_loop().create_task(
                self._retry_dropped(), name=f"mdns-retry-{self._type}"
            )

    async def _retry_dropped(self) -> None:
        """Once announcements have been quiet for a while, admit the names the flood guard dropped (as many
        as the bucket allows; the rest wait for the next quiet spell).  Only dropped names are retried, so a
        large installation announcing at once is onboarded in a few rounds instead of waiting for a rescan."""
        while self._running and self._dropped_names:
            quiet_for = self._clock() - self._last_drop
            if quiet_for < _FLOOD_QUIET_S:
                await asyncio.sleep(max(0.5, _FLOOD_QUIET_S - quiet_for))
                continue
            self._end_flood(force=True)
            names = list(self._dropped_names)
            self._dropped_names.clear()
            for name in names:
                self._admit(name)

    def _end_flood(self, *, now: float | None = None, force: bool = False) -> None:
        if self._flood_since is None:
            return
        if not force and (now if now is not None else self._clock()) - self._last_drop < _FLOOD_QUIET_S:
            return
        _LOGGER.warning(
            "mDNS: announcement flood over, %d announcements dropped (a rescan hears them again)",
            self._flood_dropped,
        )
        self._flood_since = None

    def _on_removed(self, name: str) -> None:
        self._dropped_names.pop(name, None)
        self._pending.pop(name, None)
        self._again.discard(name)
        if name in self._in_flight:
            self._withdrawn.add(name)
        if self._reported.pop(name, None) is not None:
            self._counts["gone"] += 1
            _LOGGER.info("mDNS: %s is gone", name)
            self._call_sink("gone", Source.MDNS, name, "mDNS announcement ended (goodbye or TTL expired)")

    # ------------------------------------------------------------------------------------- resolution

    async def _worker(self) -> None:
        """Resolve queued names one after another until the queue is empty (at most ``max_concurrent`` run)."""
        while self._pending:
            name = next(iter(self._pending))
            del self._pending[name]
            self._in_flight.add(name)
            try:
                await self._resolve(name)
            finally:
                self._in_flight.discard(name)
                self._withdrawn.discard(name)
                if name in self._again:
                    self._again.discard(name)
                    self._pending[name] = None  # its token was taken when the change was admitted

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error("mDNS: resolver task failed", exc_info=task.exception())
            if self._pending and self._running:
                self._spawn()
        if not self._workers:
            if not self._running:
                self._pending.clear()
            if not self._pending:
                self._idle.set()

    async def _resolve(self, name: str) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        try:
            info = AsyncServiceInfo(self._type, name)
        except BadTypeInNameException as err:
            self._reject(name, f"bad service name: {err}")
            return
        try:
            complete = await info.async_request(aiozc.zeroconf, self._timeout_s * 1000)
        except NotRunningException:
            return  # zeroconf is closing
        if name in self._withdrawn or not self._running:
            return
        try:
            sighting = sighting_from_service(info, key=name)
        except MalformedAnnouncement as err:
            reason = str(err) if complete else f"no complete answer within {self._timeout_s:g} s: {err}"
            self._reject(name, reason)
            return
        self._reported[name] = ""
        self._counts["seen"] += 1
        _LOGGER.debug("mDNS: %s is %s %s at %s", name, sighting.kind, sighting.claimed_id, sighting.address)
        self._call_sink("seen", sighting)

    def _reject(self, name: str, reason: str) -> None:
        previous = self._reported.get(name)
        self._reported[name] = reason
        self._counts["rejected"] += 1
        log = _LOGGER.debug if previous == reason else _LOGGER.warning
        log("mDNS: rejected %s: %s", _show(name.encode("utf-8", "replace"), limit=255), reason)
        self._call_sink("rejected", Source.MDNS, name, reason)

    def _call_sink(self, method: str, *args: object) -> None:
        try:
            getattr(self._sink, method)(*args)
        except Exception:
            _LOGGER.exception("mDNS: the sighting sink failed in %s", method)


# ----------------------------------------------------------------------------------------------- the hub


async def register_service(
    aiozc: AsyncZeroconf, info: ServiceInfo, *, probe: bool = True
) -> Awaitable[object]:
    """Register ``info``, probing for a unique name first unless ``probe`` is false (a ``-2`` suffix is added
    on a conflict).  Returns the running announcement (three packets over half a second) to await later.
    Raises ``DiscoveryError`` when zeroconf is closed or the name is invalid."""
    try:
        return await aiozc.async_register_service(
            info, allow_name_change=True, cooperating_responders=not probe
        )
    except (NotRunningException, BadTypeInNameException) as err:
        raise DiscoveryError(f"cannot register {info.name}: {err}") from err


async def withdraw_service(
    aiozc: AsyncZeroconf, info: ServiceInfo | None, announcements: list[Awaitable[object]]
) -> None:
    """Cancel announcements still running (none may follow the goodbye), then unregister ``info`` and wait
    for its goodbye packets.  Empties ``announcements``; only cancels if ``info`` is None or zeroconf closed."""
    pending, announcements[:] = list(announcements), []
    for announcement in pending:
        if isinstance(announcement, asyncio.Future):
            announcement.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if info is None or aiozc.zeroconf.done:
        return
    goodbye = await aiozc.async_unregister_service(info)
    await goodbye


class HubAdvertiser:
    """Announce the hub as ``_ores-hub._tcp.local.`` so modules and apps find it; goodbye on ``stop``.

    The instance name is derived from the hub id (stable across renames); ``update`` changes the TXT record
    (site name, pairing window) in place.  The shared ``zeroconf`` instance is not closed here.
    """

    def __init__(
        self,
        *,
        zeroconf: AsyncZeroconf,
        hub_id: str,
        name: str,
        port: int,
        addresses: list[str],
        api_path: str = "/",
        service_type: str = HUB_SERVICE_TYPE,
        probe: bool = True,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ValueError("port must be 1..65535")
        if not addresses:
            raise ValueError("the hub needs at least one address to advertise")
        for address in addresses:
            ipaddress.ip_address(address)  # ValueError for anything but an IP literal
        self._aiozc = zeroconf
        self._hub_id = hub_id
        self._name = name
        self._pairing_open = False
        self._api_path = api_path
        self._port = port
        self._addresses = list(addresses)
        self._type = service_type
        self._probe = probe
        label = instance_name("ores-hub", hub_id)
        self._service_name = f"{label}.{service_type}"
        self._server = f"{label}.local."
        self._txt = hub_txt(hub_id=hub_id, name=name, api_path=api_path)
        self._info: ServiceInfo | None = None
        self._announcements: list[Awaitable[object]] = []

    @property
    def service_name(self) -> str:
        """The full service name (it may gain a ``-2`` suffix if the name was taken on the network)."""
        return self._info.name if self._info is not None else self._service_name

    @property
    def txt(self) -> dict[str, str]:
        return dict(self._txt)

    def _make_info(self) -> ServiceInfo:
        return ServiceInfo(
            self._type,
            self.service_name,
            port=self._port,
            properties=dict(self._txt),
            server=self._server,
            parsed_addresses=self._addresses,
        )

    async def start(self) -> None:
        """Register the service (probing for a unique name first).  Idempotent."""
        if self._info is not None:
            return
        info = self._make_info()
        self._announcements.append(await register_service(self._aiozc, info, probe=self._probe))
        self._info = info
        _LOGGER.info("mDNS: advertising the hub as %s on port %d", info.name, self._port)

    async def update(self, *, name: str | None = None, pairing_open: bool | None = None) -> None:
        """Change the site name and/or the pairing flag; re-announces only if the TXT record changed."""
        if name is not None:
            self._name = name
        if pairing_open is not None:
            self._pairing_open = pairing_open
        txt = hub_txt(
            hub_id=self._hub_id, name=self._name, api_path=self._api_path, pairing_open=self._pairing_open
        )
        if txt == self._txt:
            return
        self._txt = txt
        if self._info is None:
            return
        info = self._make_info()
        try:
            self._announcements.append(await self._aiozc.async_update_service(info))
        except NotRunningException as err:
            raise DiscoveryError(f"cannot update {info.name}: {err}") from err
        self._info = info

    async def stop(self) -> None:
        """Unregister the service and wait for its goodbye packets.  Idempotent."""
        await withdraw_service(self._aiozc, self._info, self._announcements)
        self._info = None
