"""Device attestation: Ed25519 device certificates, the challenge a module signs, and their verification.

Every ORES module holds an Ed25519 *device key*; its vendor's key signs a *device certificate* binding the
vendor, model and serial to that key.  To prove its identity a module signs a fresh nonce from the hub (a
domain-separated *challenge message*) and returns the signature together with its certificate; the hub checks
both against the vendor keys it trusts (``verify_attestation``).  ``ChallengeBook`` hands out nonces and lets
each be used once, before it expires.  The byte formats are specified for module makers in
docs/module-protocol.md §6: the certificate's signed bytes are ``b"ORES-CERT-1\\0"`` followed by the canonical
JSON (keys sorted, no whitespace, UTF-8) of ``{"v": 1, vendor, model, serial, device_key, vendor_key_id,
issued_at}``, and the challenge message is ``b"ORES-AUTH-1\\0" + hub_id + b"\\0" + nonce``.  Every failure
is an ``AttestationError`` (an ``AuthenticationFailed``) whose message says precisely what was wrong, and is
logged.  ``demo_vendor_key`` is a PUBLICLY KNOWN, INSECURE key for demos and tests only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from devices.errors import AuthenticationFailed

__all__ = [
    "CERT_DOMAIN",
    "CERT_VERSION",
    "CHALLENGE_DOMAIN",
    "DEMO_VENDOR",
    "DEMO_VENDOR_PHRASE",
    "MAX_NONCE_LEN",
    "MIN_NONCE_LEN",
    "NONCE_LEN",
    "AttestationError",
    "BadCertificate",
    "BadSignature",
    "ChallengeBook",
    "DeviceCertificate",
    "IdentityMismatch",
    "ReplayedNonce",
    "SimAttestation",
    "TrustAnchor",
    "TrustedKey",
    "UntrustedVendor",
    "challenge_message",
    "check_hub_id",
    "decode_b64",
    "demo_vendor_key",
    "encode_b64",
    "issue_certificate",
    "key_id",
    "make_sim_attestation",
    "public_key_from_raw",
    "sign_challenge",
    "verify_attestation",
]

_LOGGER = logging.getLogger(__name__)

#: Prefix of the bytes a vendor key signs for a device certificate.
CERT_DOMAIN: Final = b"ORES-CERT-1\0"
#: Prefix of the challenge message a device key signs.
CHALLENGE_DOMAIN: Final = b"ORES-AUTH-1\0"
#: The ``v`` member of the signed certificate object.
CERT_VERSION: Final = 1
#: Nonce length ``ChallengeBook`` issues; modules accept MIN_NONCE_LEN..MAX_NONCE_LEN.
NONCE_LEN: Final = 32
MIN_NONCE_LEN: Final = 16
MAX_NONCE_LEN: Final = 64
_MAX_TEXT_LEN: Final = 128
_SIGNATURE_LEN: Final = 64
_KEY_LEN: Final = 32
_KEY_ID_RE: Final = re.compile(r"^[0-9a-f]{16}$")
_ISSUED_AT_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")

#: Vendor name of the demo key.
DEMO_VENDOR: Final = "ORES Demo Vendors"
#: The phrase whose SHA-256 is the demo vendor's private key.  It is PUBLIC: anyone can sign certificates and
#: firmware with the demo key, so a hub must trust it only in demo mode.
DEMO_VENDOR_PHRASE: Final = b"ORES demo vendor key -- PUBLIC and INSECURE -- never trust it outside demo mode"


# ----------------------------------------------------------------------------------------------- errors


class AttestationError(AuthenticationFailed):
    """A module could not prove its identity; the message says why."""


class BadCertificate(AttestationError):
    """The certificate is malformed, or its vendor signature does not verify."""


class UntrustedVendor(AttestationError):
    """The certificate is signed by a key the hub does not trust (for this vendor)."""


class BadSignature(AttestationError):
    """The challenge signature does not verify with the certificate's device key."""


class IdentityMismatch(AttestationError):
    """The module announced a vendor or serial other than the one its certificate names."""


class ReplayedNonce(AttestationError):
    """A nonce that this hub did not issue, that expired, or that was already used."""


# ----------------------------------------------------------------------------------------------- helpers


class TrustedKey(Protocol):
    """A vendor key the hub trusts (``hub.trust.VendorKey`` is one; ``TrustAnchor`` another)."""

    @property
    def vendor(self) -> str: ...

    @property
    def public_key(self) -> Ed25519PublicKey: ...


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """The simplest ``TrustedKey``: a vendor name and its public key (for tests and fixed trust lists)."""

    vendor: str
    public_key: Ed25519PublicKey


