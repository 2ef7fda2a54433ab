"""Tests of device attestation: certificates, the challenge, verification and the nonce book.

Real Ed25519 keys and signatures throughout.  Each attack the issue names is its own test and must be refused
with its precise exception and a logged reason: a module signing with a key other than its certificate's, a
certificate from an untrusted vendor, a replayed answer, a serial that does not match the certificate, a
certificate changed after signing, and malformed certificates (hypothesis: arbitrary JSON only ever raises
``BadCertificate``).  The worked example of docs/module-protocol.md §6.7 is recomputed here so the document
stays true.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.attest import (
    DEMO_VENDOR,
    DEMO_VENDOR_PHRASE,
    AttestationError,
    BadCertificate,
    BadSignature,
    ChallengeBook,
    DeviceCertificate,
    IdentityMismatch,
    ReplayedNonce,
    TrustAnchor,
    UntrustedVendor,
    challenge_message,
    demo_vendor_key,
    encode_b64,
    issue_certificate,
    key_id,
    make_sim_attestation,
    public_key_from_raw,
    sign_challenge,
    verify_attestation,
)
from devices.errors import AuthenticationFailed

LOGGER_NAME = "devices.attest"
HUB = "hub-test"
VENDOR = "Acme Solar"
SERIAL = "MI-0001"
DOC = Path(__file__).resolve().parents[2] / "docs" / "module-protocol.md"

#: Every small-order point of edwards25519, in both sign encodings where they differ.  Computed by
#: multiplying random curve points by the group order L; a signature (R = identity, S = 0) verifies under
#: the identity key for every message.
SMALL_ORDER_KEYS = [
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
]


@pytest.fixture(scope="module")
def vendor_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def device_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def cert(vendor_key: Ed25519PrivateKey, device_key: Ed25519PrivateKey) -> DeviceCertificate:
    return issue_certificate(
        vendor_key, vendor=VENDOR, model="MI-400", serial=SERIAL, device_key=device_key.public_key()
    )


@pytest.fixture(scope="module")
def trusted(vendor_key: Ed25519PrivateKey) -> dict[str, TrustAnchor]:
    return {key_id(vendor_key.public_key()): TrustAnchor(VENDOR, vendor_key.public_key())}


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    return caplog


def warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        r.getMessage() for r in caplog.records if r.name == LOGGER_NAME and r.levelno >= logging.WARNING
    )


def nonce() -> bytes:
    return ChallengeBook().issue()


# ----------------------------------------------------------------------------------------- formats


def test_key_id_is_sha256_prefix(vendor_key: Ed25519PrivateKey) -> None:
    public = vendor_key.public_key()
    assert key_id(public) == hashlib.sha256(public.public_bytes_raw()).hexdigest()[:16]
    assert len(key_id(public)) == 16


def test_certificate_wire_round_trip(cert: DeviceCertificate, device_key: Ed25519PrivateKey) -> None:
    wire = cert.to_wire()
    assert set(wire) == {"vendor", "model", "serial", "device_key", "vendor_key_id", "issued_at", "signature"}
    assert all(isinstance(v, str) for v in wire.values())
    assert base64.b64decode(wire["device_key"]) == device_key.public_key().public_bytes_raw()
    assert DeviceCertificate.from_wire(json.loads(json.dumps(wire))) == cert
    assert DeviceCertificate.from_wire({**wire, "future": [1, 2]}) == cert  # unknown members ignored


def test_signed_bytes_are_domain_separated_canonical_json(cert: DeviceCertificate) -> None:
    signed = cert.signed_bytes()
    prefix = b"ORES-CERT-1\0"
    assert signed.startswith(prefix)
    body = json.loads(signed[len(prefix) :])
    assert body == {**{k: v for k, v in cert.to_wire().items() if k != "signature"}, "v": 1}
    assert signed[len(prefix) :] == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def test_canonical_json_escapes_only_quote_and_backslash(vendor_key: Ed25519PrivateKey) -> None:
    odd = issue_certificate(
        vendor_key,
        vendor='Ünïcode "Quoted" \\ Solar',
        model="→",
        serial="S-1",
        device_key=Ed25519PrivateKey.generate().public_key(),
        issued_at=0.0,
    )
    signed = odd.signed_bytes()
    assert '"vendor":"Ünïcode \\"Quoted\\" \\\\ Solar"'.encode() in signed
    assert '"model":"→"'.encode() in signed
    assert b'"issued_at":"1970-01-01T00:00:00Z"' in signed


def test_challenge_message_layout() -> None:
    n = bytes(range(32))
    assert challenge_message(n, "hub-1") == b"ORES-AUTH-1\0hub-1\0" + n
    for bad_nonce in (b"", bytes(15), bytes(65)):
        with pytest.raises(ValueError, match="nonce"):
            challenge_message(bad_nonce, "hub-1")
    for bad_hub in ("", "a\0b", "x" * 129, "line\nbreak"):
        with pytest.raises(ValueError, match="hub_id"):
            challenge_message(n, bad_hub)


def test_worked_example_of_the_protocol_document() -> None:
    """docs/module-protocol.md §6.7 lists values a module maker can check against; they must be right."""
    text = DOC.read_text(encoding="utf-8")
    vendor = demo_vendor_key()
    device = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    example = issue_certificate(
        vendor,
        vendor=DEMO_VENDOR,
        model="Sim-MI-400",
        serial="DEMO-0001",
        device_key=device.public_key(),
        issued_at=1748779200.0,  # 2025-06-01T12:00:00Z
    )
    n = bytes(range(0x10, 0x30))
    expected = [
        hashlib.sha256(DEMO_VENDOR_PHRASE).hexdigest(),
        encode_b64(vendor.public_key().public_bytes_raw()),
        key_id(vendor.public_key()),
        encode_b64(device.public_key().public_bytes_raw()),
        example.signed_bytes().replace(b"\0", b"\\0").decode(),
        encode_b64(example.signature),
        encode_b64(n),
        challenge_message(n, "hub-7f3a").hex(),
        encode_b64(sign_challenge(device, n, "hub-7f3a")),
    ]
    for value in expected:
        assert value in text, f"{value} is missing from the worked example"


def test_demo_vendor_key_is_deterministic_and_flagged_public() -> None:
    first, second = demo_vendor_key(), demo_vendor_key()
    assert first.private_bytes_raw() == second.private_bytes_raw()
    assert first.private_bytes_raw() == hashlib.sha256(DEMO_VENDOR_PHRASE).digest()
    assert b"PUBLIC" in DEMO_VENDOR_PHRASE
    assert demo_vendor_key.__doc__ is not None
    assert "PUBLIC AND INSECURE" in demo_vendor_key.__doc__


def test_sim_attestation_from_seed_is_reproducible(vendor_key: Ed25519PrivateKey) -> None:
    a = make_sim_attestation(vendor_key, vendor=VENDOR, model="M", serial="S", seed=b"one", issued_at=0.0)
    b = make_sim_attestation(vendor_key, vendor=VENDOR, model="M", serial="S", seed=b"one", issued_at=0.0)
    c = make_sim_attestation(vendor_key, vendor=VENDOR, model="M", serial="S", seed=b"two", issued_at=0.0)
    assert a.certificate == b.certificate
    assert a.certificate.device_key != c.certificate.device_key
    n = nonce()
    cert, signature = a.respond(n, HUB)
    trusted = {key_id(vendor_key.public_key()): TrustAnchor(VENDOR, vendor_key.public_key())}
    assert verify_attestation(cert, signature, nonce=n, hub_id=HUB, trusted=trusted) == a.certificate


def test_issue_refuses_malformed_fields(vendor_key: Ed25519PrivateKey) -> None:
    device = Ed25519PrivateKey.generate().public_key()
    for changes in ({"vendor": ""}, {"serial": " padded"}, {"model": "tab\there"}, {"vendor": "x" * 129}):
        fields: dict[str, Any] = {"vendor": VENDOR, "model": "M", "serial": SERIAL, **changes}
        with pytest.raises(BadCertificate, match="malformed certificate"):
            issue_certificate(vendor_key, device_key=device, **fields)


# ----------------------------------------------------------------------------------------- verification


def test_genuine_answer_is_accepted(
    cert: DeviceCertificate, device_key: Ed25519PrivateKey, trusted: dict[str, TrustAnchor]
) -> None:
    book = ChallengeBook()
    n = book.issue()
    signature = sign_challenge(device_key, n, HUB)
    book.consume(n)
    got = verify_attestation(cert, signature, nonce=n, hub_id=HUB, trusted=trusted, claimed=(VENDOR, SERIAL))
    assert got is cert


def test_errors_are_authentication_failures() -> None:
    for cls in (BadCertificate, UntrustedVendor, BadSignature, IdentityMismatch, ReplayedNonce):
        assert issubclass(cls, AttestationError)
        assert issubclass(cls, AuthenticationFailed)


def test_attack_module_signs_with_the_wrong_key(
    cert: DeviceCertificate, trusted: dict[str, TrustAnchor], log: pytest.LogCaptureFixture
) -> None:
    """Someone holding a copy of a genuine certificate but not its device key cannot answer."""
    n = nonce()
    forged = sign_challenge(Ed25519PrivateKey.generate(), n, HUB)
    with pytest.raises(BadSignature, match="does not verify with the certified device key"):
        verify_attestation(cert, forged, nonce=n, hub_id=HUB, trusted=trusted)
    assert "BadSignature" in warnings(log)
    assert "does not verify with the certified device key" in warnings(log)


def test_attack_signature_of_wrong_length(cert: DeviceCertificate, trusted: dict[str, TrustAnchor]) -> None:
    with pytest.raises(BadSignature, match="64 bytes"):
        verify_attestation(cert, b"\x00" * 63, nonce=nonce(), hub_id=HUB, trusted=trusted)


def test_attack_certificate_from_untrusted_vendor(
    device_key: Ed25519PrivateKey, trusted: dict[str, TrustAnchor], log: pytest.LogCaptureFixture
) -> None:
    rogue_vendor = Ed25519PrivateKey.generate()
    rogue = issue_certificate(
        rogue_vendor, vendor=VENDOR, model="MI-400", serial=SERIAL, device_key=device_key.public_key()
    )
    n = nonce()
    signature = sign_challenge(device_key, n, HUB)
    with pytest.raises(
        UntrustedVendor, match=f"vendor key {key_id(rogue_vendor.public_key())}.*does not trust"
    ):
        verify_attestation(rogue, signature, nonce=n, hub_id=HUB, trusted=trusted)
    assert "UntrustedVendor" in warnings(log)


def test_attack_trusted_key_of_another_vendor(device_key: Ed25519PrivateKey) -> None:
    """A key trusted for vendor B must not vouch for modules of vendor A."""
    other = Ed25519PrivateKey.generate()
    trusted = {key_id(other.public_key()): TrustAnchor("Other Vendor", other.public_key())}
    cert = issue_certificate(
        other, vendor=VENDOR, model="M", serial=SERIAL, device_key=device_key.public_key()
    )
    n = nonce()
    with pytest.raises(UntrustedVendor, match="belongs to 'Other Vendor'"):
        verify_attestation(cert, sign_challenge(device_key, n, HUB), nonce=n, hub_id=HUB, trusted=trusted)


def test_attack_certificate_claims_a_trusted_key_it_was_not_signed_with(
    vendor_key: Ed25519PrivateKey, device_key: Ed25519PrivateKey, trusted: dict[str, TrustAnchor]
) -> None:
    rogue = issue_certificate(
        Ed25519PrivateKey.generate(),
        vendor=VENDOR,
        model="M",
        serial=SERIAL,
        device_key=device_key.public_key(),
    )
    forged = dataclasses.replace(rogue, vendor_key_id=key_id(vendor_key.public_key()))
    n = nonce()
    with pytest.raises(BadCertificate, match="certificate signature does not verify with vendor key"):
        verify_attestation(forged, sign_challenge(device_key, n, HUB), nonce=n, hub_id=HUB, trusted=trusted)


@pytest.mark.parametrize(
    "changes",
    [{"serial": "MI-9999"}, {"model": "MI-800"}, {"issued_at": "2030-01-01T00:00:00Z"}],
    ids=["serial", "model", "issued_at"],
)
def test_attack_certificate_tampered_after_signing(
    changes: dict[str, Any],
    cert: DeviceCertificate,
    device_key: Ed25519PrivateKey,
    trusted: dict[str, TrustAnchor],
    log: pytest.LogCaptureFixture,
) -> None:
    tampered = dataclasses.replace(cert, **changes)
    n = nonce()
    signature = sign_challenge(device_key, n, HUB)
    assert verify_attestation(cert, signature, nonce=n, hub_id=HUB, trusted=trusted) == cert
    with pytest.raises(BadCertificate, match="certificate signature does not verify"):
        verify_attestation(tampered, signature, nonce=n, hub_id=HUB, trusted=trusted)
    assert "BadCertificate" in warnings(log)


def test_attack_device_key_swapped_in_a_genuine_certificate(
    cert: DeviceCertificate, trusted: dict[str, TrustAnchor]
) -> None:
    """The attacker's own key in a genuine certificate: it can sign, but the vendor signature breaks."""
    attacker = Ed25519PrivateKey.generate()
    swapped = dataclasses.replace(cert, device_key=attacker.public_key().public_bytes_raw())
    n = nonce()
    with pytest.raises(BadCertificate, match="certificate signature does not verify"):
        verify_attestation(swapped, sign_challenge(attacker, n, HUB), nonce=n, hub_id=HUB, trusted=trusted)


