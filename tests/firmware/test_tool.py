"""Tests for the ``ores-firmware`` vendor tool: keygen, sign and verify end to end in real subprocesses
(``python -m firmware.tool``), and the failure exit codes with their reasons (mostly through ``main()`` to
keep the suite fast)."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.manifest import canonical_bytes, key_id, parse_manifest, public_key_b64
from firmware.tool import main

IMAGE = bytes(range(256)) * 1000


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "firmware.tool", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def signed(tmp_path: Path) -> dict[str, Path | str]:
    """A key, an image and its signed release, made in-process with the tool's own ``main``."""
    key = Ed25519PrivateKey.generate()
    key_path = tmp_path / "vendor.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    image = tmp_path / "fw.bin"
    image.write_bytes(IMAGE)
    manifest = tmp_path / "fw.manifest.json"
    argv = ["sign", "--key", str(key_path), "--image", str(image), "--vendor", "Acme Solar",
            "--model", "MI-600", "--model", "MI-800", "--version", "1.2.3", "--out", str(manifest)]  # fmt: skip
    assert main(argv) == 0
    return {"image": image, "manifest": manifest, "pubkey": public_key_b64(key.public_key())}


def test_keygen_sign_verify_end_to_end(tmp_path: Path) -> None:
    key_path = tmp_path / "vendor.key"
    keygen = run("keygen", "--out", str(key_path))
    assert keygen.returncode == 0, keygen.stderr
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    public = re.search(r"^public key: (\S+)$", keygen.stdout, re.MULTILINE)
    kid = re.search(r"^key id: ([0-9a-f]{16})$", keygen.stdout, re.MULTILINE)
    assert public and kid
    assert key_id(base64.b64decode(public.group(1))) == kid.group(1)

    image = tmp_path / "fw.bin"
    image.write_bytes(IMAGE)
    signing = run("sign", "--key", str(key_path), "--image", str(image), "--vendor", "Acme Solar",
                  "--model", "MI-600", "--version", "2.0.0-rc.1", "--min-hub", "0.1.0",
                  "--notes", "Better MPPT", "--created-at", "2025-06-01T14:00:00+02:00")  # fmt: skip
    assert signing.returncode == 0, signing.stderr
    manifest_path = tmp_path / "fw.bin.manifest.json"
    sig_path = tmp_path / "fw.bin.manifest.json.sig"
    data = manifest_path.read_bytes()
    assert data == canonical_bytes(json.loads(data))  # the file is the signed bytes themselves
    manifest = parse_manifest(data)
    assert (manifest.key_id, str(manifest.version), manifest.size) == (kid.group(1), "2.0.0-rc.1", len(IMAGE))
    assert manifest.to_wire()["created_at"] == "2025-06-01T12:00:00Z"
    assert len(base64.b64decode(sig_path.read_text())) == 64

    ok = run("verify", "--manifest", str(manifest_path), "--image", str(image), "--pubkey", public.group(1),
             "--model", "MI-600", "--running", "1.9.0", "--vendor", "Acme Solar")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK: Acme Solar 2.0.0-rc.1 for MI-600")

    tampered = bytearray(IMAGE)
    tampered[12345] ^= 0x80
    image.write_bytes(tampered)
    bad = run("verify", "--manifest", str(manifest_path), "--sig", str(sig_path), "--image", str(image),
              "--pubkey", public.group(1))  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.startswith("REJECTED (hash_mismatch): image SHA-256 is ")
    assert bad.stdout == ""


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_path = tmp_path / "vendor.key"
    assert main(["keygen", "--out", str(key_path)]) == 0
    first = key_path.read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(key_path)]) == 1
    assert "exists; use --force" in capsys.readouterr().err
    assert key_path.read_bytes() == first
    assert main(["keygen", "--out", str(key_path), "--force"]) == 0
    assert key_path.read_bytes() != first


