"""The hub's trusted vendor keys: which Ed25519 keys may sign device certificates and firmware images.

``TrustStore`` keeps ``VendorKey`` entries (key id, vendor, public key, purposes ``"device"`` and/or
``"firmware"``, who added it and when, which key it replaced) in a tinydb file written through
``hub.storage.AtomicJSONStorage`` (temp file, fsync, rename; mode 0600).  Reads are synchronous and served
from memory; ``trusted(purpose)`` returns a live, cheap mapping (key id → ``VendorKey``) that
``devices.attest.verify_attestation`` and firmware verification look keys up in, so a removed key is refused
from the next lookup on.  Writes are ``async`` and run the file write in a thread, one at a time.  A vendor
rotates its key by signing, with the OLD key, the statement ``rotation_statement(old_key_id, new_key)``
(``b"ORES-KEY-ROTATE-1\\0" + old_key_id + b"\\0" + raw new key``): ``rotate`` then trusts the new key for the
same vendor and purposes and forgets the old one.  Every refusal is a ``TrustError``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from tinydb import TinyDB
from tinydb.table import Table

from devices.attest import encode_b64, key_id, public_key_from_raw
from hub.storage import AtomicJSONStorage

__all__ = [
    "PURPOSES",
    "ROTATION_DOMAIN",
    "BadKey",
    "BadRotation",
    "TrustError",
    "TrustStorageError",
    "TrustStore",
    "UnknownKey",
    "VendorKey",
    "parse_public_key",
    "rotation_statement",
    "sign_rotation",
]

_LOGGER = logging.getLogger(__name__)

#: What a vendor key may be trusted for.
PURPOSES: Final = frozenset({"device", "firmware"})
#: Prefix of the statement a vendor signs with its old key to rotate to a new one.
ROTATION_DOMAIN: Final = b"ORES-KEY-ROTATE-1\0"
_TABLE: Final = "vendor_keys"
_MAX_VENDOR_LEN: Final = 128
_MAX_KEY_TEXT: Final = 4096

_T = TypeVar("_T")


class TrustError(Exception):
    """Root of the trust store's errors; the message says what was refused and why."""


class UnknownKey(TrustError):
    """No trusted key has this id."""


class BadKey(TrustError):
    """A key, or its entry (vendor, purposes), is not acceptable: not Ed25519, malformed, weak, duplicate."""


class BadRotation(TrustError):
    """A rotation whose signature is not the old key's over the rotation statement, or whose new key is
    unusable."""


class TrustStorageError(TrustError):
    """The trust file cannot be read or written."""


