"""The hub's catalogue of verified firmware releases, kept in ``data_dir/firmware/``.

An upload arrives as the manifest bytes, the detached signature and the image as a stream of chunks.
``FirmwareStore.add`` checks the signed manifest first (trusted firmware key of the manifest's own vendor,
valid fields, size within the hub's limit, minimum hub version) before reading a single image byte, then
streams the image to a temporary file in the same directory while ``firmware.verify.ImageVerifier`` checks it,
so memory stays at one chunk and an image longer than its manifest says is cut off at the first chunk past
its size.  Only a release that passed every check is committed, as four files named by the image's SHA-256:
``<sha>.bin`` (the image), ``<sha>.manifest.json`` (the manifest's canonical bytes, what the signature
covers), ``<sha>.manifest.json.sig`` (the signature, base64) and, written last as the commit point,
``<sha>.meta.json`` (who uploaded it and when).  Every file is written atomically (temp file, fsync, rename),
so a rejected or interrupted upload leaves nothing behind, and files a crash left without their commit point
are removed when the store opens.  Trust can change after an upload: ``check_trust`` verifies a stored
release's signature again against the keys trusted now (the rollout calls it before every module), and
``check_image`` hashes the stored image again.  Every refusal is a ``firmware.manifest.FirmwareError``
subclass with its stable code; storage problems are ``FirmwareStoreError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypedDict

from firmware.manifest import (
    MAX_IMAGE_BYTES,
    FirmwareError,
    Manifest,
    decode_signature,
    encode_signature,
    parse_manifest,
)
from firmware.verify import ImageVerifier, TrustedKey, check_compatible, verify_file, verify_signed
from hub import __version__
from hub.storage import atomic_write_bytes

__all__ = [
    "FirmwareStore",
    "FirmwareStoreError",
    "ImageConflict",
    "StoredImage",
]

_LOGGER = logging.getLogger(__name__)

IMAGE_SUFFIX: Final = ".bin"
MANIFEST_SUFFIX: Final = ".manifest.json"
SIGNATURE_SUFFIX: Final = ".manifest.json.sig"
META_SUFFIX: Final = ".meta.json"
_UPLOAD_PREFIX: Final = ".upload-"
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


class FirmwareStoreError(Exception):
    """The firmware directory cannot be read or written (disk full, permissions, a corrupt entry)."""


class ImageConflict(FirmwareStoreError):
    """An image with the same SHA-256 is already stored with a different manifest or signature."""


class MetaJSON(TypedDict):
    """``<sha>.meta.json``: the commit point of a stored release."""

    sha256: str
    size: int
    uploaded_at: float
    uploaded_by: str | None


@dataclass(frozen=True, slots=True)
class StoredImage:
    """A verified release in the store.  ``manifest_bytes`` are the manifest's canonical bytes (what the
    signature covers and what a module receives); ``signature`` the raw 64-byte Ed25519 signature."""

    sha256: str
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    uploaded_at: float
    uploaded_by: str | None
    path: Path

    @property
    def size(self) -> int:
        return self.manifest.size

    @property
    def version(self) -> str:
        return str(self.manifest.version)


def _sha_ok(sha256: str) -> bool:
    return bool(_SHA256.fullmatch(sha256))


class FirmwareStore:
    """The verified releases in ``directory`` (see the module docstring).

    ``trusted`` is the live mapping of firmware keys (``TrustStore.trusted("firmware")``): a key removed from
    it is refused from the next check on.  The constructor creates the directory, removes what interrupted
    uploads and deletions left behind and loads the catalogue (blocking; it only reads small files).  Raises
    ``FirmwareStoreError`` when the directory cannot be used.
    """

    def __init__(
        self,
        directory: Path,
        trusted: Mapping[str, TrustedKey],
        *,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        hub_version: str = __version__,
        chunk_bytes: int = 256 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_image_bytes <= 0 or chunk_bytes <= 0:
            raise ValueError("max_image_bytes and chunk_bytes must be positive")
        self._dir = Path(directory)
        self._trusted = trusted
        #: The largest image the hub accepts (a manifest that declares more is refused as ``too_large``).
        self.max_image_bytes = max_image_bytes
        self.hub_version = hub_version
        self.chunk_bytes = chunk_bytes
        self._clock = clock
        self._images: dict[str, StoredImage] = {}
        self._commit_lock = asyncio.Lock()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._dir.chmod(0o700)
            self._clean_and_load()
        except OSError as err:
            raise FirmwareStoreError(f"cannot use firmware directory {self._dir}: {err}") from err

    @property
    def directory(self) -> Path:
        return self._dir

    # ------------------------------------------------------------------------------------------ loading

    def _clean_and_load(self) -> None:
        committed: set[str] = set()
        for entry in sorted(self._dir.iterdir()):
            name = entry.name
            if name.startswith(_UPLOAD_PREFIX) or (name.startswith(".") and name.endswith(".tmp")):
                _LOGGER.info("firmware store: removing %s left by an interrupted upload", name)
                entry.unlink(missing_ok=True)
            elif name.endswith(META_SUFFIX):
                committed.add(name.removesuffix(META_SUFFIX))
        for sha in sorted(committed):
            try:
                image = self._load(sha)
            except (OSError, ValueError, KeyError, TypeError, FirmwareError) as err:
                _LOGGER.warning("firmware store: skipping unreadable release %s: %s", sha, err)
                continue
            self._images[sha] = image
        # Files of a release without its commit point: an interrupted upload or deletion.
        for entry in self._dir.iterdir():
            sha = entry.name.split(".", 1)[0]
            if _sha_ok(sha) and sha not in committed:
                _LOGGER.info("firmware store: removing %s (release was never committed)", entry.name)
                entry.unlink(missing_ok=True)
        _LOGGER.debug("firmware store %s opened with %d releases", self._dir, len(self._images))

    def _load(self, sha: str) -> StoredImage:
        if not _sha_ok(sha):
            raise ValueError("file name is not a SHA-256")
        meta = json.loads((self._dir / f"{sha}{META_SUFFIX}").read_bytes())
        manifest_bytes = (self._dir / f"{sha}{MANIFEST_SUFFIX}").read_bytes()
        signature = decode_signature((self._dir / f"{sha}{SIGNATURE_SUFFIX}").read_bytes())
        # Parsed, not trusted: trust is checked again whenever the release is used.
        manifest = parse_manifest(manifest_bytes)
        path = self._dir / f"{sha}{IMAGE_SUFFIX}"
        if manifest.sha256 != sha or meta["sha256"] != sha:
            raise ValueError("manifest and file names disagree on the SHA-256")
        length = path.stat().st_size
        if length != manifest.size:
            raise ValueError(f"image file has {length} bytes, the manifest says {manifest.size}")
        uploaded_by = meta.get("uploaded_by")
        return StoredImage(
            sha256=sha,
            manifest=manifest,
            manifest_bytes=manifest.canonical_bytes(),
            signature=signature,
            uploaded_at=float(meta["uploaded_at"]),
            uploaded_by=None if uploaded_by is None else str(uploaded_by),
            path=path,
        )

    # ------------------------------------------------------------------------------------------ reads

    def list(self) -> list[StoredImage]:
        """Every stored release, by vendor, then newest version first."""
        by_version = sorted(self._images.values(), key=lambda i: i.manifest.version, reverse=True)
        return sorted(by_version, key=lambda i: i.manifest.vendor.casefold())

    def get(self, sha256: str) -> StoredImage | None:
        return self._images.get(sha256.lower())

    def __len__(self) -> int:
        return len(self._images)

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and sha256.lower() in self._images

    def check_trust(self, image: StoredImage) -> Manifest:
        """Verify the stored release's signature again against the keys trusted now, and that this hub may
        install it.  Raise ``UntrustedKey`` (its key was removed), ``BadSignature``, ``VendorMismatch``,
        ``TooLarge`` (the limit was lowered) or ``HubTooOld``."""
        manifest = verify_signed(
            image.manifest_bytes, image.signature, self._trusted, max_image_bytes=self.max_image_bytes
        )
        check_compatible(manifest, model=None, running_version=None, hub_version=self.hub_version)
        return manifest

    def trust_problem(self, image: StoredImage) -> FirmwareError | None:
        """Why the release would be refused now (``None`` when it is still trusted)."""
        try:
            self.check_trust(image)
        except FirmwareError as err:
            return err
        return None

    async def check_image(self, image: StoredImage) -> None:
        """Hash the stored image file again (in a worker thread); raise ``SizeMismatch`` / ``HashMismatch``
        if it changed on disk, ``FirmwareError`` if it cannot be read."""
        await verify_file(image.path, image.manifest, self.chunk_bytes)

    # ------------------------------------------------------------------------------------------ writes

    async def add(
        self,
        manifest_bytes: bytes,
        signature: bytes | str,
        image: AsyncIterable[bytes],
        *,
        uploaded_by: str | None = None,
    ) -> tuple[StoredImage, bool]:
        """Verify and store a release; return it and whether it is new.

        The manifest and signature are checked before ``image`` is read at all; the image is then consumed
        chunk by chunk (never held whole) and refused the moment it grows past the manifest's size.  The same
        release uploaded again returns the stored one (``False``).  Raise a ``FirmwareError`` subclass for a
        refused release (``BadSignature``, ``UntrustedKey``, ``BadManifest``, ``TooLarge``,
        ``VendorMismatch``, ``HubTooOld``, ``SizeMismatch``, ``HashMismatch``), ``ImageConflict`` when the
        same image is stored with another manifest, ``FirmwareStoreError`` when the disk fails.  Whatever
        goes wrong (also cancellation), nothing of the upload is left on disk.
        """
        manifest = verify_signed(
            manifest_bytes, signature, self._trusted, max_image_bytes=self.max_image_bytes
        )
        check_compatible(manifest, model=None, running_version=None, hub_version=self.hub_version)
        raw_signature = decode_signature(signature)
        canonical = manifest.canonical_bytes()
        sha = manifest.sha256
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=_UPLOAD_PREFIX, suffix=".tmp", dir=self._dir)
        except OSError as err:
            raise FirmwareStoreError(f"cannot create an upload file in {self._dir}: {err}") from err
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb", buffering=0) as file:
                await self._receive(file, manifest, image)
            async with self._commit_lock:
                existing = self._images.get(sha)
                if existing is not None:
                    if existing.manifest_bytes == canonical and existing.signature == raw_signature:
                        return existing, False
                    raise ImageConflict(
                        f"an image with SHA-256 {sha} is already stored with another manifest "
                        f"(version {existing.version}); delete it first"
                    )
                stored = StoredImage(
                    sha256=sha,
                    manifest=manifest,
                    manifest_bytes=canonical,
                    signature=raw_signature,
                    uploaded_at=self._clock(),
                    uploaded_by=uploaded_by,
                    path=self._dir / f"{sha}{IMAGE_SUFFIX}",
                )
                try:
                    await asyncio.to_thread(self._commit, tmp, stored)
                except OSError as err:
                    raise FirmwareStoreError(f"cannot store release {sha}: {err}") from err
                self._images[sha] = stored
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _LOGGER.info(
            "stored firmware %s %s for %s (%s, %d bytes, uploaded by %s)",
            manifest.vendor,
            manifest.version,
            ", ".join(manifest.models),
            sha,
            manifest.size,
            uploaded_by,
        )
        return stored, True

    async def _receive(self, file: Any, manifest: Manifest, image: AsyncIterable[bytes]) -> None:
        """Write the image stream to ``file`` through the verifier; fsync it when it is complete."""
        verifier = ImageVerifier(manifest)

        def write(chunk: bytes) -> None:
            verifier.update(chunk)  # raises SizeMismatch past the manifest's size, before writing
            view = memoryview(chunk)
            while view:
                written = file.write(view)
                view = view[written:]

        pending = bytearray()
        try:
            async for chunk in image:
                if not chunk:
                    continue
                if verifier.received + len(pending) + len(chunk) > manifest.size:
                    verifier.update(bytes(pending) + chunk)  # SizeMismatch at once: nothing more is read
                pending += chunk
                if len(pending) >= self.chunk_bytes:
                    await asyncio.to_thread(write, bytes(pending))
                    pending.clear()
            if pending:
                await asyncio.to_thread(write, bytes(pending))
            verifier.finish()
            await asyncio.to_thread(os.fsync, file.fileno())
        except OSError as err:
            raise FirmwareStoreError(f"cannot write the uploaded image: {err}") from err

    def _commit(self, tmp: Path, image: StoredImage) -> None:
        sha = image.sha256
        os.replace(tmp, image.path)
        atomic_write_bytes(self._dir / f"{sha}{MANIFEST_SUFFIX}", image.manifest_bytes)
        atomic_write_bytes(
            self._dir / f"{sha}{SIGNATURE_SUFFIX}", (encode_signature(image.signature) + "\n").encode()
        )
        meta: MetaJSON = {
            "sha256": sha,
            "size": image.size,
            "uploaded_at": image.uploaded_at,
            "uploaded_by": image.uploaded_by,
        }
        atomic_write_bytes(self._dir / f"{sha}{META_SUFFIX}", json.dumps(meta, sort_keys=True).encode())

    async def delete(self, sha256: str) -> bool:
        """Remove a release; returns whether it was stored.  The commit point goes first, so a crash in
        between leaves files that the next start removes."""
        sha = sha256.lower()
        async with self._commit_lock:
            image = self._images.pop(sha, None)
            if image is None:
                return False
            try:
                await asyncio.to_thread(self._remove_files, sha)
            except OSError as err:
                self._images[sha] = image
                raise FirmwareStoreError(f"cannot delete release {sha}: {err}") from err
        _LOGGER.info("deleted firmware %s %s (%s)", image.manifest.vendor, image.version, sha)
        return True

    def _remove_files(self, sha: str) -> None:
        (self._dir / f"{sha}{META_SUFFIX}").unlink(missing_ok=True)
        for suffix in (IMAGE_SUFFIX, MANIFEST_SUFFIX, SIGNATURE_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                (self._dir / f"{sha}{suffix}").unlink()
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