def test_attack_serial_does_not_match_the_certificate(
    cert: DeviceCertificate,
    device_key: Ed25519PrivateKey,
    trusted: dict[str, TrustAnchor],
    log: pytest.LogCaptureFixture,
) -> None:
    n = nonce()
    signature = sign_challenge(device_key, n, HUB)
    with pytest.raises(IdentityMismatch, match=r"announced 'Acme Solar'/'MI-0002'.*'Acme Solar'/'MI-0001'"):
        verify_attestation(cert, signature, nonce=n, hub_id=HUB, trusted=trusted, claimed=(VENDOR, "MI-0002"))
    with pytest.raises(IdentityMismatch):
        verify_attestation(cert, signature, nonce=n, hub_id=HUB, trusted=trusted, claimed=("Acme", SERIAL))
    assert "IdentityMismatch" in warnings(log)


def test_attack_replayed_answer_for_another_nonce(
    cert: DeviceCertificate, device_key: Ed25519PrivateKey, trusted: dict[str, TrustAnchor]
) -> None:
    """An answer recorded for one challenge does not answer the next one (nor another hub's)."""
    book = ChallengeBook()
    first, second = book.issue(), book.issue()
    recorded = sign_challenge(device_key, first, HUB)
    verify_attestation(cert, recorded, nonce=first, hub_id=HUB, trusted=trusted)
    with pytest.raises(BadSignature):
        verify_attestation(cert, recorded, nonce=second, hub_id=HUB, trusted=trusted)
    with pytest.raises(BadSignature):
        verify_attestation(cert, recorded, nonce=first, hub_id="another-hub", trusted=trusted)