def encode_b64(data: bytes) -> str:
    """Standard base64 (RFC 4648 §4) with padding, as ASCII text."""
    return base64.b64encode(data).decode("ascii")


def decode_b64(text: object, where: str, *, length: int | None = None) -> bytes:
    """Strictly decode standard padded base64 (the canonical encoding only); ``ValueError`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a base64 string, got {type(text).__name__}")
    if len(text) > 4 * 1024:
        raise ValueError(f"{where}: base64 text too long")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise ValueError(f"{where}: not base64: {err}") from err
    if encode_b64(raw) != text:
        raise ValueError(f"{where}: not canonical base64")
    if length is not None and len(raw) != length:
        raise ValueError(f"{where}: expected {length} bytes, got {len(raw)}")
    return raw


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


# Ed25519 public-key validation.  OpenSSL accepts any 32 bytes as a public key; a small-order point (the
# identity, for one) lets anyone forge signatures that verify for every message.  A certificate or trust
# entry holding such a key is refused.  Arithmetic on the twisted Edwards curve -x²+y² = 1 + d·x²·y².
_P: Final = 2**255 - 19
_D: Final = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1: Final = pow(2, (_P - 1) // 4, _P)


def _decode_point(raw: bytes) -> tuple[int, int] | None:
    """The affine point of a canonical 32-byte encoding, or ``None`` if it is not one."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            return None
    if x == 0 and sign == 1:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, _P - 2, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P
    return x3, y3


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its raw 32 bytes; ``ValueError`` unless it is a canonical point of large
    order (weak keys, for which signatures can be forged, are refused)."""
    if len(raw) != _KEY_LEN:
        raise ValueError(f"an Ed25519 public key has {_KEY_LEN} bytes, not {len(raw)}")
    point = _decode_point(raw)
    if point is None:
        raise ValueError("not a valid Ed25519 public key (not a canonical curve point)")
    for _ in range(3):
        point = _add(point, point)
    if point == (0, 1):
        raise ValueError("weak Ed25519 public key (a point of small order)")
    return Ed25519PublicKey.from_public_bytes(raw)


def check_hub_id(hub_id: object, where: str = "hub_id") -> str:
    """A hub id: 1..128 printable characters, no NUL (it is NUL-terminated in the challenge message)."""
    if not isinstance(hub_id, str):
        raise ValueError(f"{where}: expected a string, got {type(hub_id).__name__}")
    if not 1 <= len(hub_id) <= _MAX_TEXT_LEN or not hub_id.isprintable():
        raise ValueError(f"{where}: must be 1..{_MAX_TEXT_LEN} printable characters")
    return hub_id


def _text(value: object, where: str, *, min_len: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    if not min_len <= len(value) <= _MAX_TEXT_LEN:
        raise ValueError(f"{where}: must be {min_len}..{_MAX_TEXT_LEN} characters, got {len(value)}")
    if not value.isprintable():
        raise ValueError(f"{where}: contains a control or unprintable character")
    if value != value.strip():
        raise ValueError(f"{where}: has leading or trailing whitespace")
    return value


def _vendor_key_id(value: object) -> str:
    if not isinstance(value, str) or not _KEY_ID_RE.match(value):
        raise ValueError("vendor_key_id: expected 16 lowercase hex digits")
    return value


def _issued_at(value: object) -> str:
    if not isinstance(value, str) or not _ISSUED_AT_RE.match(value):
        raise ValueError("issued_at: expected 'YYYY-MM-DDTHH:MM:SSZ'")
    try:
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError as err:
        raise ValueError(f"issued_at: not a valid time: {value!r}") from err
    return value


def _format_issued_at(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------- certificate


@dataclass(frozen=True, slots=True)
class DeviceCertificate:
    """A vendor's signed statement that ``device_key`` (raw 32-byte Ed25519 public key) belongs to the module
    ``vendor``/``model``/``serial``.  ``vendor_key_id`` names the signing key (``key_id``), ``issued_at`` is
    ``YYYY-MM-DDTHH:MM:SSZ`` and ``signature`` the vendor's 64-byte Ed25519 signature over ``signed_bytes()``.
    Certificates do not expire; removing the vendor key from the hub's trust store revokes them all."""

    vendor: str
    model: str
    serial: str
    device_key: bytes
    vendor_key_id: str
    issued_at: str
    signature: bytes

    def signed_bytes(self) -> bytes:
        """What the vendor key signs: ``CERT_DOMAIN`` + canonical JSON of the certified fields.

        Raises ``BadCertificate`` if a field cannot be encoded (only possible for a hand-built certificate).
        """
        body = {
            "v": CERT_VERSION,
            "vendor": self.vendor,
            "model": self.model,
            "serial": self.serial,
            "device_key": encode_b64(self.device_key),
            "vendor_key_id": self.vendor_key_id,
            "issued_at": self.issued_at,
        }
        try:
            text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            return CERT_DOMAIN + text.encode("utf-8")
        except (TypeError, ValueError) as err:  # UnicodeEncodeError is a ValueError
            raise BadCertificate(f"certificate cannot be encoded: {err}") from err

    def device_public_key(self) -> Ed25519PublicKey:
        """The certified device key; raises ``BadCertificate`` if it is not a valid, strong key."""
        try:
            return public_key_from_raw(self.device_key)
        except ValueError as err:
            raise BadCertificate(f"certificate device_key: {err}") from err

    def check(self) -> DeviceCertificate:
        """Check that every field is well formed (see docs/module-protocol.md §6.2); raises ``BadCertificate``."""
        try:
            if not isinstance(self.device_key, bytes) or not isinstance(self.signature, bytes):
                raise ValueError("device_key and signature must be bytes")
            _text(self.vendor, "vendor", min_len=1)
            _text(self.model, "model", min_len=0)
            _text(self.serial, "serial", min_len=1)
            _vendor_key_id(self.vendor_key_id)
            _issued_at(self.issued_at)
            public_key_from_raw(self.device_key)
            if len(self.signature) != _SIGNATURE_LEN:
                raise ValueError(f"signature: expected {_SIGNATURE_LEN} bytes, got {len(self.signature)}")
        except ValueError as err:
            raise BadCertificate(f"malformed certificate: {err}") from err
        return self

    def to_wire(self) -> dict[str, str]:
        """The JSON object that travels on the wire (bytes as standard base64)."""
        return {
            "vendor": self.vendor,
            "model": self.model,
            "serial": self.serial,
            "device_key": encode_b64(self.device_key),
            "vendor_key_id": self.vendor_key_id,
            "issued_at": self.issued_at,
            "signature": encode_b64(self.signature),
        }

    @classmethod
    def from_wire(cls, obj: object) -> DeviceCertificate:
        """Parse and check the wire object; raises only ``BadCertificate``.  Unknown members are ignored."""
        if not isinstance(obj, dict):
            raise BadCertificate(f"malformed certificate: expected an object, got {type(obj).__name__}")
        try:
            missing = [name for name in _WIRE_FIELDS if name not in obj]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
            cert = cls(
                vendor=_text(obj["vendor"], "vendor", min_len=1),
                model=_text(obj["model"], "model", min_len=0),
                serial=_text(obj["serial"], "serial", min_len=1),
                device_key=decode_b64(obj["device_key"], "device_key", length=_KEY_LEN),
                vendor_key_id=_vendor_key_id(obj["vendor_key_id"]),
                issued_at=_issued_at(obj["issued_at"]),
                signature=decode_b64(obj["signature"], "signature", length=_SIGNATURE_LEN),
            )
        except ValueError as err:
            raise BadCertificate(f"malformed certificate: {err}") from err
        return cert.check()


