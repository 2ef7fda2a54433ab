"""The ORES firmware manifest: its fields, strict parsing, canonical bytes, signatures and version ordering.

A firmware release is an opaque image plus a small JSON manifest that describes it (vendor, compatible models,
semantic version, size, SHA-256, minimum hub version, release notes, creation time, signing key id) and a
detached Ed25519 signature by the vendor's key over the manifest's canonical bytes (see ``docs/firmware.md``).
This module parses a manifest strictly into a frozen ``Manifest``, renders and signs it, parses and orders
semantic versions (SemVer 2.0.0), and defines ``FirmwareError`` and its subclasses, one per rejection reason,
each with a stable ``code`` that the hub API and the vendor tool pass on.  Nothing here checks trust or
policy; that is ``firmware.verify``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, TypedDict

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "FORMAT_VERSION",
    "MAX_IMAGE_BYTES",
    "MAX_MANIFEST_BYTES",
    "BadManifest",
    "BadSignature",
    "Downgrade",
    "FirmwareError",
    "HashMismatch",
    "HubTooOld",
    "InvalidVersion",
    "Manifest",
    "ManifestJSON",
    "NotNewer",
    "SizeMismatch",
    "TooLarge",
    "UnsupportedFormat",
    "UntrustedKey",
    "VendorMismatch",
    "Version",
    "WrongModel",
    "canonical_bytes",
    "check_format",
    "decode_signature",
    "encode_signature",
    "format_created_at",
    "key_id",
    "load_document",
    "manifest_from_document",
    "parse_manifest",
    "public_key_b64",
    "public_key_from_b64",
    "sign_manifest",
]

FORMAT_VERSION: Final = 1
"""The only manifest format version this hub understands."""

MAX_IMAGE_BYTES: Final = 128 * 1024 * 1024
"""The hub's default limit on an image's size (128 MiB); a manifest that declares more is ``TooLarge``."""

MAX_MANIFEST_BYTES: Final = 64 * 1024
"""A manifest file larger than this (64 KiB) is refused before it is parsed."""

SIGNATURE_BYTES: Final = 64
PUBLIC_KEY_BYTES: Final = 32
MAX_VENDOR_CHARS: Final = 128
MAX_MODEL_CHARS: Final = 128
MAX_MODELS: Final = 64
MAX_VERSION_CHARS: Final = 256
MAX_NOTES_CHARS: Final = 16 * 1024


# ------------------------------------------------------------------------------------------ errors


class FirmwareError(Exception):
    """Root of every firmware rejection.  ``code`` is stable (API and tool output); the message is precise."""

    code: ClassVar[str] = "firmware_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """``{"code": ..., "message": ...}`` for an API error body."""
        return {"code": self.code, "message": self.message}


class BadManifest(FirmwareError):
    """The manifest is not valid: not JSON, a missing, unknown or mistyped field, a value out of range.
    ``field`` names the offending field when there is one."""

    code: ClassVar[str] = "bad_manifest"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedFormat(BadManifest):
    """The manifest's ``format_version`` is not one this hub understands."""

    code: ClassVar[str] = "unsupported_format"


class InvalidVersion(FirmwareError):
    """A version string (the running firmware's or the hub's) is not a semantic version.  Inside a
    manifest the same problem is a ``BadManifest``."""

    code: ClassVar[str] = "invalid_version"


class TooLarge(FirmwareError):
    """The manifest declares an image larger than the hub accepts."""

    code: ClassVar[str] = "too_large"


class BadSignature(FirmwareError):
    """The signature is malformed, or does not verify with the key the manifest names."""

    code: ClassVar[str] = "bad_signature"


class UntrustedKey(FirmwareError):
    """The manifest names a signing key that is not among the trusted keys (never added, or removed)."""

    code: ClassVar[str] = "untrusted_key"


class VendorMismatch(FirmwareError):
    """The manifest's vendor is not the vendor the signing key is trusted for."""

    code: ClassVar[str] = "vendor_mismatch"