def test_attack_same_nonce_consumed_twice(log: pytest.LogCaptureFixture) -> None:
    book = ChallengeBook()
    n = book.issue()
    book.consume(n)
    with pytest.raises(ReplayedNonce, match="already used"):
        book.consume(n)
    with pytest.raises(ReplayedNonce, match="not issued by this hub"):
        book.consume(bytes(32))
    assert "already used" in warnings(log)


def test_weak_device_keys_are_refused(vendor_key: Ed25519PrivateKey, trusted: dict[str, TrustAnchor]) -> None:
    identity = bytes.fromhex("01" + "00" * 31)
    universal = identity + bytes(32)  # R = identity, S = 0
    for raw in SMALL_ORDER_KEYS:
        with pytest.raises(ValueError, match="small order"):
            public_key_from_raw(raw)
    with pytest.raises(ValueError, match="canonical"):
        public_key_from_raw(b"\xff" * 32)
    # even a certificate a careless vendor signed for the identity key does not let anyone in
    unsigned = dataclasses.replace(
        issue_certificate(
            vendor_key,
            vendor=VENDOR,
            model="M",
            serial=SERIAL,
            device_key=Ed25519PrivateKey.generate().public_key(),
        ),
        device_key=identity,
    )
    careless = dataclasses.replace(unsigned, signature=vendor_key.sign(unsigned.signed_bytes()))
    with pytest.raises(BadCertificate, match="small order"):
        DeviceCertificate.from_wire(careless.to_wire())
    n = nonce()
    with pytest.raises(BadCertificate, match="small order"):
        verify_attestation(careless, universal, nonce=n, hub_id=HUB, trusted=trusted)


