"""Tests for ``firmware.manifest``: strict parsing with precise errors, canonical bytes, keys, signatures, and
semantic version ordering (examples from the standard plus a hypothesis property test against an independent
comparison written from SemVer 2.0.0 §11)."""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from firmware.manifest import (
    MAX_IMAGE_BYTES,
    MAX_MANIFEST_BYTES,
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
    Version,
    WrongModel,
    canonical_bytes,
    decode_signature,
    encode_signature,
    key_id,
    parse_manifest,
    public_key_b64,
    public_key_from_b64,
    sign_manifest,
)
from tests.firmware import Vendor, document

IMAGE = b"\x7fELF firmware image" * 100


@pytest.fixture(scope="module")
def vendor() -> Vendor:
    return Vendor.new()


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# ------------------------------------------------------------------------------------------ errors


def test_every_rejection_has_its_own_stable_code() -> None:
    codes: dict[type[FirmwareError], str] = {
        FirmwareError: "firmware_error",
        BadManifest: "bad_manifest",
        UnsupportedFormat: "unsupported_format",
        InvalidVersion: "invalid_version",
        TooLarge: "too_large",
        BadSignature: "bad_signature",
        UntrustedKey: "untrusted_key",
        VendorMismatch: "vendor_mismatch",
        WrongModel: "wrong_model",
        HubTooOld: "hub_too_old",
        NotNewer: "not_newer",
        Downgrade: "downgrade",
        SizeMismatch: "size_mismatch",
        HashMismatch: "hash_mismatch",
    }
    assert {cls: cls.code for cls in codes} == codes
    assert issubclass(UnsupportedFormat, BadManifest)
    assert issubclass(Downgrade, NotNewer)
    assert all(issubclass(cls, FirmwareError) for cls in codes)
    assert HubTooOld("hub 0.1.0 too old").to_dict() == {"code": "hub_too_old", "message": "hub 0.1.0 too old"}


# ------------------------------------------------------------------------------------------ parsing


def test_parse_valid_manifest(vendor: Vendor) -> None:
    manifest = parse_manifest(raw(document(vendor, IMAGE, models=["MI-600", "MI-800"])))
    assert manifest == Manifest(
        format_version=1,
        vendor="Acme Solar",
        models=("MI-600", "MI-800"),
        version=Version(1, 2, 0),
        size=len(IMAGE),
        sha256=hashlib.sha256(IMAGE).hexdigest(),
        min_hub_version=Version(0, 1, 0),
        release_notes="Faster MPPT tracking.",
        created_at=datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC),
        key_id=vendor.key_id,
    )


def test_to_wire_gives_back_exactly_what_was_parsed(vendor: Vendor) -> None:
    doc = document(vendor, IMAGE, version="2.0.0-rc.1+build.7", release_notes="Zeile 1\nÄnderung \u2028 \t")
    pretty = json.dumps(doc, indent=4).encode()
    manifest = parse_manifest(pretty)
    assert manifest.to_wire() == doc
    assert manifest.canonical_bytes() == canonical_bytes(doc)
    assert parse_manifest(manifest.canonical_bytes()) == manifest


def test_canonical_bytes_are_exactly_specified(vendor: Vendor) -> None:
    doc = document(vendor, b"x", vendor="Sönne", release_notes='a "b"\\ c\n\x01 /')
    expected = (
        '{"created_at":"2025-06-01T12:00:00Z","format_version":1,"key_id":"' + vendor.key_id + '",'
        '"min_hub_version":"0.1.0","models":["MI-600"],'
        '"release_notes":"a \\"b\\"\\\\ c\\n\\u0001 /",'
        '"sha256":"2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",'
        '"size":1,"vendor":"Sönne","version":"1.2.0"}'
    ).encode("utf-8")
    assert canonical_bytes(doc) == expected


def test_manifest_create_validates_like_parse(vendor: Vendor) -> None:
    manifest = Manifest.create(
        vendor="Acme Solar",
        models=["MI-600"],
        version="1.2.0",
        size=len(IMAGE),
        sha256=hashlib.sha256(IMAGE).hexdigest(),
        key_id=vendor.key_id,
        release_notes="Faster MPPT tracking.",
        created_at=datetime(2025, 6, 1, 14, 0, 0, 999, tzinfo=UTC).astimezone(),
    )
    assert manifest.to_wire() == document(vendor, IMAGE, created_at="2025-06-01T14:00:00Z")
    with pytest.raises(BadManifest, match="'version'"):
        Manifest.create(vendor="A", models=["M"], version="1.2", size=1, sha256="0" * 64, key_id="0" * 16)