class WrongModel(FirmwareError):
    """The image is not for the target module's model."""

    code: ClassVar[str] = "wrong_model"


class HubTooOld(FirmwareError):
    """The hub's version is below the manifest's ``min_hub_version``."""

    code: ClassVar[str] = "hub_too_old"


class NotNewer(FirmwareError):
    """Anti-rollback: the image's version is not strictly newer than the running one (here: equal)."""

    code: ClassVar[str] = "not_newer"


class Downgrade(NotNewer):
    """Anti-rollback: the image's version is older than the running one."""

    code: ClassVar[str] = "downgrade"


class SizeMismatch(FirmwareError):
    """The image's length differs from the manifest's ``size``: it is truncated, or longer.  ``expected`` is
    the manifest's size; ``received`` how many bytes had been taken when the image was rejected."""

    code: ClassVar[str] = "size_mismatch"

    def __init__(self, message: str, *, expected: int, received: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.received = received


class HashMismatch(FirmwareError):
    """The image's SHA-256 differs from the manifest's ``sha256``."""

    code: ClassVar[str] = "hash_mismatch"


# ------------------------------------------------------------------------------------------ versions

_NUMERIC = re.compile(r"0|[1-9][0-9]*")
_IDENT = re.compile(r"[0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True, eq=False)
class Version:
    """A semantic version (SemVer 2.0.0).  Ordering and equality follow the standard's precedence rules:
    numeric major, minor, patch; a pre-release ranks below its release; pre-release identifiers compare one
    by one (numeric ones numerically and below alphanumeric ones, which compare in ASCII order), a shorter
    list ranking lower when all before are equal.  Build metadata is kept in ``str()`` but ignored when
    comparing, so ``1.0.0+a == 1.0.0+b``."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]``; raise ``InvalidVersion`` saying what is wrong."""
        if not isinstance(text, str):
            raise InvalidVersion(f"a version must be a string, got {type(text).__name__}")
        if not text:
            raise InvalidVersion("empty version")
        if len(text) > MAX_VERSION_CHARS:
            raise InvalidVersion(f"version is longer than {MAX_VERSION_CHARS} characters")
        rest, plus, build_text = text.partition("+")
        core, dash, pre_text = rest.partition("-")
        parts = core.split(".")
        if len(parts) != 3:
            raise InvalidVersion(f"{text!r} is not a semantic version: expected MAJOR.MINOR.PATCH")
        numbers: list[int] = []
        for name, part in zip(("major", "minor", "patch"), parts, strict=True):
            if not part.isascii() or not _NUMERIC.fullmatch(part):
                raise InvalidVersion(
                    f"{text!r} is not a semantic version: {name} {part!r} must be a number without "
                    "leading zeros"
                )
            numbers.append(int(part))
        prerelease: tuple[str, ...] = ()
        if dash:
            prerelease = tuple(pre_text.split("."))
            for ident in prerelease:
                if not ident.isascii() or not _IDENT.fullmatch(ident):
                    raise InvalidVersion(
                        f"{text!r} is not a semantic version: pre-release identifier {ident!r} must be "
                        "non-empty [0-9A-Za-z-]"
                    )
                if ident.isdigit() and not _NUMERIC.fullmatch(ident):
                    raise InvalidVersion(
                        f"{text!r} is not a semantic version: numeric pre-release identifier {ident!r} "
                        "has a leading zero"
                    )
        build: tuple[str, ...] = ()
        if plus:
            build = tuple(build_text.split("."))
            for ident in build:
                if not ident.isascii() or not _IDENT.fullmatch(ident):
                    raise InvalidVersion(
                        f"{text!r} is not a semantic version: build identifier {ident!r} must be "
                        "non-empty [0-9A-Za-z-]"
                    )
        return cls(numbers[0], numbers[1], numbers[2], prerelease, build)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    def _key(self) -> tuple[Any, ...]:
        # A release (no pre-release) ranks above every pre-release of the same core: flag 1 vs 0.
        # Identifiers: numeric (0, n, "") rank below alphanumeric (1, 0, s); tuples compare element by
        # element and a shorter tuple that is a prefix ranks lower, exactly as SemVer §11 says.
        pre = tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Version) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Version) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Version) -> bool:
        return self._key() >= other._key()


