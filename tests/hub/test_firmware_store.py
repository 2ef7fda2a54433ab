"""Tests for ``hub.firmware_store`` with real Ed25519 signatures, a real trust store and real files.

Each refusal is checked for its precise reason and for leaving nothing behind in the firmware directory;
the manifest is checked before the image stream is touched, and an over-long image stops being read at the
first chunk past its declared size.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware.manifest import (
    BadSignature,
    HashMismatch,
    HubTooOld,
    SizeMismatch,
    TooLarge,
    UntrustedKey,
    VendorMismatch,
    decode_signature,
)
from hub.firmware_store import FirmwareStore, ImageConflict
from hub.trust import TrustStore
from tests.firmware import Vendor, document, sign_document

IMAGE = os.urandom(200_000)
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def acme() -> Vendor:
    return Vendor.new("Acme Solar")


@pytest.fixture
async def trust(tmp_path: Path, acme: Vendor) -> AsyncIterator[TrustStore]:
    store = TrustStore(tmp_path / "trust.json")
    await store.add(acme.name, acme.private_key.public_key(), {"firmware"})
    yield store
    await store.close()


@pytest.fixture
def fw_dir(tmp_path: Path) -> Path:
    return tmp_path / "firmware"


@pytest.fixture
def store(fw_dir: Path, trust: TrustStore) -> FirmwareStore:
    return FirmwareStore(fw_dir, trust.trusted("firmware"), chunk_bytes=CHUNK)


class Feed:
    """An image as an async stream of chunks that records how many chunks were pulled."""

    def __init__(self, data: bytes, size: int = CHUNK) -> None:
        self.data = data
        self.size = size
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), self.size):
            self.pulled += 1
            yield self.data[start : start + self.size]


def release(vendor: Vendor, image: bytes = IMAGE, **overrides: object) -> tuple[bytes, str]:
    return sign_document(document(vendor, image, **overrides), vendor)


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


async def test_stores_a_verified_release_atomically_and_reloads_it(
    store: FirmwareStore, fw_dir: Path, trust: TrustStore, acme: Vendor
) -> None:
    manifest, sig = release(acme, version="1.3.0")
    stored, created = await store.add(manifest, sig, Feed(IMAGE), uploaded_by="installer")
    sha = hashlib.sha256(IMAGE).hexdigest()
    assert created and stored.sha256 == sha and stored.version == "1.3.0"
    assert files(fw_dir) == {
        f"{sha}.bin",
        f"{sha}.manifest.json",
        f"{sha}.manifest.json.sig",
        f"{sha}.meta.json",
    }
    assert (fw_dir / f"{sha}.bin").read_bytes() == IMAGE
    assert (fw_dir / f"{sha}.manifest.json").read_bytes() == manifest  # the canonical bytes, as signed
    assert decode_signature((fw_dir / f"{sha}.manifest.json.sig").read_bytes()) == decode_signature(sig)
    assert [i.sha256 for i in store.list()] == [sha] and store.get(sha) == stored

    again = FirmwareStore(fw_dir, trust.trusted("firmware"))
    loaded = again.get(sha)
    assert loaded is not None and loaded.manifest == stored.manifest and loaded.uploaded_by == "installer"
    assert again.check_trust(loaded) == stored.manifest
    await again.check_image(loaded)

    same, created_again = await store.add(manifest, sig, Feed(IMAGE))
    assert not created_again and same == stored


async def test_one_flipped_byte_is_refused_and_leaves_nothing(
    store: FirmwareStore, fw_dir: Path, acme: Vendor
) -> None:
    manifest, sig = release(acme)
    flipped = bytearray(IMAGE)
    flipped[123_456] ^= 0x01
    with pytest.raises(HashMismatch):
        await store.add(manifest, sig, Feed(bytes(flipped)))
    assert files(fw_dir) == set() and len(store) == 0


@pytest.mark.parametrize("attack", ["untrusted", "tampered", "other_vendor"])
async def test_bad_signatures_are_refused_before_the_image_is_read(
    store: FirmwareStore, fw_dir: Path, acme: Vendor, attack: str
) -> None:
    if attack == "untrusted":
        manifest, sig = release(Vendor.new("Acme Solar"))
        expected: type[Exception] = UntrustedKey
    elif attack == "tampered":
        manifest, sig = release(acme)
        manifest = manifest.replace(b'"1.2.0"', b'"9.2.0"')
        expected = BadSignature
    else:  # a trusted key signing for a vendor it is not trusted for
        manifest, sig = sign_document(document(acme, IMAGE, vendor="Other Corp"), acme)
        expected = VendorMismatch
    feed = Feed(IMAGE)
    with pytest.raises(expected):
        await store.add(manifest, sig, feed)
    assert feed.pulled == 0
    assert files(fw_dir) == set()


async def test_a_removed_key_is_refused_for_stored_releases_and_new_uploads(
    store: FirmwareStore, trust: TrustStore, acme: Vendor
) -> None:
    manifest, sig = release(acme)
    stored, _ = await store.add(manifest, sig, Feed(IMAGE))
    assert store.trust_problem(stored) is None
    assert await trust.remove(acme.key_id)
    with pytest.raises(UntrustedKey):
        store.check_trust(stored)
    problem = store.trust_problem(stored)
    assert problem is not None and problem.code == "untrusted_key"
    with pytest.raises(UntrustedKey):
        await store.add(*release(acme, IMAGE[:1000]), Feed(IMAGE[:1000]))


async def test_truncated_image_is_refused(store: FirmwareStore, fw_dir: Path, acme: Vendor) -> None:
    manifest, sig = release(acme)
    with pytest.raises(SizeMismatch) as err:
        await store.add(manifest, sig, Feed(IMAGE[:-1]))
    assert err.value.received == len(IMAGE) - 1
    assert files(fw_dir) == set()


async def test_longer_image_is_cut_off_at_the_first_chunk_past_its_size(
    store: FirmwareStore, fw_dir: Path, acme: Vendor
) -> None:
    manifest, sig = release(acme)
    feed = Feed(IMAGE + os.urandom(50 * CHUNK))
    with pytest.raises(SizeMismatch) as err:
        await store.add(manifest, sig, feed)
    assert err.value.expected == len(IMAGE) and err.value.received > len(IMAGE)
    assert feed.pulled == len(IMAGE) // CHUNK + 1  # the chunk that passed the size was the last one read
    assert files(fw_dir) == set()


async def test_declared_size_over_the_limit_is_refused_unread(
    fw_dir: Path, trust: TrustStore, acme: Vendor
) -> None:
    store = FirmwareStore(fw_dir, trust.trusted("firmware"), max_image_bytes=100_000)
    feed = Feed(IMAGE)
    with pytest.raises(TooLarge):
        await store.add(*release(acme), feed)
    assert feed.pulled == 0 and files(fw_dir) == set()


async def test_image_for_a_newer_hub_is_refused(store: FirmwareStore, fw_dir: Path, acme: Vendor) -> None:
    with pytest.raises(HubTooOld):
        await store.add(*release(acme, min_hub_version="99.0.0"), Feed(IMAGE))
    assert files(fw_dir) == set()


async def test_same_image_with_another_manifest_conflicts(store: FirmwareStore, acme: Vendor) -> None:
    await store.add(*release(acme), Feed(IMAGE))
    with pytest.raises(ImageConflict):
        await store.add(*release(acme, version="1.2.1"), Feed(IMAGE))
    assert len(store) == 1


async def test_cancelled_upload_leaves_nothing(store: FirmwareStore, fw_dir: Path, acme: Vendor) -> None:
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield IMAGE[:CHUNK]
        started.set()
        await asyncio.Event().wait()  # the client stops sending
        yield b""

    task = asyncio.create_task(store.add(*release(acme), stalled()))
    await started.wait()
    assert any(name.startswith(".upload-") for name in files(fw_dir))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files(fw_dir) == set()


async def test_delete_and_crash_leftovers(
    store: FirmwareStore, fw_dir: Path, trust: TrustStore, acme: Vendor
) -> None:
    kept, _ = await store.add(*release(acme), Feed(IMAGE))
    other = os.urandom(5000)
    gone, _ = await store.add(*release(acme, other, version="1.2.1"), Feed(other))
    assert await store.delete(gone.sha256)
    assert not await store.delete(gone.sha256)
    assert not any(name.startswith(gone.sha256) for name in files(fw_dir))
    # What a crash can leave: a half-received upload, a release without its commit point, a temp file.
    (fw_dir / ".upload-abc.tmp").write_bytes(b"partial")
    orphan = "ab" * 32
    (fw_dir / f"{orphan}.bin").write_bytes(b"x")
    (fw_dir / f"{orphan}.manifest.json").write_bytes(b"{}")
    (fw_dir / f".{kept.sha256}.meta.json.123.tmp").write_bytes(b"{")
    reopened = FirmwareStore(fw_dir, trust.trusted("firmware"))
    assert [i.sha256 for i in reopened.list()] == [kept.sha256]
    assert files(fw_dir) == {
        f"{kept.sha256}{suffix}" for suffix in (".bin", ".manifest.json", ".manifest.json.sig", ".meta.json")
    }


async def test_an_image_changed_on_disk_fails_its_check(store: FirmwareStore, acme: Vendor) -> None:
    stored, _ = await store.add(*release(acme), Feed(IMAGE))
    data = bytearray(stored.path.read_bytes())
    data[0] ^= 0xFF
    stored.path.write_bytes(bytes(data))
    with pytest.raises(HashMismatch):
        await store.check_image(stored)


async def test_a_pretty_printed_manifest_is_kept_in_canonical_form(
    store: FirmwareStore, fw_dir: Path, acme: Vendor
) -> None:
    doc = document(acme, IMAGE)
    canonical, sig = sign_document(doc, acme)
    pretty = json.dumps(doc, indent=2).encode()
    stored, _ = await store.add(pretty, sig, Feed(IMAGE))
    assert stored.manifest_bytes == canonical  # what the signature covers, and what modules receive
    assert (fw_dir / f"{stored.sha256}.manifest.json").read_bytes() == canonical
