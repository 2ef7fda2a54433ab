"""The registry of onboarded modules: who they are, where they answer and what the user set for them.

Records live in a tinydb file written through ``hub.storage.AtomicJSONStorage`` (temp file, fsync, rename,
directory fsync), so after a crash at any moment the file holds a complete document and every write that was
acknowledged (its coroutine returned) is in it.  ``Registry`` keeps every record in memory, so reads never
touch the disk; writes run in a worker thread, one at a time.  A module's identity is its ``device_id``
(vendor + serial): registering the same module again, at a new address, updates its record in place.  A
registry file that cannot be read is never discarded: opening it raises ``RegistryCorrupt`` so the hub can
refuse to start with a clear message.  A lock file keeps a second process from opening the same registry.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from tinydb import TinyDB
from tinydb.table import Table

from devices.drivers.base import Address
from devices.model import Capabilities, DeviceInfo, DeviceKind, Identity, make_device_id
from hub.storage import AtomicJSONStorage

__all__ = [
    "DeviceRecord",
    "Registry",
    "RegistryClosed",
    "RegistryCorrupt",
    "RegistryError",
    "RegistryLocked",
    "UnknownDevice",
    "open_db",
    "remove_stale_temp_files",
]

_LOGGER = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The tinydb table holding one document per module.
TABLE_NAME = "devices"

#: Fields ``Registry.update`` may change (identity, device id and registration time are fixed).
UPDATABLE_FIELDS = frozenset(
    {"kind", "identity", "capabilities", "address", "protocol", "name", "authenticated", "settings"}
)


class RegistryError(Exception):
    """Root of the registry's errors."""


class RegistryCorrupt(RegistryError):
    """The registry file exists but cannot be read as a registry; it is left untouched."""


class RegistryLocked(RegistryError):
    """Another registry (in this or another process) has the file open."""


class RegistryClosed(RegistryError):
    """The registry was used after ``close()``."""


class UnknownDevice(RegistryError):
    """No module with this ``device_id`` is registered."""


# --------------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------------


