"""Verification of a firmware release: the signed manifest first, then the image, streamed in constant memory.

``verify_manifest`` takes the manifest bytes, the detached signature and the trusted vendor keys (any mapping
from key id to an object with ``vendor`` and ``public_key``), and checks, in this order: the manifest decodes
and has a known format version, its signing key is trusted, the signature verifies over the canonical bytes,
every field is valid, the vendor is the key's vendor, the target model is compatible, the hub is new enough,
and the version is strictly newer than the running one (anti-rollback).  ``ImageVerifier`` then checks the
image chunk by chunk against the manifest's size and SHA-256, rejecting an image the moment it grows past
the declared size; ``verify_file`` runs it over a file in a worker thread.  Every failure is a
``firmware.manifest.FirmwareError`` subclass whose message says exactly what did not match.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware.manifest import (
    MAX_IMAGE_BYTES,
    BadManifest,
    BadSignature,
    Downgrade,
    FirmwareError,
    HashMismatch,
    HubTooOld,
    InvalidVersion,
    Manifest,
    NotNewer,
    SizeMismatch,
    UntrustedKey,
    VendorMismatch,
    Version,
    WrongModel,
    canonical_bytes,
    check_format,
    decode_signature,
    load_document,
    manifest_from_document,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ImageVerifier",
    "TrustedKey",
    "VendorKey",
    "check_compatible",
    "verify_file",
    "verify_manifest",
    "verify_signed",
]

DEFAULT_CHUNK_BYTES = 1024 * 1024


class TrustedKey(Protocol):
    """A vendor key the installer trusts: the vendor it speaks for and its Ed25519 public key."""

    @property
    def vendor(self) -> str: ...

    @property
    def public_key(self) -> Ed25519PublicKey: ...


@dataclass(frozen=True, slots=True)
class VendorKey:
    """The simplest ``TrustedKey`` (used by the vendor tool and tests)."""

    vendor: str
    public_key: Ed25519PublicKey


def verify_signed(
    manifest_bytes: bytes,
    signature: bytes | str,
    trusted: Mapping[str, TrustedKey],
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Manifest:
    """Check that the manifest is signed by a trusted key of its own vendor and valid; return it.

    The signature is checked before any field but ``format_version`` and ``key_id`` is interpreted.
    Raise ``BadManifest`` / ``UnsupportedFormat``, ``UntrustedKey``, ``BadSignature``, ``TooLarge`` or
    ``VendorMismatch``."""
    raw_signature = decode_signature(signature)
    document = load_document(manifest_bytes)
    check_format(document)
    kid = document.get("key_id")
    if not isinstance(kid, str):
        raise BadManifest("manifest has no string 'key_id' naming its signing key", field="key_id")
    key = trusted.get(kid)
    if key is None:
        raise UntrustedKey(f"manifest is signed with key {kid!r}, which is not a trusted vendor key")
    try:
        key.public_key.verify(raw_signature, canonical_bytes(document))
    except InvalidSignature as err:
        raise BadSignature(
            f"signature does not verify with trusted key {kid!r} ({key.vendor}): the manifest was altered "
            "after signing or signed with another key"
        ) from err
    manifest = manifest_from_document(document, max_image_bytes=max_image_bytes)
    if manifest.vendor != key.vendor:
        raise VendorMismatch(
            f"manifest vendor {manifest.vendor!r} is not {key.vendor!r}, the vendor key {kid!r} is trusted for"
        )
    return manifest


def check_compatible(
    manifest: Manifest,
    *,
    model: str | None,
    running_version: str | None,
    hub_version: str | None,
) -> None:
    """Check a verified manifest against its target; ``None`` skips a check (``running_version`` None means
    the running firmware is unknown, so any version is accepted).

    Raise ``WrongModel``, ``HubTooOld``, ``NotNewer`` (equal version), ``Downgrade`` (older version) or
    ``InvalidVersion`` (a given version string is not semantic)."""
    if model is not None and model not in manifest.models:
        raise WrongModel(f"image is for model(s) {', '.join(manifest.models)}, not for {model!r}")
    if hub_version is not None:
        hub = _parse(hub_version, "hub version")
        if hub < manifest.min_hub_version:
            raise HubTooOld(f"image needs hub version {manifest.min_hub_version} or newer; this hub is {hub}")
    if running_version is not None:
        running = _parse(running_version, "running firmware version")
        if manifest.version == running:
            raise NotNewer(
                f"image version {manifest.version} is the version already running ({running}); "
                "only a strictly newer version is installed"
            )
        if manifest.version < running:
            raise Downgrade(
                f"image version {manifest.version} is older than the running version {running}: "
                "downgrades are refused"
            )


def verify_manifest(
    manifest_bytes: bytes,
    signature: bytes | str,
    trusted: Mapping[str, TrustedKey],
    *,
    model: str,
    running_version: str | None,
    hub_version: str,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Manifest:
    """Everything about a release except its image: ``verify_signed`` then ``check_compatible``.

    ``signature`` is the raw 64 bytes or base64 text (a ``.sig`` file's content).  Returns the manifest to
    check the image against with ``ImageVerifier`` or ``verify_file``."""
    manifest = verify_signed(manifest_bytes, signature, trusted, max_image_bytes=max_image_bytes)
    check_compatible(manifest, model=model, running_version=running_version, hub_version=hub_version)
    return manifest


class ImageVerifier:
    """Incremental check of an image against its manifest: feed chunks to ``update``, then call ``finish``.

    ``update`` raises ``SizeMismatch`` as soon as the bytes received exceed the manifest's size (the excess
    chunk is not hashed, and the caller should stop reading); ``finish`` raises ``SizeMismatch`` for a
    truncated image and ``HashMismatch`` for wrong content.  Memory use is constant.  After a failure, or
    after ``finish``, the verifier refuses more input."""

    __slots__ = ("_closed", "_hash", "_manifest", "_received")

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._hash = hashlib.sha256()
        self._received = 0
        self._closed = False

    @property
    def received(self) -> int:
        """How many bytes were accepted so far."""
        return self._received

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise RuntimeError("ImageVerifier used after finish() or after a rejection")
        total = self._received + len(chunk)
        expected = self._manifest.size
        if total > expected:
            self._closed = True
            raise SizeMismatch(
                f"image is longer than the manifest's size of {expected} bytes: rejected after {total} bytes",
                expected=expected,
                received=total,
            )
        self._hash.update(chunk)
        self._received = total

    def finish(self) -> None:
        if self._closed:
            raise RuntimeError("ImageVerifier used after finish() or after a rejection")
        self._closed = True
        expected = self._manifest.size
        if self._received != expected:
            raise SizeMismatch(
                f"image is truncated: {self._received} of the manifest's {expected} bytes",
                expected=expected,
                received=self._received,
            )
        digest = self._hash.hexdigest()
        if not hmac.compare_digest(digest, self._manifest.sha256):
            raise HashMismatch(f"image SHA-256 is {digest}, the manifest says {self._manifest.sha256}")


async def verify_file(
    path: str | os.PathLike[str], manifest: Manifest, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> None:
    """Check the image file at ``path`` against ``manifest`` (size, then SHA-256), reading it in chunks of
    ``chunk_size`` bytes into one reused buffer in a worker thread, so the event loop never blocks and memory
    stays at one chunk.  A regular file whose length is not the manifest's size is refused without reading
    it.  Cancelling the call stops the reading within one chunk.  Raise ``SizeMismatch``, ``HashMismatch``,
    or ``FirmwareError`` when the file cannot be read."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    stop = threading.Event()
    try:
        await asyncio.to_thread(_verify_path, Path(path), manifest, chunk_size, stop)
    except asyncio.CancelledError:
        stop.set()
        raise


def _verify_path(path: Path, manifest: Manifest, chunk_size: int, stop: threading.Event) -> None:
    verifier = ImageVerifier(manifest)
    try:
        with path.open("rb", buffering=0) as file:
            status = os.fstat(file.fileno())
            length = status.st_size
            if stat.S_ISREG(status.st_mode) and length != manifest.size:
                what = "truncated" if length < manifest.size else "longer than the manifest says"
                raise SizeMismatch(
                    f"image file is {what}: {length} bytes, the manifest's size is {manifest.size} bytes",
                    expected=manifest.size,
                    received=0,
                )
            buffer = bytearray(chunk_size)
            view = memoryview(buffer)
            while not stop.is_set():
                count = file.readinto(buffer)
                if not count:
                    break
                verifier.update(view[:count])
            else:
                raise FirmwareError("image verification was cancelled")
    except OSError as err:
        raise FirmwareError(f"cannot read image file {str(path)!r}: {err.strerror or err}") from err
    verifier.finish()


def _parse(text: str, what: str) -> Version:
    try:
        return Version.parse(text)
    except InvalidVersion as err:
        raise InvalidVersion(f"{what}: {err.message}") from err