_WIRE_FIELDS: Final = ("vendor", "model", "serial", "device_key", "vendor_key_id", "issued_at", "signature")


def issue_certificate(
    vendor_key: Ed25519PrivateKey,
    *,
    vendor: str,
    model: str,
    serial: str,
    device_key: Ed25519PublicKey,
    issued_at: float | None = None,
) -> DeviceCertificate:
    """Sign a certificate for ``device_key`` with ``vendor_key`` (``issued_at``: POSIX seconds, default now).

    Raises ``BadCertificate`` if a field is not acceptable (empty vendor or serial, control characters, …).
    """
    unsigned = DeviceCertificate(
        vendor=vendor,
        model=model,
        serial=serial,
        device_key=device_key.public_bytes_raw(),
        vendor_key_id=key_id(vendor_key.public_key()),
        issued_at=_format_issued_at(time.time() if issued_at is None else issued_at),
        signature=bytes(_SIGNATURE_LEN),
    )
    unsigned.check()
    signed = DeviceCertificate(
        vendor=unsigned.vendor,
        model=unsigned.model,
        serial=unsigned.serial,
        device_key=unsigned.device_key,
        vendor_key_id=unsigned.vendor_key_id,
        issued_at=unsigned.issued_at,
        signature=vendor_key.sign(unsigned.signed_bytes()),
    )
    return signed