# ------------------------------------------------------------------------------------------ keys, signatures


def key_id(public_key: Ed25519PublicKey | bytes) -> str:
    """The id of a public key: the first 16 hex digits of SHA-256 over its raw 32 bytes."""
    raw = public_key if isinstance(public_key, bytes) else public_key.public_bytes_raw()
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key in standard base64 (how vendors publish it and installers enter it)."""
    return base64.b64encode(public_key.public_bytes_raw()).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Parse a base64 raw Ed25519 public key; raise ``ValueError`` saying what is wrong."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError("public key is not valid base64") from err
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must decode to {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def encode_signature(signature: bytes) -> str:
    """A raw 64-byte signature as standard base64 (the content of a ``.sig`` file, without the newline)."""
    return base64.b64encode(signature).decode("ascii")


def decode_signature(signature: bytes | str) -> bytes:
    """The raw 64-byte signature from raw bytes, or from base64 text (surrounding whitespace allowed, as in
    a ``.sig`` file); raise ``BadSignature`` saying what is wrong."""
    if isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES:
        return signature
    try:
        text = signature.decode("ascii") if isinstance(signature, bytes) else signature
        raw = base64.b64decode(text.strip(), validate=True)
    except (UnicodeDecodeError, binascii.Error, ValueError) as err:
        raise BadSignature("signature is neither 64 raw bytes nor valid base64") from err
    if len(raw) != SIGNATURE_BYTES:
        raise BadSignature(f"signature must decode to {SIGNATURE_BYTES} bytes, got {len(raw)}")
    return raw


def canonical_bytes(document: object) -> bytes:
    """The canonical bytes of a JSON document: keys sorted, no whitespace, UTF-8 without ``\\u`` escapes
    except for control characters.  This is what a signature covers."""
    try:
        return json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as err:
        raise BadManifest(f"manifest cannot be rendered canonically: {err}") from err


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> bytes:
    """The raw 64-byte Ed25519 signature of ``manifest.canonical_bytes()``."""
    return private_key.sign(manifest.canonical_bytes())


# ------------------------------------------------------------------------------------------ manifest

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ManifestJSON(TypedDict):
    """The manifest on the wire (format version 1)."""

    format_version: int
    vendor: str
    models: list[str]
    version: str
    size: int
    sha256: str
    min_hub_version: str
    release_notes: str
    created_at: str
    key_id: str


_FIELDS: Final = frozenset(ManifestJSON.__annotations__)


def format_created_at(moment: datetime) -> str:
    """``created_at`` as the manifest writes it: UTC, whole seconds, ``Z`` suffix."""
    if moment.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed, valid manifest (not yet trusted: see ``firmware.verify``).  ``to_wire()`` gives back exactly
    the JSON that was parsed, so ``canonical_bytes()`` is what the signature covers."""

    format_version: int
    vendor: str
    models: tuple[str, ...]
    version: Version
    size: int
    sha256: str
    min_hub_version: Version
    release_notes: str
    created_at: datetime
    key_id: str

    def to_wire(self) -> ManifestJSON:
        return {
            "format_version": self.format_version,
            "vendor": self.vendor,
            "models": list(self.models),
            "version": str(self.version),
            "size": self.size,
            "sha256": self.sha256,
            "min_hub_version": str(self.min_hub_version),
            "release_notes": self.release_notes,
            "created_at": format_created_at(self.created_at),
            "key_id": self.key_id,
        }

    def canonical_bytes(self) -> bytes:
        return canonical_bytes(self.to_wire())

    @classmethod
    def create(
        cls,
        *,
        vendor: str,
        models: list[str] | tuple[str, ...],
        version: str,
        size: int,
        sha256: str,
        key_id: str,
        min_hub_version: str = "0.1.0",
        release_notes: str = "",
        created_at: datetime | None = None,
        max_image_bytes: int = MAX_IMAGE_BYTES,
    ) -> Manifest:
        """Build a manifest from values, validated exactly as ``parse_manifest`` validates a file."""
        document = {
            "format_version": FORMAT_VERSION,
            "vendor": vendor,
            "models": list(models),
            "version": version,
            "size": size,
            "sha256": sha256,
            "min_hub_version": min_hub_version,
            "release_notes": release_notes,
            "created_at": format_created_at(created_at or datetime.now(UTC)),
            "key_id": key_id,
        }
        return manifest_from_document(document, max_image_bytes=max_image_bytes)