BAD_FIELDS: list[tuple[dict[str, Any], type[FirmwareError], str | None, str]] = [
    ({"format_version": 2}, UnsupportedFormat, "format_version", "format_version 2 is not supported"),
    ({"format_version": "1"}, BadManifest, "format_version", "must be an integer, got string"),
    ({"vendor": ""}, BadManifest, "vendor", "must not be empty"),
    ({"vendor": 7}, BadManifest, "vendor", "must be a string, got integer"),
    ({"vendor": " Acme"}, BadManifest, "vendor", "whitespace"),
    ({"vendor": "Ac\x00me"}, BadManifest, "vendor", "control character"),
    ({"vendor": "\ud800"}, BadManifest, "vendor", "unpaired surrogate"),
    ({"models": "MI-600"}, BadManifest, "models", "must be an array of strings, got string"),
    ({"models": []}, BadManifest, "models", "at least one model"),
    ({"models": ["MI-600", 5]}, BadManifest, "models", "'models[1]' must be a string"),
    ({"models": ["MI-600", "MI-600"]}, BadManifest, "models", "lists a model twice"),
    ({"models": [f"M{i}" for i in range(65)]}, BadManifest, "models", "more than 64"),
    ({"version": "1.2"}, BadManifest, "version", "expected MAJOR.MINOR.PATCH"),
    ({"version": "v1.2.3"}, BadManifest, "version", "major 'v1'"),
    ({"version": None}, BadManifest, "version", "must be a string, got null"),
    ({"min_hub_version": "0.01.0"}, BadManifest, "min_hub_version", "leading zeros"),
    ({"size": 0}, BadManifest, "size", "must be positive, got 0"),
    ({"size": -5}, BadManifest, "size", "must be positive, got -5"),
    ({"size": "100"}, BadManifest, "size", "must be an integer, got string"),
    ({"size": True}, BadManifest, "size", "must be an integer, got boolean"),
    ({"size": MAX_IMAGE_BYTES + 1}, TooLarge, None, f"over the hub's limit of {MAX_IMAGE_BYTES} bytes"),
    ({"sha256": "AB" * 32}, BadManifest, "sha256", "64 lowercase hexadecimal"),
    ({"sha256": "ab" * 31}, BadManifest, "sha256", "64 lowercase hexadecimal"),
    ({"sha256": "zz" * 32}, BadManifest, "sha256", "64 lowercase hexadecimal"),
    ({"key_id": "0123"}, BadManifest, "key_id", "16 lowercase hexadecimal"),
    ({"release_notes": ["a"]}, BadManifest, "release_notes", "must be a string, got array"),
    ({"release_notes": "x" * 16385}, BadManifest, "release_notes", "longer than 16384"),
    ({"created_at": "2025-06-01T12:00:00+00:00"}, BadManifest, "created_at", "YYYY-MM-DDTHH:MM:SSZ"),
    ({"created_at": "2025-06-01 12:00:00Z"}, BadManifest, "created_at", "YYYY-MM-DDTHH:MM:SSZ"),
    ({"created_at": "2025-02-30T12:00:00Z"}, BadManifest, "created_at", "not a valid date"),
    ({"signature": "AAAA"}, BadManifest, "signature", "unknown field(s): signature"),
]


@pytest.mark.parametrize(("overrides", "error", "field", "message"), BAD_FIELDS)
def test_bad_field_is_rejected_with_its_reason(
    vendor: Vendor,
    overrides: dict[str, Any],
    error: type[FirmwareError],
    field: str | None,
    message: str,
) -> None:
    with pytest.raises(error) as caught:
        parse_manifest(raw(document(vendor, IMAGE, **overrides)))
    assert type(caught.value) is error
    assert message in str(caught.value)
    if isinstance(caught.value, BadManifest):
        assert caught.value.field == field


@pytest.mark.parametrize("name", ["format_version", "vendor", "size", "key_id", "created_at"])
def test_missing_field_is_named(vendor: Vendor, name: str) -> None:
    doc = document(vendor, IMAGE)
    del doc[name]
    with pytest.raises(BadManifest) as caught:
        parse_manifest(raw(doc))
    assert name in str(caught.value)
    assert caught.value.field == name


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got array"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"size": 1, "size": 2}', "the key 'size' twice"),
        (b'{"size": 1.0}', "non-integer number '1.0'"),
        (b'{"size": 1e3}', "non-integer number '1e3'"),
        (b'{"size": NaN}', "NaN, which is not JSON"),
        (b" " * (MAX_MANIFEST_BYTES + 1), f"more than the {MAX_MANIFEST_BYTES} allowed"),
    ],
)
def test_malformed_json_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(BadManifest) as caught:
        parse_manifest(data)
    assert message in str(caught.value)


def test_size_limit_is_the_hubs_choice(vendor: Vendor) -> None:
    data = raw(document(vendor, IMAGE))
    with pytest.raises(TooLarge, match=f"image size {len(IMAGE)} bytes is over the hub's limit of 100 bytes"):
        parse_manifest(data, max_image_bytes=100)
    assert parse_manifest(data, max_image_bytes=len(IMAGE)).size == len(IMAGE)


# ------------------------------------------------------------------------------------------ keys and signatures


def test_key_id_is_sha256_prefix_of_raw_public_key() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    raw_key = key.public_bytes_raw()
    assert key_id(key) == key_id(raw_key) == hashlib.sha256(raw_key).hexdigest()[:16]
    assert len(key_id(key)) == 16
    with pytest.raises(ValueError, match="32 bytes"):
        key_id(raw_key[:31])