def test_checks_run_in_the_documented_order(
    cert: DeviceCertificate, device_key: Ed25519PrivateKey, trusted: dict[str, TrustAnchor]
) -> None:
    n = nonce()
    bad_sig = bytes(64)
    malformed_and_untrusted = dataclasses.replace(cert, serial="", vendor_key_id="0" * 16)
    with pytest.raises(BadCertificate, match="malformed"):
        verify_attestation(malformed_and_untrusted, bad_sig, nonce=n, hub_id=HUB, trusted=trusted)
    untrusted_and_tampered = dataclasses.replace(cert, vendor_key_id="0" * 16)
    with pytest.raises(UntrustedVendor):
        verify_attestation(untrusted_and_tampered, bad_sig, nonce=n, hub_id=HUB, trusted=trusted)
    tampered_and_bad_sig = dataclasses.replace(cert, model="other")
    with pytest.raises(BadCertificate):
        verify_attestation(tampered_and_bad_sig, bad_sig, nonce=n, hub_id=HUB, trusted=trusted)
    with pytest.raises(BadSignature):
        verify_attestation(cert, bad_sig, nonce=n, hub_id=HUB, trusted=trusted, claimed=("x", "y"))


# ----------------------------------------------------------------------------------------- challenge book


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nonces_are_fresh_and_single_use() -> None:
    book = ChallengeBook()
    nonces = {book.issue() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == 32 for n in nonces)
    assert len(book) == 100
    for n in nonces:
        book.consume(n)
    assert len(book) == 0


