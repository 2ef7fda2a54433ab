"""Tests of the trusted vendor keys: adding, listing, removing, persistence, rotation, and their effect.

Real files in ``tmp_path`` (tinydb through the atomic storage, mode 0600) and real Ed25519 keys.  Rotation is
accepted only with the old key's signature over the rotation statement; after it the old key is gone and its
certificates are refused.  A removed key's certificates are refused from the next verification on, through
the same live ``trusted("device")`` mapping.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tinydb import TinyDB

from devices.attest import (
    DEMO_VENDOR,
    DeviceCertificate,
    TrustedKey,
    UntrustedVendor,
    demo_vendor_key,
    encode_b64,
    issue_certificate,
    key_id,
    sign_challenge,
    verify_attestation,
)
from hub.storage import AtomicJSONStorage
from hub.trust import (
    ROTATION_DOMAIN,
    BadKey,
    BadRotation,
    TrustStorageError,
    TrustStore,
    UnknownKey,
    VendorKey,
    rotation_statement,
    sign_rotation,
)

HUB = "hub-test"
LOGGER_NAME = "hub.trust"


def b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return encode_b64(public.public_bytes_raw())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def file_mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "trust.json"


@pytest.fixture
async def store(path: Path) -> TrustStore:
    return await TrustStore.open(path, clock=Clock())


def attest(
    vendor_key: Ed25519PrivateKey, vendor: str, serial: str = "S-1"
) -> tuple[DeviceCertificate, Ed25519PrivateKey]:
    device = Ed25519PrivateKey.generate()
    cert = issue_certificate(
        vendor_key, vendor=vendor, model="M", serial=serial, device_key=device.public_key()
    )
    return cert, device


def check(cert: DeviceCertificate, device: Ed25519PrivateKey, store: TrustStore) -> DeviceCertificate:
    nonce = os.urandom(32)
    return verify_attestation(
        cert, sign_challenge(device, nonce, HUB), nonce=nonce, hub_id=HUB, trusted=store.trusted("device")
    )


# ----------------------------------------------------------------------------------------- add, list, remove


async def test_add_list_get_remove(store: TrustStore) -> None:
    acme, zeta = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    a = await store.add("Acme Solar", b64(acme), ["device", "firmware"], added_by="installer")
    z = await store.add("Zeta Power", b64(zeta), {"firmware"})
    assert isinstance(a, VendorKey)
    assert a.key_id == key_id(acme.public_key())
    assert a.vendor == "Acme Solar"
    assert a.public_key == acme.public_key()
    assert a.purposes == frozenset({"device", "firmware"})
    assert a.added_by == "installer"
    assert a.replaces is None
    assert a.added_at < z.added_at
    assert store.list() == [a, z]
    assert store.get(a.key_id) == a
    assert store.get("0" * 16) is None
    assert len(store) == 2
    assert dict(store.trusted("device")) == {a.key_id: a}
    assert dict(store.trusted("firmware")) == {a.key_id: a, z.key_id: z}
    assert await store.remove(a.key_id) is True
    assert await store.remove(a.key_id) is False
    assert store.list() == [z]
    assert dict(store.trusted("device")) == {}


async def test_vendor_key_satisfies_trusted_key(store: TrustStore) -> None:
    entry = await store.add("Acme", b64(Ed25519PrivateKey.generate()), ["device"])
    anchor: TrustedKey = entry
    assert anchor.vendor == "Acme"
    assert hash(entry) == hash(entry)  # usable in sets although key objects are not hashable
    assert entry.to_dict()["public_key"] == entry.public_key_b64


async def test_key_formats(store: TrustStore) -> None:
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    pem = keys[0].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    by_pem = await store.add("A", pem, ["device"])
    by_raw = await store.add("A", keys[1].public_key().public_bytes_raw(), ["device"])
    by_object = await store.add("A", keys[2].public_key(), ["device"])
    assert [by_pem.public_key, by_raw.public_key, by_object.public_key] == [k.public_key() for k in keys]


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("not base64!", "neither PEM nor base64"),
        (encode_b64(b"short"), "32 bytes"),
        (encode_b64(bytes(32)), "small order"),
        ("-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----", "not a PEM public key"),
        (
            generate_private_key(SECP256R1())
            .public_key()
            .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            .decode(),
            "not an Ed25519 key",
        ),
    ],
    ids=["garbage", "short", "weak", "bad-pem", "ecdsa"],
)
async def test_bad_keys_are_refused(key: str, reason: str, store: TrustStore) -> None:
    with pytest.raises(BadKey, match=reason):
        await store.add("Acme", key, ["device"])
    assert store.list() == []


async def test_bad_entries_are_refused(store: TrustStore) -> None:
    key = b64(Ed25519PrivateKey.generate())
    for vendor, purposes, reason in (
        ("", ["device"], "vendor"),
        ("Acme\tSolar", ["device"], "printable"),
        ("Acme", [], "at least one"),
        ("Acme", ["device", "root"], "unknown purpose"),
        ("Acme", "device", "expected a list"),
    ):
        with pytest.raises(BadKey, match=reason):
            await store.add(vendor, key, purposes)
    entry = await store.add(" Acme ", key, ["device"])
    assert entry.vendor == "Acme"
    with pytest.raises(BadKey, match="already trusted"):
        await store.add("Acme", key, ["firmware"])
    with pytest.raises(ValueError, match="unknown purpose"):
        store.trusted("root")


async def test_ensure_is_idempotent(store: TrustStore) -> None:
    demo = demo_vendor_key().public_key()
    first = await store.ensure(DEMO_VENDOR, demo, ["device"])
    again = await store.ensure(DEMO_VENDOR, demo, ["device"])
    assert again == first
    assert len(store) == 1
    wider = await store.ensure(DEMO_VENDOR, b64(demo), ["firmware"])
    assert wider.purposes == frozenset({"device", "firmware"})
    assert wider.added_at == first.added_at
    assert store.list() == [wider]
    with pytest.raises(BadKey, match="already trusted for vendor"):
        await store.ensure("Someone Else", demo, ["device"])


# ----------------------------------------------------------------------------------------- persistence


async def test_persists_across_reopen_with_mode_0600(path: Path) -> None:
    store = TrustStore(path)
    key = Ed25519PrivateKey.generate()
    entry = await store.add("Acme", b64(key), ["device"], added_by="tok-1")
    gone = await store.add("Gone", b64(Ed25519PrivateKey.generate()), ["firmware"])
    await store.remove(gone.key_id)
    await store.close()
    assert file_mode(path) == 0o600
    assert [d["key_id"] for d in read_json(path)["vendor_keys"].values()] == [entry.key_id]

    reopened = TrustStore(path)
    assert reopened.list() == [entry]
    assert reopened.trusted("device")[entry.key_id] == entry
    await reopened.close()


async def test_loose_file_mode_is_tightened(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = TrustStore(path)
    await store.add("Acme", b64(Ed25519PrivateKey.generate()), ["device"])
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        TrustStore(path)
    assert file_mode(path) == 0o600
    assert "had mode 644" in caplog.text


def test_corrupt_file_and_malformed_entries(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(TrustStorageError, match="cannot read trust file"):
        TrustStore(path)

    good = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate()
    docs = {
        "1": {"key_id": key_id(good.public_key()), "vendor": "Acme", "public_key": b64(good),
              "purposes": ["device"], "added_at": 1.0},
        "2": {"key_id": "garbage"},
        "3": {"key_id": key_id(good.public_key()), "vendor": "Mallory", "public_key": b64(other),
              "purposes": ["device"], "added_at": 2.0},
    }  # fmt: skip
    path.write_text(json.dumps({"vendor_keys": docs}))
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        store = TrustStore(path)
    assert [k.vendor for k in store.list()] == ["Acme"]  # malformed entries are simply not trusted
    assert "skipping entry 2" in caplog.text
    assert "skipping entry 3" in caplog.text  # its key id is not its key's


# ----------------------------------------------------------------------------------------- rotation


def test_rotation_statement_layout() -> None:
    new = Ed25519PrivateKey.generate().public_key()
    statement = rotation_statement("0123456789abcdef", new)
    assert statement == b"ORES-KEY-ROTATE-1\0" + b"0123456789abcdef\0" + new.public_bytes_raw()
    assert statement.startswith(ROTATION_DOMAIN)


async def test_rotation_with_the_old_keys_signature(store: TrustStore, path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    old_entry = await store.add("Acme", b64(old), ["device", "firmware"])
    old_cert, old_device = attest(old, "Acme")
    assert check(old_cert, old_device, store) == old_cert

    signature = sign_rotation(old, new.public_key())
    rotated = await store.rotate(old_entry.key_id, b64(new), encode_b64(signature), added_by="vendor-portal")
    assert rotated.key_id == key_id(new.public_key())
    assert rotated.vendor == "Acme"
    assert rotated.purposes == frozenset({"device", "firmware"})
    assert rotated.replaces == old_entry.key_id
    assert rotated.added_by == "vendor-portal"
    assert store.get(old_entry.key_id) is None
    assert store.list() == [rotated]

    with pytest.raises(UntrustedVendor, match="does not trust"):
        check(old_cert, old_device, store)  # the old key's certificates are refused from now on
    new_cert, new_device = attest(new, "Acme")
    assert check(new_cert, new_device, store) == new_cert

    assert TrustStore(path).list() == [rotated]  # and it is on disk


async def test_rotation_refused_with_any_other_signature(
    store: TrustStore, caplog: pytest.LogCaptureFixture
) -> None:
    old, new, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    entry = await store.add("Acme", b64(old), ["device"])
    unrelated = await store.add("Other", b64(stranger), ["device"])
    forgeries = {
        "signed by the new key": new.sign(rotation_statement(entry.key_id, new.public_key())),
        "signed by another trusted key": stranger.sign(rotation_statement(entry.key_id, new.public_key())),
        "old key, without the domain": old.sign(
            entry.key_id.encode() + b"\0" + new.public_key().public_bytes_raw()
        ),
        "old key, for another new key": sign_rotation(old, Ed25519PrivateKey.generate().public_key()),
        "old key, another old id": old.sign(rotation_statement(unrelated.key_id, new.public_key())),
        "garbage": bytes(64),
    }
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        for name, signature in forgeries.items():
            with pytest.raises(BadRotation, match=r"not key .* over the rotation statement"):
                await store.rotate(entry.key_id, new.public_key(), signature)
            assert store.get(entry.key_id) == entry, name
            assert store.get(key_id(new.public_key())) is None, name
    assert "rotation of vendor key" in caplog.text
    with pytest.raises(BadRotation, match="not base64"):
        await store.rotate(entry.key_id, new.public_key(), "@@@")
    with pytest.raises(UnknownKey):
        await store.rotate("0" * 16, new.public_key(), sign_rotation(old, new.public_key()))
    with pytest.raises(BadRotation, match="is the old key"):
        await store.rotate(entry.key_id, old.public_key(), sign_rotation(old, old.public_key()))
    with pytest.raises(BadRotation, match="already trusted"):
        await store.rotate(entry.key_id, stranger.public_key(), sign_rotation(old, stranger.public_key()))
    assert len(store) == 2


async def test_interrupted_rotation_is_completed_on_load(path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    store = TrustStore(path)
    entry = await store.add("Acme", b64(old), ["device"])
    await store.close()
    # what a crash between "insert the new key" and "remove the old one" leaves behind
    db = TinyDB(path, storage=AtomicJSONStorage)
    db.table("vendor_keys").insert(
        {
            "key_id": key_id(new.public_key()),
            "vendor": "Acme",
            "public_key": b64(new),
            "purposes": ["device"],
            "added_at": entry.added_at + 5,
            "added_by": None,
            "replaces": entry.key_id,
        }
    )
    db.close()
    reopened = TrustStore(path)
    assert [k.key_id for k in reopened.list()] == [key_id(new.public_key())]
    assert [k.key_id for k in TrustStore(path).list()] == [key_id(new.public_key())]


# ----------------------------------------------------------------------------------------- effect on verification


async def test_removed_key_certificates_are_refused(
    store: TrustStore, caplog: pytest.LogCaptureFixture
) -> None:
    vendor = Ed25519PrivateKey.generate()
    entry = await store.add("Acme", b64(vendor), ["device"])
    cert, device = attest(vendor, "Acme")
    trusted = store.trusted("device")  # held across the removal: it is a live view
    nonce = os.urandom(32)
    signature = sign_challenge(device, nonce, HUB)
    assert verify_attestation(cert, signature, nonce=nonce, hub_id=HUB, trusted=trusted) == cert
    await store.remove(entry.key_id)
    with caplog.at_level(logging.WARNING, logger="devices.attest"), pytest.raises(UntrustedVendor):
        verify_attestation(cert, signature, nonce=nonce, hub_id=HUB, trusted=trusted)
    assert "does not trust" in caplog.text


async def test_firmware_only_key_does_not_vouch_for_devices(store: TrustStore) -> None:
    vendor = Ed25519PrivateKey.generate()
    await store.add("Acme", b64(vendor), ["firmware"])
    cert, device = attest(vendor, "Acme")
    with pytest.raises(UntrustedVendor):
        check(cert, device, store)


async def test_key_of_another_vendor_does_not_vouch(store: TrustStore) -> None:
    vendor = Ed25519PrivateKey.generate()
    await store.add("Acme", b64(vendor), ["device"])
    cert, device = attest(vendor, "Mallory Inc")  # the key is trusted, but for Acme only
    with pytest.raises(UntrustedVendor, match="belongs to 'Acme'"):
        check(cert, device, store)