def _known(cls: type[Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls`` (unknown keys are ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _identity_from_dict(data: Any) -> Identity:
    if not isinstance(data, Mapping):
        raise ValueError("identity must be an object")
    known = _known(Identity, data)
    for key in ("vendor", "model", "serial"):
        if not isinstance(known.get(key), str):
            raise ValueError(f"identity.{key} must be a string")
    known["firmware_version"] = str(known.get("firmware_version") or "")
    return Identity(**known)


def _capabilities_from_dict(data: Any) -> Capabilities:
    if data is None:
        return Capabilities()
    if not isinstance(data, Mapping):
        raise ValueError("capabilities must be an object")
    return Capabilities(**_known(Capabilities, data))


def _json_copy(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``settings`` through JSON; ``ValueError`` if they are not JSON-friendly."""
    try:
        copy: dict[str, Any] = json.loads(json.dumps(dict(settings)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"settings must be JSON-serialisable: {err}") from err
    return copy


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One registered module.

    ``device_id`` is ``make_device_id(vendor, serial)``: the identity, never the address.  ``address`` is the
    URL form of ``devices.drivers.base.Address``; ``protocol`` the driver's protocol name; ``name`` the
    user's label; ``registered_at`` POSIX seconds; ``settings`` the user's settings for this module (e.g. a
    plug's priority/critical overrides, a default setpoint), deep-copied into a read-only mapping; they
    must be JSON-serialisable (``ValueError`` otherwise).
    """

    device_id: str
    kind: DeviceKind
    identity: Identity
    capabilities: Capabilities
    address: str
    protocol: str
    name: str = ""
    authenticated: bool = False
    registered_at: float = 0.0
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # A private, deep, read-only copy: a frozen record must not change behind the registry's back.
        object.__setattr__(self, "settings", MappingProxyType(_json_copy(self.settings)))

    @classmethod
    def from_info(
        cls,
        info: DeviceInfo,
        address: Address | str,
        protocol: str,
        *,
        name: str | None = None,
        authenticated: bool = False,
        registered_at: float | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> DeviceRecord:
        """A record for a module a probe has just described."""
        ident = info.identity
        default_name = f"{ident.vendor} {ident.model}".strip() or info.device_id
        return cls(
            device_id=info.device_id,
            kind=info.kind,
            identity=ident,
            capabilities=info.capabilities,
            address=str(address),
            protocol=protocol,
            name=default_name if name is None else name,
            authenticated=authenticated,
            registered_at=time.time() if registered_at is None else registered_at,
            settings=settings or {},
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (enum values as strings, nested dataclasses as objects)."""
        return {
            "device_id": self.device_id,
            "kind": self.kind.value,
            "identity": {f.name: getattr(self.identity, f.name) for f in fields(Identity)},
            "capabilities": {f.name: getattr(self.capabilities, f.name) for f in fields(Capabilities)},
            "address": self.address,
            "protocol": self.protocol,
            "name": self.name,
            "authenticated": self.authenticated,
            "registered_at": self.registered_at,
            "settings": _json_copy(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceRecord:
        """Inverse of ``to_dict``; unknown keys are ignored and unknown kinds become ``UNKNOWN``.

        Raises ``ValueError`` when a required entry is missing or has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ValueError("a device record must be an object")
        identity = _identity_from_dict(data.get("identity"))
        device_id = data.get("device_id")
        if device_id is None:
            device_id = identity.device_id
        if not isinstance(device_id, str) or not device_id:
            raise ValueError("device_id must be a non-empty string")
        address = data.get("address")
        if not isinstance(address, str):
            raise ValueError("address must be a string")
        settings = data.get("settings") or {}
        if not isinstance(settings, Mapping):
            raise ValueError("settings must be an object")
        registered_at = data.get("registered_at") or 0.0
        if not isinstance(registered_at, int | float):
            raise ValueError("registered_at must be a number")
        return cls(
            device_id=device_id,
            kind=DeviceKind(str(data.get("kind", DeviceKind.UNKNOWN.value))),
            identity=identity,
            capabilities=_capabilities_from_dict(data.get("capabilities")),
            address=address,
            protocol=str(data.get("protocol") or ""),
            name=str(data.get("name") or ""),
            authenticated=bool(data.get("authenticated", False)),
            registered_at=float(registered_at),
            settings=settings,
        )


def _normalise_address(address: str) -> str:
    try:
        return str(Address.parse(address))
    except ValueError:
        return address.strip()


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def open_db(path: Path) -> TinyDB:
    """A TinyDB on ``path`` that writes atomically and durably (see ``hub.storage``).

    tinydb reads lazily: an unreadable file shows up as ``json.JSONDecodeError`` on first access.
    """
    return TinyDB(path, storage=AtomicJSONStorage)


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Delete temp files a crashed ``atomic_write_bytes`` left next to ``path``; returns what was removed.

    Call only while no other writer uses ``path`` (e.g. holding its lock).
    """
    removed: list[Path] = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
        except FileNotFoundError:
            continue
        removed.append(tmp)
        _LOGGER.info("removed leftover temp file %s", tmp)
    return removed


def _acquire_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise RegistryLocked(f"registry {path} is already open (lock {lock_path} is held)") from err
    except OSError:
        os.close(fd)
        raise
    return fd


def _load(db: TinyDB, path: Path) -> tuple[dict[str, DeviceRecord], dict[str, int]]:
    """Read and check every record; raise ``RegistryCorrupt`` rather than drop anything."""
    try:
        tables = db.storage.read()
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise RegistryCorrupt(f"registry file {path} is not valid JSON ({err}); left untouched") from err
    except OSError as err:
        raise RegistryError(f"cannot read registry file {path}: {err}") from err
    records: dict[str, DeviceRecord] = {}
    doc_ids: dict[str, int] = {}
    if tables is None:
        return records, doc_ids
    if not isinstance(tables, dict):
        raise RegistryCorrupt(f"registry file {path} does not hold a tinydb document; it was left untouched")
    table = tables.get(TABLE_NAME, {})
    if not isinstance(table, dict):
        raise RegistryCorrupt(f"registry file {path}: table {TABLE_NAME!r} is not an object")
    try:
        ordered = sorted(table.items(), key=lambda item: int(item[0]))
    except ValueError as err:
        raise RegistryCorrupt(f"registry file {path}: document ids must be integers") from err
    for raw_id, doc in ordered:
        try:
            record = DeviceRecord.from_dict(doc)
        except (ValueError, TypeError) as err:
            raise RegistryCorrupt(f"registry file {path}: device document {raw_id}: {err}") from err
        if record.device_id in records:
            _LOGGER.warning("registry %s holds %s twice; using the newer document", path, record.device_id)
        records[record.device_id] = record
        doc_ids[record.device_id] = int(raw_id)
    return records, doc_ids


# --------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------


class Registry:
    """The registered modules, cached in memory and persisted atomically.

    Reads (``get``, ``all``, ``find_by_address``) are instant.  Writes (``upsert``, ``update``, ``remove``)
    return only after the new document is durably on disk; they are serialised, and a write whose caller
    is cancelled still completes consistently in its worker thread.
    """

    def __init__(self, path: Path) -> None:
        """Open (or create) the registry at ``path``.  Blocking (reads the file): see ``Registry.open``.

        Raises ``RegistryCorrupt`` for an unreadable file, ``RegistryLocked`` if it is already open.
        """
        self._path = Path(path)
        self._lock_fd: int | None = _acquire_lock(self._path)
        try:
            remove_stale_temp_files(self._path)
            self._db = open_db(self._path)
            self._table: Table = self._db.table(TABLE_NAME)
            self._records, self._doc_ids = _load(self._db, self._path)
        except BaseException:
            self._release_lock()
            raise
        self._write_lock = asyncio.Lock()  # keeps callers queued on the loop rather than in threads
        self._thread_lock = threading.Lock()  # guards the file and the cache against a cancelled caller
        self._closed = False
        #: Bumped after every write; lets readers cache views of the registry.
        self.version = 0
        _LOGGER.debug("registry %s opened with %d devices", self._path, len(self._records))

    @classmethod
    async def open(cls, path: Path) -> Registry:
        """Open the registry without blocking the event loop."""
        return await asyncio.to_thread(cls, path)

    @property
    def path(self) -> Path:
        return self._path

    # -- reads -------------------------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._records.get(device_id)

    def all(self) -> list[DeviceRecord]:
        """Every record, in registration order."""
        return list(self._records.values())

    def find_by_address(self, address: str) -> DeviceRecord | None:
        """The record at ``address`` (compared in normalised URL form), if any."""
        wanted = _normalise_address(address)
        for record in self._records.values():
            if _normalise_address(record.address) == wanted:
                return record
        return None

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._records

    # -- writes ------------------------------------------------------------------------------------------

    async def upsert(self, record: DeviceRecord) -> tuple[DeviceRecord, bool]:
        """Register a module, or refresh a registered one; returns the stored record and whether it is new.

        For a module already registered, what describes the module (kind, identity, capabilities,
        address, protocol, authenticated) comes from ``record``; what the user owns (name, settings) and
        ``registered_at`` are kept.  Raises ``ValueError`` if ``device_id`` does not match the identity.
        """
        expected = make_device_id(record.identity.vendor, record.identity.serial)
        if record.device_id != expected:
            raise ValueError(f"device_id {record.device_id!r} does not match the identity ({expected!r})")

        def op() -> tuple[DeviceRecord, bool]:
            existing = self._records.get(record.device_id)
            if existing is None:
                new = record if record.registered_at else replace(record, registered_at=time.time())
                doc_id = self._table.insert(new.to_dict())
                self._doc_ids[new.device_id] = doc_id
                self._records[new.device_id] = new
                return new, True
            merged = replace(
                existing,
                kind=record.kind,
                identity=record.identity,
                capabilities=record.capabilities,
                address=record.address,
                protocol=record.protocol,
                authenticated=record.authenticated,
            )
            if merged != existing:
                self._store(merged)
            return merged, False

        return await self._write(op)

    async def update(self, device_id: str, /, **changes: Any) -> DeviceRecord:
        """Change some fields of a registered module; returns the new record.

        Allowed fields: kind, identity (model and firmware version; vendor and serial are the id),
        capabilities, address, protocol, name, authenticated, settings (replaced whole).  Raises ``UnknownDevice`` or ``ValueError`` (field not allowed or of the wrong type).
        """
        _validate_changes(changes)

        def op() -> DeviceRecord:
            existing = self._records.get(device_id)
            if existing is None:
                raise UnknownDevice(f"no registered device {device_id!r}")
            new = replace(existing, **changes)
            if new.identity.device_id != existing.device_id:
                raise ValueError("an identity change may not change vendor or serial (the device id)")
            if new != existing:
                self._store(new)
            return new

        return await self._write(op)

    async def remove(self, device_id: str) -> bool:
        """Forget a module; returns whether it was registered."""

        def op() -> bool:
            doc_id = self._doc_ids.get(device_id)
            if doc_id is None:
                return False
            self._table.remove(doc_ids=[doc_id])
            del self._doc_ids[device_id]
            del self._records[device_id]
            return True

        return await self._write(op)

    def close(self) -> None:
        """Release the file.  Safe to call twice; later writes raise ``RegistryClosed``."""
        if self._closed:
            return
        self._closed = True
        with self._thread_lock:  # let a write already running in a worker thread finish
            self._db.close()
            self._release_lock()

    # -- internals ---------------------------------------------------------------------------------------

    def _store(self, record: DeviceRecord) -> None:
        """Write ``record`` over its document (unknown keys a newer version wrote are kept)."""
        doc_id = self._doc_ids[record.device_id]
        if not self._table.update(record.to_dict(), doc_ids=[doc_id]):
            self._doc_ids[record.device_id] = self._table.insert(record.to_dict())
        self._records[record.device_id] = record

    async def _write(self, op: Callable[[], _T]) -> _T:
        if self._closed:
            raise RegistryClosed(f"registry {self._path} is closed")
        async with self._write_lock:
            try:
                return await asyncio.to_thread(self._run_locked, op)
            finally:
                self.version += 1

    def _run_locked(self, op: Callable[[], _T]) -> _T:
        with self._thread_lock:
            if self._closed:
                raise RegistryClosed(f"registry {self._path} is closed")
            try:
                return op()
            except OSError as err:
                raise RegistryError(f"cannot write registry file {self._path}: {err}") from err
            except (json.JSONDecodeError, UnicodeDecodeError) as err:  # the file was changed behind our back
                raise RegistryCorrupt(f"registry file {self._path} became unreadable: {err}") from err

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


_CHANGE_TYPES: dict[str, type | tuple[type, ...]] = {
    "kind": DeviceKind,
    "identity": Identity,
    "capabilities": Capabilities,
    "address": str,
    "protocol": str,
    "name": str,
    "authenticated": bool,
    "settings": Mapping,
}


def _validate_changes(changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        if key not in UPDATABLE_FIELDS:
            allowed = ", ".join(sorted(UPDATABLE_FIELDS))
            raise ValueError(f"field {key!r} cannot be changed (allowed: {allowed})")
        if not isinstance(value, _CHANGE_TYPES[key]):
            raise ValueError(f"field {key!r} has the wrong type {type(value).__name__}")
        if isinstance(value, Mapping):
            _json_copy(value)