def test_public_key_base64_round_trip() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    text = public_key_b64(key)
    assert len(base64.b64decode(text)) == 32
    assert public_key_from_b64(text + "\n") == key
    with pytest.raises(ValueError, match="not valid base64"):
        public_key_from_b64("not base64!")
    with pytest.raises(ValueError, match="32 bytes, got 3"):
        public_key_from_b64("AAAA")


def test_signature_encodings(vendor: Vendor) -> None:
    manifest = parse_manifest(raw(document(vendor, IMAGE)))
    signature = sign_manifest(manifest, vendor.private_key)
    assert len(signature) == 64
    vendor.private_key.public_key().verify(signature, manifest.canonical_bytes())
    text = encode_signature(signature)
    assert decode_signature(signature) == signature
    assert decode_signature(text) == signature
    assert decode_signature((text + "\n").encode()) == signature
    with pytest.raises(BadSignature, match="neither 64 raw bytes nor valid base64"):
        decode_signature("***")
    with pytest.raises(BadSignature, match="64 bytes, got 63"):
        decode_signature(encode_signature(signature[:63]))


# ------------------------------------------------------------------------------------------ versions


@pytest.mark.parametrize(
    "text", ["0.0.0", "1.2.3", "10.20.30", "1.0.0-alpha.1", "1.0.0-0.3.7", "1.0.0-x-y.z--", "1.0.0+001.sha-5"]
)
def test_valid_versions_round_trip(text: str) -> None:
    assert str(Version.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "1", "1.2", "1.2.3.4", "01.2.3", "1.02.3", "1.2.03", "-1.2.3", "1.2.3-", "1.2.3+", "1.2.3-01",
     "1.2.3-a..b", "1.2.3-a_b", "1.2.3+a..b", "v1.2.3", " 1.2.3", "1.2.3 ", "١.2.3", "1.2.3-é"],
)  # fmt: skip
def test_invalid_versions_are_refused(text: str) -> None:
    with pytest.raises(InvalidVersion):
        Version.parse(text)


def test_precedence_example_from_the_standard() -> None:
    chain = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
             "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0", "2.0.10", "10.0.0"]  # fmt: skip
    versions = [Version.parse(t) for t in chain]
    assert all(a < b for a, b in itertools.pairwise(versions))
    assert sorted(reversed(versions)) == versions


def test_build_metadata_is_ignored_in_comparisons() -> None:
    a, b = Version.parse("1.0.0+build.1"), Version.parse("1.0.0+build.2")
    assert a == b and not a < b and not b < a and hash(a) == hash(b)
    assert str(a) != str(b)
    assert Version.parse("1.0.0-rc.1+x") < Version.parse("1.0.0")


def _oracle(a: str, b: str) -> int:
    """SemVer 2.0.0 §11 written out independently of ``Version``: -1, 0 or 1."""

    def split(text: str) -> tuple[list[int], list[str]]:
        text = text.split("+", 1)[0]
        core, _, pre = text.partition("-")
        return [int(x) for x in core.split(".")], pre.split(".") if pre else []

    (core_a, pre_a), (core_b, pre_b) = split(a), split(b)
    if core_a != core_b:
        return -1 if core_a < core_b else 1
    if not pre_a or not pre_b:
        return (not pre_a) - (not pre_b)  # a release outranks a pre-release
    for x, y in zip(pre_a, pre_b, strict=False):
        if x == y:
            continue
        if x.isdigit() and y.isdigit():
            return -1 if int(x) < int(y) else 1
        if x.isdigit() != y.isdigit():
            return -1 if x.isdigit() else 1
        return -1 if x < y else 1
    return (len(pre_a) > len(pre_b)) - (len(pre_a) < len(pre_b))


_numeric = st.integers(0, 12).map(str) | st.sampled_from(["99", "100", "1000000000000000000000"])
_alnum = st.text("abxyzAZ-0", min_size=1, max_size=4).filter(lambda s: not s.isdigit())
_versions = st.builds(
    lambda core, pre, build: ".".join(core) + ("-" + ".".join(pre) if pre else "") + ("+" + ".".join(build) if build else ""),
    st.lists(_numeric, min_size=3, max_size=3),
    st.lists(_numeric | _alnum, max_size=4),
    st.lists(st.text("0123abc-", min_size=1, max_size=3), max_size=2),
)  # fmt: skip


@given(_versions, _versions)
def test_ordering_matches_the_standard(a: str, b: str) -> None:
    va, vb = Version.parse(a), Version.parse(b)
    assert str(va) == a
    expected = _oracle(a, b)
    assert (va < vb, va == vb, va > vb) == (expected < 0, expected == 0, expected > 0)
    assert (va <= vb) == (expected <= 0) and (va >= vb) == (expected >= 0)
    if va == vb:
        assert hash(va) == hash(vb)


@given(st.lists(_versions, min_size=2, max_size=8))
def test_sorting_is_a_total_order(texts: list[str]) -> None:
    versions = sorted(Version.parse(t) for t in texts)
    assert versions == sorted(versions, key=functools.cmp_to_key(lambda x, y: _oracle(str(x), str(y))))
    assert all(a <= b for a, b in itertools.pairwise(versions))