# ----------------------------------------------------------------------------------------------- challenge


def challenge_message(nonce: bytes, hub_id: str) -> bytes:
    """The bytes a device key signs: ``b"ORES-AUTH-1\\0" + UTF-8 hub_id + b"\\0" + nonce``.

    Raises ``ValueError`` for a nonce outside 16..64 bytes or a hub id that is not 1..128 printable
    characters.
    """
    if not isinstance(nonce, bytes) or not MIN_NONCE_LEN <= len(nonce) <= MAX_NONCE_LEN:
        raise ValueError(f"nonce must be {MIN_NONCE_LEN}..{MAX_NONCE_LEN} bytes")
    check_hub_id(hub_id)
    try:
        hub = hub_id.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"hub_id is not encodable as UTF-8: {err}") from err
    return CHALLENGE_DOMAIN + hub + b"\0" + nonce


def sign_challenge(device_key: Ed25519PrivateKey, nonce: bytes, hub_id: str) -> bytes:
    """The module's answer to a challenge: its device key's signature over ``challenge_message``."""
    return device_key.sign(challenge_message(nonce, hub_id))


def verify_attestation(
    cert: DeviceCertificate,
    signature: bytes,
    *,
    nonce: bytes,
    hub_id: str,
    trusted: Mapping[str, TrustedKey],
    claimed: tuple[str, str] | None = None,
) -> DeviceCertificate:
    """Check a module's answer to the challenge ``(nonce, hub_id)``; returns the certificate if it holds.

    In order: the certificate is well formed (``BadCertificate``); its vendor key id is in ``trusted`` and
    that key belongs to the certificate's vendor (``UntrustedVendor``); the vendor signature verifies
    (``BadCertificate``); ``signature`` verifies over the challenge message with the certified device key
    (``BadSignature``); the ``claimed`` (vendor, serial) of the announcement equals the certificate's
    (``IdentityMismatch``).  Each refusal is logged at WARNING with its reason.  The nonce itself must be
    consumed from the ``ChallengeBook`` by the caller.
    """
    try:
        _verify(cert, signature, nonce=nonce, hub_id=hub_id, trusted=trusted, claimed=claimed)
    except AttestationError as err:
        _LOGGER.warning(
            "attestation refused (%s, certificate for %r/%r): %s",
            type(err).__name__,
            getattr(cert, "vendor", None),
            getattr(cert, "serial", None),
            err,
        )
        raise
    return cert


def _verify(
    cert: DeviceCertificate,
    signature: bytes,
    *,
    nonce: bytes,
    hub_id: str,
    trusted: Mapping[str, TrustedKey],
    claimed: tuple[str, str] | None,
) -> None:
    if not isinstance(cert, DeviceCertificate):
        raise BadCertificate(
            f"malformed certificate: expected a DeviceCertificate, got {type(cert).__name__}"
        )
    cert.check()
    anchor = trusted.get(cert.vendor_key_id)
    if anchor is None:
        raise UntrustedVendor(
            f"certificate is signed by vendor key {cert.vendor_key_id}, which this hub does not trust"
        )
    if anchor.vendor != cert.vendor:
        raise UntrustedVendor(
            f"vendor key {cert.vendor_key_id} belongs to {anchor.vendor!r}, "
            f"but the certificate names vendor {cert.vendor!r}"
        )
    if key_id(anchor.public_key) != cert.vendor_key_id:
        raise UntrustedVendor(f"trust entry {cert.vendor_key_id} holds a key with another id")
    try:
        anchor.public_key.verify(cert.signature, cert.signed_bytes())
    except InvalidSignature as err:
        raise BadCertificate(
            f"certificate signature does not verify with vendor key {cert.vendor_key_id} ({cert.vendor})"
        ) from err
    message = challenge_message(nonce, hub_id)
    if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_LEN:
        raise BadSignature(f"challenge signature must be {_SIGNATURE_LEN} bytes")
    try:
        cert.device_public_key().verify(signature, message)
    except InvalidSignature as err:
        raise BadSignature(
            "challenge signature does not verify with the certified device key "
            "(the module does not hold the key of this certificate, or signed another nonce)"
        ) from err
    if claimed is not None:
        vendor, serial = claimed
        if (vendor.strip(), serial.strip()) != (cert.vendor, cert.serial):
            raise IdentityMismatch(
                f"module announced {vendor!r}/{serial!r} but its certificate is for {cert.vendor!r}/{cert.serial!r}"
            )