def test_nonce_expires(log: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    book = ChallengeBook(ttl_s=30, clock=clock)
    fresh, stale = book.issue(), book.issue()
    clock.now += 29.9
    book.consume(fresh)
    clock.now += 0.1
    with pytest.raises(ReplayedNonce, match="expired"):
        book.consume(stale)
    with pytest.raises(ReplayedNonce):  # and it stays unusable
        book.consume(stale)
    assert "nonce expired" in warnings(log)


def test_a_flood_of_challenges_stays_bounded() -> None:
    book = ChallengeBook(max_pending=64)
    first = book.issue()
    flood = [book.issue() for _ in range(5000)]
    assert len(book) == 64
    assert book.dropped == 5000 + 1 - 64
    with pytest.raises(ReplayedNonce, match="not issued by this hub"):
        book.consume(first)  # the oldest were dropped
    for n in flood[-64:]:
        book.consume(n)  # the newest still work
    for _ in range(5000):
        book.consume(book.issue())
    assert len(book._used) <= 64  # the record of used nonces is bounded too


# ----------------------------------------------------------------------------------------- fuzzing

_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
_json = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=15,
)
_FIELDS = ("vendor", "model", "serial", "device_key", "vendor_key_id", "issued_at", "signature")
_field_values = st.one_of(
    _json,
    st.binary(max_size=70).map(encode_b64),
    st.text(alphabet="0123456789abcdef", min_size=15, max_size=17),
    st.sampled_from(["2025-02-30T00:00:00Z", "2025-06-01T12:00:00+00:00", "", " x", "A" * 129]),
)


@settings(max_examples=300, deadline=None)
@given(obj=_json | st.dictionaries(st.sampled_from(_FIELDS), _field_values, max_size=7))
def test_from_wire_of_arbitrary_json_only_raises_bad_certificate(obj: object) -> None:
    try:
        cert = DeviceCertificate.from_wire(obj)
    except BadCertificate:
        return
    assert cert.to_wire() == {k: obj[k] for k in _FIELDS}  # type: ignore[index]


_GENUINE_VENDOR = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz vendor").digest())
_GENUINE_DEVICE = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz device").digest())
_GENUINE = issue_certificate(
    _GENUINE_VENDOR,
    vendor=VENDOR,
    model="M",
    serial=SERIAL,
    device_key=_GENUINE_DEVICE.public_key(),
    issued_at=0,
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(_FIELDS), value=_field_values)
def test_any_change_to_a_genuine_certificate_is_refused(field: str, value: object) -> None:
    wire: dict[str, object] = dict(_GENUINE.to_wire())
    changed = wire[field] != value
    wire[field] = value
    trusted = {key_id(_GENUINE_VENDOR.public_key()): TrustAnchor(VENDOR, _GENUINE_VENDOR.public_key())}
    n = bytes(32)
    signature = sign_challenge(_GENUINE_DEVICE, n, HUB)
    try:
        cert = DeviceCertificate.from_wire(wire)
        verify_attestation(cert, signature, nonce=n, hub_id=HUB, trusted=trusted)
    except AttestationError:
        assert changed
        return
    assert not changed