@dataclass(frozen=True, slots=True)
class VendorKey:
    """One trusted vendor key (satisfies ``devices.attest.TrustedKey``).  ``added_at`` is POSIX seconds."""

    key_id: str
    vendor: str
    public_key: Ed25519PublicKey = field(hash=False)
    purposes: frozenset[str]
    added_at: float
    added_by: str | None = None
    replaces: str | None = None

    @property
    def public_key_b64(self) -> str:
        """The raw 32-byte public key in standard base64."""
        return encode_b64(self.public_key.public_bytes_raw())

    def to_dict(self) -> dict[str, Any]:
        """The stored (and API-friendly) form."""
        return {
            "key_id": self.key_id,
            "vendor": self.vendor,
            "public_key": self.public_key_b64,
            "purposes": sorted(self.purposes),
            "added_at": self.added_at,
            "added_by": self.added_by,
            "replaces": self.replaces,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> VendorKey:
        """Read a stored entry; raises ``BadKey`` if it is malformed or its key id does not match its key."""
        try:
            public_key = parse_public_key(str(doc["public_key"]))
            purposes = _purposes(doc["purposes"])
            added_by = doc.get("added_by")
            replaces = doc.get("replaces")
            entry = cls(
                key_id=str(doc["key_id"]),
                vendor=_vendor(doc["vendor"]),
                public_key=public_key,
                purposes=purposes,
                added_at=float(doc["added_at"]),
                added_by=None if added_by is None else str(added_by),
                replaces=None if replaces is None else str(replaces),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BadKey(f"malformed trust entry: {err!r}") from err
        if entry.key_id != key_id(public_key):
            raise BadKey(f"trust entry {entry.key_id} holds a key whose id is {key_id(public_key)}")
        return entry


# ----------------------------------------------------------------------------------------------- helpers


def parse_public_key(text: str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, its raw 32 bytes, their standard base64, or a PEM
    ``PUBLIC KEY`` block.  Raises ``BadKey`` for anything else, and for weak (small-order) keys."""
    if isinstance(text, Ed25519PublicKey):
        raw = text.public_bytes_raw()
    elif isinstance(text, bytes):
        raw = text
    elif isinstance(text, str):
        text = text.strip()
        if len(text) > _MAX_KEY_TEXT:
            raise BadKey("public key text is too long")
        if text.startswith("-----BEGIN"):
            try:
                loaded = load_pem_public_key(text.encode("ascii"))
            except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as err:
                raise BadKey(f"not a PEM public key: {err}") from err
            if not isinstance(loaded, Ed25519PublicKey):
                raise BadKey(f"not an Ed25519 key: {type(loaded).__name__}")
            raw = loaded.public_bytes_raw()
        else:
            try:
                raw = base64.b64decode(text.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError) as err:
                raise BadKey(f"public key is neither PEM nor base64: {err}") from err
    else:
        raise BadKey(f"expected a public key, got {type(text).__name__}")
    try:
        return public_key_from_raw(raw)
    except ValueError as err:
        raise BadKey(str(err)) from err


def rotation_statement(old_key_id: str, new_public_key: Ed25519PublicKey) -> bytes:
    """What the old key signs to hand its trust to ``new_public_key``:
    ``b"ORES-KEY-ROTATE-1\\0" + ASCII old_key_id + b"\\0" + raw 32-byte new key``."""
    return ROTATION_DOMAIN + old_key_id.encode("ascii") + b"\0" + new_public_key.public_bytes_raw()


def sign_rotation(old_private_key: Ed25519PrivateKey, new_public_key: Ed25519PublicKey) -> bytes:
    """The vendor's side of a rotation: the old key's signature over the rotation statement."""
    return old_private_key.sign(rotation_statement(key_id(old_private_key.public_key()), new_public_key))


def _vendor(value: object) -> str:
    if not isinstance(value, str):
        raise BadKey(f"vendor: expected a string, got {type(value).__name__}")
    vendor = value.strip()
    if not 1 <= len(vendor) <= _MAX_VENDOR_LEN or not vendor.isprintable():
        raise BadKey(f"vendor: must be 1..{_MAX_VENDOR_LEN} printable characters")
    return vendor


def _purposes(value: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise BadKey("purposes: expected a list of 'device' and/or 'firmware'")
    purposes = frozenset(value)
    unknown = purposes - PURPOSES
    if unknown:
        raise BadKey(
            f"purposes: unknown purpose(s) {sorted(map(str, unknown))}; use 'device' and/or 'firmware'"
        )
    if not purposes:
        raise BadKey("purposes: at least one of 'device' and 'firmware' is required")
    return purposes


def _signature(value: bytes | str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError) as err:
        raise BadRotation(f"rotation signature is not base64: {err}") from err


class _TrustedView(Mapping[str, VendorKey]):
    """Live view of the keys trusted for one purpose (reflects every later change of the store)."""

    __slots__ = ("_purpose", "_store")

    def __init__(self, store: TrustStore, purpose: str) -> None:
        self._store = store
        self._purpose = purpose

    def __getitem__(self, key: str) -> VendorKey:
        entry = self._store.get(key)
        if entry is None or self._purpose not in entry.purposes:
            raise KeyError(key)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, v in self._store._keys.items() if self._purpose in v.purposes])

    def __len__(self) -> int:
        return sum(1 for v in self._store._keys.values() if self._purpose in v.purposes)

    def __repr__(self) -> str:
        return f"<trusted {self._purpose} keys: {sorted(self)}>"


# ----------------------------------------------------------------------------------------------- the store


class TrustStore:
    """The trusted vendor keys of one hub (see the module docstring).

    The constructor reads the file (blocking; ``await TrustStore.open(path)`` does it in a thread).  Raises
    ``TrustStorageError`` for an unreadable file; malformed entries are skipped with a warning (they are
    simply not trusted).  A rotation interrupted by a crash is completed on load.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._clock = clock
        self._keys: dict[str, VendorKey] = {}
        self._doc_ids: dict[str, int] = {}
        self._write_lock = asyncio.Lock()  # queues writers on the loop
        self._thread_lock = threading.Lock()  # guards file and cache against a cancelled writer's thread
        self._views = {purpose: _TrustedView(self, purpose) for purpose in PURPOSES}
        try:
            self._fix_file_mode()
            self._db = TinyDB(self._path, storage=AtomicJSONStorage)
            self._table: Table = self._db.table(_TABLE)
            docs = self._table.all()
        except (OSError, ValueError) as err:
            raise TrustStorageError(f"cannot read trust file {self._path}: {err}") from err
        for doc in docs:
            try:
                entry = VendorKey.from_dict(doc)
            except BadKey as err:
                _LOGGER.warning("trust file %s: skipping entry %s: %s", self._path, doc.doc_id, err)
                continue
            self._keys[entry.key_id] = entry
            self._doc_ids[entry.key_id] = doc.doc_id
        self._finish_rotations()
        _LOGGER.debug("trust store %s opened with %d keys", self._path, len(self._keys))

    @classmethod
    async def open(cls, path: Path, *, clock: Callable[[], float] = time.time) -> TrustStore:
        """Open the store without blocking the event loop."""
        return await asyncio.to_thread(cls, path, clock=clock)

    def _fix_file_mode(self) -> None:
        try:
            mode = stat.S_IMODE(os.stat(self._path).st_mode)
        except FileNotFoundError:
            return
        if mode & 0o077:
            _LOGGER.warning("trust file %s had mode %o; setting it to 600", self._path, mode)
            os.chmod(self._path, 0o600)

    def _finish_rotations(self) -> None:
        """Remove keys that a newer key replaced (only left behind by a crash in the middle of ``rotate``)."""
        for entry in builtins.list(self._keys.values()):
            old = self._keys.get(entry.replaces) if entry.replaces else None
            if old is not None and old.added_at <= entry.added_at:
                _LOGGER.warning(
                    "trust file %s: completing the rotation %s → %s", self._path, old.key_id, entry.key_id
                )
                self._table.remove(doc_ids=[self._doc_ids.pop(old.key_id)])
                del self._keys[old.key_id]

    @property
    def path(self) -> Path:
        return self._path

    # ------------------------------------------------------------------ reads

    def get(self, key_id: str) -> VendorKey | None:
        return self._keys.get(key_id)

    def list(self) -> builtins.list[VendorKey]:
        """Every trusted key, by vendor then age."""
        return sorted(self._keys.values(), key=lambda k: (k.vendor.casefold(), k.added_at, k.key_id))

    def trusted(self, purpose: str) -> Mapping[str, VendorKey]:
        """Key id → key for the keys trusted for ``purpose`` (``"device"`` or ``"firmware"``): a live view,
        so a key removed later is refused from then on.  Raises ``ValueError`` for another purpose."""
        view = self._views.get(purpose)
        if view is None:
            raise ValueError(f"unknown purpose {purpose!r}; use 'device' or 'firmware'")
        return view

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    # ------------------------------------------------------------------ writes

    async def add(
        self,
        vendor: str,
        public_key: str | bytes | Ed25519PublicKey,
        purposes: Iterable[str],
        added_by: str | None = None,
    ) -> VendorKey:
        """Trust a new vendor key (base64 of the raw key, PEM, raw bytes or a key object).

        Raises ``BadKey`` for a malformed or weak key, an unusable vendor or purposes, or a key already
        trusted.
        """
        key = parse_public_key(public_key)
        entry = VendorKey(
            key_id=key_id(key),
            vendor=_vendor(vendor),
            public_key=key,
            purposes=_purposes(purposes),
            added_at=self._clock(),
            added_by=added_by,
        )

        def op() -> VendorKey:
            existing = self._keys.get(entry.key_id)
            if existing is not None:
                raise BadKey(f"key {entry.key_id} is already trusted (vendor {existing.vendor!r})")
            self._insert(entry)
            return entry

        result = await self._write(op)
        _LOGGER.info(
            "trusting vendor key %s of %r for %s (added by %s)",
            result.key_id,
            result.vendor,
            ", ".join(sorted(result.purposes)),
            added_by,
        )
        return result

    async def ensure(
        self,
        vendor: str,
        public_key: str | bytes | Ed25519PublicKey,
        purposes: Iterable[str],
        added_by: str | None = "demo",
    ) -> VendorKey:
        """Idempotent ``add`` (for demo mode): trust the key for at least ``purposes``.

        An existing entry of the same vendor is returned, its purposes widened if needed; one of another
        vendor raises ``BadKey``.
        """
        wanted_vendor = _vendor(vendor)
        key = parse_public_key(public_key)
        wanted = _purposes(purposes)
        kid = key_id(key)

        def op() -> VendorKey:
            existing = self._keys.get(kid)
            if existing is None:
                entry = VendorKey(kid, wanted_vendor, key, wanted, self._clock(), added_by)
                self._insert(entry)
                return entry
            if existing.vendor != wanted_vendor:
                raise BadKey(
                    f"key {kid} is already trusted for vendor {existing.vendor!r}, not {wanted_vendor!r}"
                )
            if wanted <= existing.purposes:
                return existing
            widened = VendorKey(
                existing.key_id,
                existing.vendor,
                existing.public_key,
                existing.purposes | wanted,
                existing.added_at,
                existing.added_by,
                existing.replaces,
            )
            self._table.update(widened.to_dict(), doc_ids=[self._doc_ids[kid]])
            self._keys[kid] = widened
            return widened

        return await self._write(op)

    async def remove(self, key_id: str) -> bool:
        """Stop trusting a key; returns whether it was trusted.  Certificates and images it signed are
        refused from now on."""

        def op() -> VendorKey | None:
            entry = self._keys.get(key_id)
            if entry is None:
                return None
            self._table.remove(doc_ids=[self._doc_ids[key_id]])
            del self._doc_ids[key_id]
            del self._keys[key_id]
            return entry

        removed = await self._write(op)
        if removed is not None:
            _LOGGER.info("no longer trusting vendor key %s of %r", removed.key_id, removed.vendor)
        return removed is not None

    async def rotate(
        self,
        old_key_id: str,
        new_public_key: str | bytes | Ed25519PublicKey,
        signature: bytes | str,
        *,
        added_by: str | None = None,
    ) -> VendorKey:
        """Replace a trusted key by a new one that its owner vouches for.

        ``signature`` (bytes, or standard base64) must be the OLD key's Ed25519 signature over
        ``rotation_statement(old_key_id, new_key)``.  The new key inherits the vendor and purposes and records
        ``replaces``; the old key is no longer trusted.  Raises ``UnknownKey`` if ``old_key_id`` is not
        trusted, ``BadKey`` for a malformed new key, ``BadRotation`` for a wrong signature or a new key that
        is the old one or already trusted.
        """
        old = self._keys.get(old_key_id)
        if old is None:
            raise UnknownKey(f"no trusted key {old_key_id!r}")
        new_key = parse_public_key(new_public_key)
        raw_signature = _signature(signature)
        try:
            old.public_key.verify(raw_signature, rotation_statement(old.key_id, new_key))
        except InvalidSignature as err:
            _LOGGER.warning("rotation of vendor key %s refused: signature is not the old key's", old.key_id)
            raise BadRotation(
                f"rotation refused: the signature is not key {old.key_id}'s over the rotation statement"
            ) from err
        new_id = key_id(new_key)

        def op() -> VendorKey:
            current = self._keys.get(old_key_id)
            if current is None:
                raise UnknownKey(f"no trusted key {old_key_id!r}")
            if new_id == old_key_id:
                raise BadRotation("rotation refused: the new key is the old key")
            if new_id in self._keys:
                raise BadRotation(f"rotation refused: key {new_id} is already trusted")
            entry = VendorKey(
                new_id, current.vendor, new_key, current.purposes, self._clock(), added_by, current.key_id
            )
            # New key first: a crash in between leaves both, and loading completes the rotation.
            self._insert(entry)
            self._table.remove(doc_ids=[self._doc_ids.pop(old_key_id)])
            del self._keys[old_key_id]
            return entry

        result = await self._write(op)
        _LOGGER.info("vendor key %s of %r rotated to %s", old_key_id, result.vendor, result.key_id)
        return result

    async def close(self) -> None:
        """Close the file (waits for a running write).  The store must not be written afterwards."""
        async with self._write_lock:
            await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._thread_lock:
            self._db.close()

    # ------------------------------------------------------------------ internals

    def _insert(self, entry: VendorKey) -> None:
        self._doc_ids[entry.key_id] = self._table.insert(entry.to_dict())
        self._keys[entry.key_id] = entry

    async def _write(self, op: Callable[[], _T]) -> _T:
        def locked() -> _T:
            with self._thread_lock:
                return op()

        async with self._write_lock:
            try:
                return await asyncio.to_thread(locked)
            except OSError as err:
                raise TrustStorageError(f"cannot write trust file {self._path}: {err}") from err
