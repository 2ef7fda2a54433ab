"""Tests for ``firmware.verify`` with real Ed25519 signatures and real files: the round trip, then every attack
as its own test (flipped byte, untrusted or removed key, another model, downgrade, equal version, truncated
and oversized images, tampering after signing, hub too old), each refused with its precise reason."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.manifest import (
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
    TooLarge,
    UnsupportedFormat,
    UntrustedKey,
    VendorMismatch,
    WrongModel,
    canonical_bytes,
    encode_signature,
)
from firmware.verify import ImageVerifier, VendorKey, verify_file, verify_manifest, verify_signed
from tests.firmware import Vendor, document, sign_document

IMAGE = os.urandom(300_000)
HUB = "0.1.0"


@pytest.fixture(scope="module")
def acme() -> Vendor:
    return Vendor.new("Acme Solar")


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "fw.bin"
    path.write_bytes(IMAGE)
    return path


def release(acme: Vendor, **overrides: object) -> tuple[bytes, str]:
    return sign_document(document(acme, IMAGE, **overrides), acme)


def verify(
    data: bytes,
    signature: str | bytes,
    trusted: dict[str, VendorKey],
    *,
    model: str = "MI-600",
    running: str | None = "1.1.0",
    hub: str = HUB,
) -> Manifest:
    return verify_manifest(data, signature, trusted, model=model, running_version=running, hub_version=hub)


# ------------------------------------------------------------------------------------------ the good path


async def test_round_trip(acme: Vendor, image_file: Path) -> None:
    data, signature = release(acme, models=["MI-600", "MI-800"])
    manifest = verify(data, signature, acme.trust(), model="MI-800")
    assert (manifest.vendor, str(manifest.version), manifest.size) == ("Acme Solar", "1.2.0", len(IMAGE))
    await verify_file(image_file, manifest)
    await verify_file(image_file, manifest, chunk_size=4096)
    verifier = ImageVerifier(manifest)
    for start in range(0, len(IMAGE), 7777):
        verifier.update(IMAGE[start : start + 7777])
    verifier.finish()
    assert verifier.received == len(IMAGE)


def test_raw_signature_and_unknown_running_version_are_accepted(acme: Vendor) -> None:
    data, _ = release(acme)
    raw_signature = acme.private_key.sign(data)
    assert verify(data, raw_signature, acme.trust(), running=None).version.major == 1


def test_signature_covers_the_canonical_form_not_the_file_layout(acme: Vendor) -> None:
    doc = document(acme, IMAGE)
    _, signature = sign_document(doc, acme)
    pretty = canonical_bytes(doc).replace(b",", b",\n  ")
    assert verify(pretty, signature, acme.trust()).to_wire() == doc


def test_a_pre_release_is_older_than_its_release(acme: Vendor) -> None:
    data, signature = release(acme, version="1.2.0")
    assert str(verify(data, signature, acme.trust(), running="1.2.0-rc.2").version) == "1.2.0"
    data, signature = release(acme, version="1.2.0-rc.2")
    with pytest.raises(Downgrade, match=r"1\.2\.0-rc\.2 is older than the running version 1\.2\.0"):
        verify(data, signature, acme.trust(), running="1.2.0")


# ------------------------------------------------------------------------------------------ attacks on the image


async def test_one_flipped_byte_in_the_image(acme: Vendor, tmp_path: Path) -> None:
    data, signature = release(acme)
    manifest = verify(data, signature, acme.trust())
    tampered = bytearray(IMAGE)
    tampered[len(IMAGE) // 2] ^= 0x01
    path = tmp_path / "fw.bin"
    path.write_bytes(tampered)
    with pytest.raises(HashMismatch) as caught:
        await verify_file(path, manifest)
    assert caught.value.code == "hash_mismatch"
    assert hashlib.sha256(tampered).hexdigest() in caught.value.message
    assert manifest.sha256 in caught.value.message


async def test_truncated_image(acme: Vendor, tmp_path: Path) -> None:
    manifest = verify(*release(acme), acme.trust())
    path = tmp_path / "fw.bin"
    path.write_bytes(IMAGE[:-1])
    with pytest.raises(SizeMismatch, match=f"truncated: {len(IMAGE) - 1} bytes, the manifest's size is"):
        await verify_file(path, manifest)
    verifier = ImageVerifier(manifest)  # a stream that ends early (an interrupted upload)
    verifier.update(IMAGE[:1000])
    with pytest.raises(SizeMismatch, match=f"truncated: 1000 of the manifest's {len(IMAGE)} bytes") as caught:
        verifier.finish()
    assert (caught.value.expected, caught.value.received) == (len(IMAGE), 1000)


async def test_oversized_file_is_refused_without_reading_it(acme: Vendor, tmp_path: Path) -> None:
    manifest = verify(*release(acme), acme.trust())
    path = tmp_path / "fw.bin"
    path.write_bytes(IMAGE + b"\0")
    with pytest.raises(SizeMismatch, match="longer than the manifest says") as caught:
        await verify_file(path, manifest)
    assert caught.value.received == 0


def test_oversized_stream_is_rejected_as_soon_as_the_size_is_passed(acme: Vendor) -> None:
    manifest = verify(*release(acme), acme.trust())
    chunk = 64 * 1024
    pulled = 0

    def upload() -> Iterator[bytes]:  # 100 × the declared size, produced on demand
        nonlocal pulled
        data = IMAGE * 100
        for start in range(0, len(data), chunk):
            pulled += 1
            yield data[start : start + chunk]

    verifier = ImageVerifier(manifest)
    with pytest.raises(SizeMismatch, match="longer than the manifest's size") as caught:
        for piece in upload():
            verifier.update(piece)
    limit_chunk = len(IMAGE) // chunk + 1  # the chunk that crosses the declared size
    assert pulled == limit_chunk
    assert caught.value.received == limit_chunk * chunk
    assert verifier.received <= len(IMAGE)
    with pytest.raises(RuntimeError):
        verifier.update(b"more")


async def test_oversized_pipe_stops_reading_at_the_limit(acme: Vendor, tmp_path: Path) -> None:
    """A non-regular file (a FIFO fed by another process) is checked while streaming; the writer is cut off
    long before it could send its 64 MiB."""
    manifest = verify(*release(acme), acme.trust())
    fifo = tmp_path / "upload.fifo"
    os.mkfifo(fifo)
    writer_code = textwrap.dedent(
        """
        import sys
        sent = 0
        chunk = b"\\0" * 65536
        try:
            with open(sys.argv[1], "wb") as out:
                while sent < 64 * 1024 * 1024:
                    out.write(chunk)
                    sent += len(chunk)
        except BrokenPipeError:
            pass
        print(sent)
        """
    )
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", writer_code, str(fifo), stdout=asyncio.subprocess.PIPE
    )
    try:
        with pytest.raises(SizeMismatch, match="longer than the manifest's size") as caught:
            await verify_file(fifo, manifest, chunk_size=65536)
        out, _ = await asyncio.wait_for(writer.communicate(), 60)
    finally:
        if writer.returncode is None:
            writer.kill()
            await writer.wait()
    assert caught.value.received <= len(IMAGE) + 65536
    assert int(out) < 16 * 1024 * 1024


async def test_unreadable_image_file(acme: Vendor, tmp_path: Path) -> None:
    manifest = verify(*release(acme), acme.trust())
    with pytest.raises(FirmwareError, match=r"cannot read image file .*missing\.bin") as caught:
        await verify_file(tmp_path / "missing.bin", manifest)
    assert caught.value.code == "firmware_error"


# ------------------------------------------------------------------------------------------ attacks on the manifest


def test_manifest_signed_by_an_untrusted_key(acme: Vendor) -> None:
    mallory = Vendor.new("Acme Solar")  # claims to be Acme, signs with its own key
    data, signature = sign_document(document(mallory, IMAGE), mallory)
    with pytest.raises(UntrustedKey, match=f"signed with key '{mallory.key_id}', which is not a trusted"):
        verify(data, signature, acme.trust())


def test_manifest_naming_a_trusted_key_but_signed_by_another(acme: Vendor) -> None:
    mallory = Vendor.new("Acme Solar")
    data, signature = sign_document(document(acme, IMAGE), mallory)  # key_id says Acme's key
    with pytest.raises(BadSignature, match=f"does not verify with trusted key '{acme.key_id}'"):
        verify(data, signature, acme.trust())


def test_removed_key_is_refused(acme: Vendor) -> None:
    other = Vendor.new("Other Power")
    trusted = {**acme.trust(), **other.trust()}
    data, signature = release(acme)
    assert verify(data, signature, trusted).vendor == "Acme Solar"
    del trusted[acme.key_id]
    with pytest.raises(UntrustedKey, match="not a trusted vendor key"):
        verify(data, signature, trusted)


def test_valid_image_for_another_model(acme: Vendor) -> None:
    data, signature = release(acme, models=["MI-600", "MI-800"])
    with pytest.raises(WrongModel, match="image is for model\\(s\\) MI-600, MI-800, not for 'BAT-5'"):
        verify(data, signature, acme.trust(), model="BAT-5")


def test_downgrade(acme: Vendor) -> None:
    data, signature = release(acme, version="1.2.0")
    with pytest.raises(Downgrade, match=r"1\.2\.0 is older than the running version 1\.10\.0") as caught:
        verify(data, signature, acme.trust(), running="1.10.0")
    assert caught.value.code == "downgrade"


def test_equal_version(acme: Vendor) -> None:
    data, signature = release(acme, version="1.2.0+build.9")
    with pytest.raises(NotNewer, match="is the version already running") as caught:
        verify(data, signature, acme.trust(), running="1.2.0+build.8")
    assert type(caught.value) is NotNewer
    assert caught.value.code == "not_newer"


def test_unparsable_running_version(acme: Vendor) -> None:
    with pytest.raises(InvalidVersion, match=r"running firmware version: 'v1\.1' is not a semantic version"):
        verify(*release(acme), acme.trust(), running="v1.1")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", "9.9.9"),
        ("models", ["MI-600", "BAT-5"]),
        ("sha256", "0" * 64),
        ("size", 1),
        ("vendor", "Acme"),
    ],
)
def test_manifest_tampered_after_signing(acme: Vendor, field: str, value: object) -> None:
    doc = document(acme, IMAGE)
    data, signature = sign_document(doc, acme)
    tampered = canonical_bytes({**doc, field: value})
    assert tampered != data
    with pytest.raises(BadSignature, match="altered after signing"):
        verify(tampered, signature, acme.trust())


def test_signature_field_smuggled_into_the_manifest(acme: Vendor) -> None:
    doc = document(acme, IMAGE)
    _, signature = sign_document(doc, acme)
    with pytest.raises(BadSignature):
        verify(canonical_bytes({**doc, "signature": signature}), signature, acme.trust())


def test_hub_too_old(acme: Vendor) -> None:
    data, signature = release(acme, min_hub_version="0.3.0")
    with pytest.raises(HubTooOld, match=r"needs hub version 0\.3\.0 or newer; this hub is 0\.2\.9"):
        verify(data, signature, acme.trust(), hub="0.2.9")
    assert verify(data, signature, acme.trust(), hub="0.3.0").min_hub_version.minor == 3


def test_vendor_key_cannot_sign_for_another_vendor(acme: Vendor) -> None:
    data, signature = release(acme, vendor="Other Power")
    with pytest.raises(VendorMismatch, match="vendor 'Other Power' is not 'Acme Solar'"):
        verify(data, signature, acme.trust())


def test_declared_size_over_the_hub_limit(acme: Vendor) -> None:
    data, signature = release(acme)
    with pytest.raises(TooLarge, match="over the hub's limit of 1000 bytes"):
        verify_manifest(
            data, signature, acme.trust(), model="MI-600", running_version=None, hub_version=HUB,
            max_image_bytes=1000,
        )  # fmt: skip


def test_malformed_signature(acme: Vendor) -> None:
    data, _ = release(acme)
    with pytest.raises(BadSignature, match="64 bytes, got 48"):
        verify(data, encode_signature(b"\0" * 48), acme.trust())
    with pytest.raises(BadSignature, match="does not verify"):
        verify(data, b"\0" * 64, acme.trust())


def test_signed_but_invalid_manifest_is_refused(acme: Vendor) -> None:
    data, signature = release(acme, size=0)
    with pytest.raises(BadManifest, match="'size' must be positive"):
        verify(data, signature, acme.trust())
    data, signature = release(acme, format_version=2)
    with pytest.raises(UnsupportedFormat):
        verify_signed(data, signature, acme.trust())


def test_unknown_key_is_reported_before_the_content_is_interpreted(acme: Vendor) -> None:
    mallory = Vendor.new("Mallory")
    data, signature = sign_document(document(mallory, IMAGE, size="huge", sha256=7), mallory)
    with pytest.raises(UntrustedKey):
        verify(data, signature, acme.trust())