class ChallengeBook:
    """Nonces this hub issued and not yet used: each is good for one ``consume``, within ``ttl_s``.

    At most ``max_pending`` nonces are kept; issuing beyond that drops the oldest, so a flood of challenges
    costs bounded memory (the dropped nonces then fail as unknown).  A bounded record of consumed nonces
    makes a replay fail with a precise reason.  ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_pending: int = 1024,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError("ttl_s must be positive")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_pending = max_pending
        self._pending: OrderedDict[bytes, float] = OrderedDict()  # nonce → expiry, oldest first
        self._used: OrderedDict[bytes, None] = OrderedDict()
        self._dropped = 0

    def __len__(self) -> int:
        """How many nonces are pending (issued, not consumed, possibly expired)."""
        return len(self._pending)

    @property
    def dropped(self) -> int:
        """How many pending nonces were dropped because the book was full."""
        return self._dropped

    def issue(self) -> bytes:
        """A fresh random nonce of ``NONCE_LEN`` bytes."""
        nonce = secrets.token_bytes(NONCE_LEN)
        self._pending[nonce] = self._clock() + self._ttl_s
        while len(self._pending) > self._max_pending:
            self._pending.popitem(last=False)
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                _LOGGER.warning(
                    "challenge book full (%d pending): dropped the oldest nonce (%d so far)",
                    self._max_pending,
                    self._dropped,
                )
        return nonce

    def consume(self, nonce: bytes) -> None:
        """Use ``nonce`` up; raises ``ReplayedNonce`` if it is unknown, expired or already used."""
        expiry = self._pending.pop(nonce, None) if isinstance(nonce, bytes) else None
        if expiry is None:
            if isinstance(nonce, bytes) and nonce in self._used:
                reason = "nonce was already used (replayed answer)"
            else:
                reason = "nonce was not issued by this hub (or was dropped)"
            _LOGGER.warning("challenge refused: %s", reason)
            raise ReplayedNonce(reason)
        self._used[nonce] = None
        while len(self._used) > self._max_pending:
            self._used.popitem(last=False)
        if self._clock() >= expiry:
            _LOGGER.warning("challenge refused: nonce expired")
            raise ReplayedNonce(f"nonce expired (valid for {self._ttl_s:g} s)")


# ----------------------------------------------------------------------------------------------- demo and sim


def demo_vendor_key(vendor: str = DEMO_VENDOR) -> Ed25519PrivateKey:
    """A demo vendor's private key: SHA-256 of the public ``DEMO_VENDOR_PHRASE`` (followed, for a vendor
    other than ``DEMO_VENDOR``, by a NUL byte and the vendor's name, so each simulated vendor has its own key).

    PUBLIC AND INSECURE: everyone can compute it, hence sign certificates for any serial with it.  The hub
    trusts it only in demo mode; never ship it in a product or trust it on a real installation.
    """
    seed = DEMO_VENDOR_PHRASE if vendor == DEMO_VENDOR else DEMO_VENDOR_PHRASE + b"\0" + vendor.encode()
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())


@dataclass(frozen=True, slots=True, eq=False)
class SimAttestation:
    """What a simulated module holds to prove its identity: its device key and its certificate."""

    device_key: Ed25519PrivateKey
    certificate: DeviceCertificate

    def respond(self, nonce: bytes, hub_id: str) -> tuple[DeviceCertificate, bytes]:
        """The module's answer to a challenge (``ValueError`` for a malformed nonce or hub id)."""
        return self.certificate, sign_challenge(self.device_key, nonce, hub_id)


def make_sim_attestation(
    vendor_key: Ed25519PrivateKey,
    *,
    vendor: str,
    model: str,
    serial: str,
    seed: bytes | None = None,
    issued_at: float | None = None,
) -> SimAttestation:
    """A device key (random, or derived from ``seed`` for a reproducible one) and its certificate signed by
    ``vendor_key`` (``issued_at``: POSIX seconds, default now)."""
    if seed is None:
        device_key = Ed25519PrivateKey.generate()
    else:
        device_key = Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(b"ORES-SIM-DEVICE-KEY-1\0" + seed).digest()
        )
    cert = issue_certificate(
        vendor_key,
        vendor=vendor,
        model=model,
        serial=serial,
        device_key=device_key.public_key(),
        issued_at=issued_at,
    )
    return SimAttestation(device_key, cert)