def load_document(data: bytes) -> dict[str, Any]:
    """Decode manifest bytes into a JSON object, strictly: at most ``MAX_MANIFEST_BYTES``, UTF-8, one
    object, no duplicate keys, no floats, NaN or Infinity.  Raise ``BadManifest``."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BadManifest(f"manifest is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadManifest(f"manifest is not UTF-8: {err}") from err
    try:
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_constant,
        )
    except BadManifest:
        raise
    except ValueError as err:  # json.JSONDecodeError, and int() over the digit limit
        raise BadManifest(f"manifest is not valid JSON: {err}") from err
    if not isinstance(document, dict):
        raise BadManifest(f"manifest must be a JSON object, got {_json_type(document)}")
    return document


def check_format(document: dict[str, Any]) -> None:
    """Raise ``BadManifest`` or ``UnsupportedFormat`` unless ``format_version`` is one this hub reads."""
    if "format_version" not in document:
        raise BadManifest("manifest has no 'format_version'", field="format_version")
    value = document["format_version"]
    if type(value) is not int:
        raise BadManifest(
            f"manifest field 'format_version' must be an integer, got {_json_type(value)}",
            field="format_version",
        )
    if value != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"manifest format_version {value} is not supported (this hub reads {FORMAT_VERSION})",
            field="format_version",
        )


def parse_manifest(data: bytes, *, max_image_bytes: int = MAX_IMAGE_BYTES) -> Manifest:
    """Parse and validate manifest bytes (the signature is not checked here).

    Raise ``UnsupportedFormat`` for an unknown format version, ``TooLarge`` when the declared size is over
    ``max_image_bytes``, and ``BadManifest`` with the field and the reason for anything else."""
    return manifest_from_document(load_document(data), max_image_bytes=max_image_bytes)


def manifest_from_document(document: dict[str, Any], *, max_image_bytes: int = MAX_IMAGE_BYTES) -> Manifest:
    """Validate a decoded manifest object (see ``parse_manifest``)."""
    check_format(document)
    missing = sorted(_FIELDS - document.keys())
    if missing:
        raise BadManifest(f"manifest is missing field(s): {', '.join(missing)}", field=missing[0])
    unknown = sorted(document.keys() - _FIELDS)
    if unknown:
        raise BadManifest(f"manifest has unknown field(s): {', '.join(unknown)}", field=unknown[0])

    vendor = _name(document, "vendor", MAX_VENDOR_CHARS)

    models_value = _typed(document, "models", list, "an array of strings")
    if not models_value:
        raise BadManifest("manifest field 'models' must list at least one model", field="models")
    if len(models_value) > MAX_MODELS:
        raise BadManifest(f"manifest field 'models' lists more than {MAX_MODELS} models", field="models")
    models: list[str] = []
    for index, model in enumerate(models_value):
        models.append(_name_value(model, f"models[{index}]", MAX_MODEL_CHARS, field="models"))
    if len(set(models)) != len(models):
        raise BadManifest("manifest field 'models' lists a model twice", field="models")

    version = _version(document, "version")
    min_hub_version = _version(document, "min_hub_version")

    size = document["size"]
    if type(size) is not int:
        raise BadManifest(f"manifest field 'size' must be an integer, got {_json_type(size)}", field="size")
    if size <= 0:
        raise BadManifest(f"manifest field 'size' must be positive, got {size}", field="size")
    if size > max_image_bytes:
        raise TooLarge(f"image size {size} bytes is over the hub's limit of {max_image_bytes} bytes")

    sha256 = _typed(document, "sha256", str, "a string")
    if not _HEX64.fullmatch(sha256):
        raise BadManifest("manifest field 'sha256' must be 64 lowercase hexadecimal digits", field="sha256")

    notes = _typed(document, "release_notes", str, "a string")
    if len(notes) > MAX_NOTES_CHARS:
        raise BadManifest(
            f"manifest field 'release_notes' is longer than {MAX_NOTES_CHARS} characters",
            field="release_notes",
        )
    _check_encodable(notes, "release_notes")

    created_text = _typed(document, "created_at", str, "a string")
    if not _CREATED_AT.fullmatch(created_text):
        raise BadManifest(
            f"manifest field 'created_at' must be UTC as YYYY-MM-DDTHH:MM:SSZ, got {created_text!r}",
            field="created_at",
        )
    try:
        created_at = datetime.strptime(created_text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError as err:
        raise BadManifest(
            f"manifest field 'created_at' is not a valid date and time: {created_text!r}", field="created_at"
        ) from err

    kid = _typed(document, "key_id", str, "a string")
    if not _HEX16.fullmatch(kid):
        raise BadManifest("manifest field 'key_id' must be 16 lowercase hexadecimal digits", field="key_id")

    return Manifest(
        format_version=FORMAT_VERSION,
        vendor=vendor,
        models=tuple(models),
        version=version,
        size=size,
        sha256=sha256,
        min_hub_version=min_hub_version,
        release_notes=notes,
        created_at=created_at,
        key_id=kid,
    )


# ------------------------------------------------------------------------------------------ helpers


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadManifest(f"manifest has the key {key!r} twice", field=key)
        result[key] = value
    return result


def _no_float(text: str) -> Any:
    raise BadManifest(f"manifest has a non-integer number {text!r}; only integers are allowed")


def _no_constant(text: str) -> Any:
    raise BadManifest(f"manifest has {text}, which is not JSON")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _typed(document: dict[str, Any], name: str, kind: type, description: str) -> Any:
    value = document[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadManifest(
            f"manifest field {name!r} must be {description}, got {_json_type(value)}", field=name
        )
    return value


def _check_encodable(text: str, label: str, field: str | None = None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadManifest(
            f"manifest field {label!r} holds an unpaired surrogate escape", field=field or label
        ) from err


def _name_value(value: object, label: str, limit: int, *, field: str) -> str:
    if not isinstance(value, str):
        raise BadManifest(f"manifest field {label!r} must be a string, got {_json_type(value)}", field=field)
    if not value:
        raise BadManifest(f"manifest field {label!r} must not be empty", field=field)
    if len(value) > limit:
        raise BadManifest(f"manifest field {label!r} is longer than {limit} characters", field=field)
    if value != value.strip():
        raise BadManifest(f"manifest field {label!r} has leading or trailing whitespace", field=field)
    if _CONTROL.search(value):
        raise BadManifest(f"manifest field {label!r} contains a control character", field=field)
    _check_encodable(value, label, field)
    return value


def _name(document: dict[str, Any], name: str, limit: int) -> str:
    return _name_value(document[name], name, limit, field=name)


def _version(document: dict[str, Any], name: str) -> Version:
    text = _typed(document, name, str, "a string")
    try:
        return Version.parse(text)
    except InvalidVersion as err:
        raise BadManifest(f"manifest field {name!r}: {err.message}", field=name) from err