def test_encrypted_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FW_PASS", "correct horse")
    key_path = tmp_path / "vendor.key"
    assert main(["keygen", "--out", str(key_path), "--password-env", "FW_PASS"]) == 0
    assert b"ENCRYPTED" in key_path.read_bytes()
    image = tmp_path / "fw.bin"
    image.write_bytes(IMAGE)
    sign = [
        "sign",
        "--key",
        str(key_path),
        "--image",
        str(image),
        "--vendor",
        "V",
        "--model",
        "M",
        "--version",
        "1.0.0",
    ]
    capsys.readouterr()
    assert main(sign) == 1
    assert "error: " in capsys.readouterr().err
    assert main([*sign, "--password-env", "FW_PASS"]) == 0
    monkeypatch.setenv("FW_PASS", "wrong")
    assert main([*sign, "--password-env", "FW_PASS"]) == 1


def verify_args(signed: dict[str, Path | str], *extra: str) -> list[str]:
    return ["verify", "--manifest", str(signed["manifest"]), "--image", str(signed["image"]),
            "--pubkey", str(signed["pubkey"]), *extra]  # fmt: skip


def test_verify_ok(signed: dict[str, Path | str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(verify_args(signed, "--model", "MI-800", "--running", "1.2.2", "--hub-version", "0.1.0")) == 0
    assert "OK: Acme Solar 1.2.3 for MI-600, MI-800" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (
            ("--model", "BAT-5"),
            "REJECTED (wrong_model): image is for model(s) MI-600, MI-800, not for 'BAT-5'",
        ),
        (
            ("--running", "1.3.0"),
            "REJECTED (downgrade): image version 1.2.3 is older than the running version",
        ),
        (("--running", "1.2.3"), "REJECTED (not_newer): image version 1.2.3 is the version already running"),
        (("--hub-version", "0.0.9"), "REJECTED (hub_too_old): image needs hub version 0.1.0 or newer"),
        (("--vendor", "Other"), "REJECTED (vendor_mismatch): manifest vendor 'Acme Solar' is not 'Other'"),
    ],
)
def test_verify_rejections(
    signed: dict[str, Path | str], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], reason: str
) -> None:
    assert main(verify_args(signed, *extra)) == 1
    assert capsys.readouterr().err.startswith(reason)


def test_verify_with_another_vendors_key(
    signed: dict[str, Path | str], capsys: pytest.CaptureFixture[str]
) -> None:
    other = public_key_b64(Ed25519PrivateKey.generate().public_key())
    assert main(verify_args({**signed, "pubkey": other})) == 1
    assert capsys.readouterr().err.startswith("REJECTED (untrusted_key): manifest is signed with key")


def test_verify_tampered_manifest(signed: dict[str, Path | str], capsys: pytest.CaptureFixture[str]) -> None:
    manifest = Path(signed["manifest"])
    manifest.write_bytes(manifest.read_bytes().replace(b'"1.2.3"', b'"9.9.9"'))
    assert main(verify_args(signed)) == 1
    assert capsys.readouterr().err.startswith("REJECTED (bad_signature): signature does not verify")


def test_verify_truncated_image(signed: dict[str, Path | str], capsys: pytest.CaptureFixture[str]) -> None:
    image = Path(signed["image"])
    image.write_bytes(IMAGE[:-10])
    assert main(verify_args(signed)) == 1
    assert capsys.readouterr().err.startswith("REJECTED (size_mismatch): image file is truncated")


def test_tool_errors(
    signed: dict[str, Path | str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(verify_args({**signed, "pubkey": "AAAA"})) == 1
    assert "error: --pubkey: public key must decode to 32 bytes, got 3" in capsys.readouterr().err
    assert main(verify_args({**signed, "image": tmp_path / "nope.bin"})) == 1
    assert "cannot read image file" in capsys.readouterr().err
    assert main(["sign", "--key", str(tmp_path / "nope.key"), "--image", str(signed["image"]),
                 "--vendor", "V", "--model", "M", "--version", "1.0.0"]) == 1  # fmt: skip
    assert "error: cannot read" in capsys.readouterr().err


def test_sign_refuses_an_invalid_version(signed: dict[str, Path | str], tmp_path: Path) -> None:
    key_path = tmp_path / "vendor.key"
    proc = run("sign", "--key", str(key_path), "--image", str(signed["image"]), "--vendor", "V",
               "--model", "M", "--version", "1.2", "--out", str(tmp_path / "x.json"))  # fmt: skip
    assert proc.returncode == 1
    assert "REJECTED (bad_manifest): manifest field 'version'" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["sign", "--image", "x"])
    assert caught.value.code == 2
    assert "required" in capsys.readouterr().err
