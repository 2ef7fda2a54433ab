"""``ores-firmware``: the vendor's tool to create a signing key, sign a firmware image and check a release.

``keygen`` writes a new Ed25519 private key (PKCS#8 PEM, mode 0600, optionally encrypted with a passphrase
from an environment variable) and prints the public key and key id to hand to installers.  ``sign`` hashes an
image, writes its manifest (the canonical bytes themselves) and the detached signature next to it
(``<manifest>.sig``, base64).  ``verify`` checks a release exactly as the hub does and prints the precise
reason when it fails.  Exit status: 0 success, 1 failure or rejection, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.manifest import (
    FirmwareError,
    Manifest,
    encode_signature,
    key_id,
    load_document,
    public_key_b64,
    public_key_from_b64,
    sign_manifest,
)
from firmware.verify import (
    DEFAULT_CHUNK_BYTES,
    VendorKey,
    check_compatible,
    verify_file,
    verify_signed,
)

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1


class ToolError(Exception):
    """A failure of the tool itself (unreadable file, bad key); printed as ``error: ...``, exit 1."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "sign":
            return _sign(args)
        return _verify(args)
    except ToolError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except FirmwareError as err:
        print(f"REJECTED ({err.code}): {err.message}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ores-firmware", description="sign and verify ORES firmware releases")
    sub = p.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="create a vendor signing key")
    keygen.add_argument("--out", type=Path, required=True, help="private key file to create (PEM, 0600)")
    keygen.add_argument("--force", action="store_true", help="replace an existing file")
    keygen.add_argument(
        "--demo-vendor",
        metavar="VENDOR",
        help="write the PUBLIC, INSECURE demo key of this simulated vendor instead of a new key (for the "
        "demo only: `ores-hub --demo` trusts it; never use it for real firmware)",
    )
    keygen.add_argument(
        "--password-env",
        metavar="VAR",
        help="encrypt the key with the passphrase in this environment variable",
    )

    sign = sub.add_parser("sign", help="write the manifest and signature of an image")
    sign.add_argument("--key", type=Path, required=True, help="vendor private key (PEM)")
    sign.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the key's passphrase"
    )
    sign.add_argument("--image", type=Path, required=True)
    sign.add_argument("--vendor", required=True)
    sign.add_argument("--model", action="append", required=True, help="a compatible model (repeatable)")
    sign.add_argument("--version", required=True, help="semantic version of the image, e.g. 1.2.3")
    sign.add_argument("--min-hub", default="0.1.0", help="minimum hub version (default 0.1.0)")
    sign.add_argument("--notes", default="", help="release notes")
    sign.add_argument(
        "--created-at", help="creation time, ISO 8601 with an offset (default: now); written in UTC"
    )
    sign.add_argument(
        "--out", type=Path, help="manifest file (default: IMAGE.manifest.json); signature: OUT.sig"
    )

    verify = sub.add_parser("verify", help="check a release as the hub does")
    verify.add_argument("--manifest", type=Path, required=True)
    verify.add_argument("--sig", type=Path, help="signature file (default: MANIFEST.sig)")
    verify.add_argument("--image", type=Path, required=True)
    verify.add_argument("--pubkey", required=True, help="the vendor's public key, base64")
    verify.add_argument("--vendor", help="vendor the key is trusted for (default: the manifest's vendor)")
    verify.add_argument("--model", help="target model (default: not checked)")
    verify.add_argument("--running", help="version the module runs now (anti-rollback; default: not checked)")
    verify.add_argument("--hub-version", help="hub version to check min_hub_version against")
    return p


def _keygen(args: argparse.Namespace) -> int:
    if args.demo_vendor:
        from devices.attest import demo_vendor_key

        key = demo_vendor_key(args.demo_vendor)
        print(
            f"WARNING: the demo key of {args.demo_vendor!r} is public; anyone can sign with it",
            file=sys.stderr,
        )
    else:
        key = Ed25519PrivateKey.generate()
    password = _password(args.password_env)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.out, flags, 0o600)
    except FileExistsError as err:
        raise ToolError(f"{args.out} exists; use --force to replace it") from err
    except OSError as err:
        raise ToolError(f"cannot create {args.out}: {err.strerror}") from err
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(pem)
    public = key.public_key()
    print(f"private key: {args.out} (keep it secret)")
    print(f"public key: {public_key_b64(public)}")
    print(f"key id: {key_id(public)}")
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    key = _load_key(args.key, _password(args.password_env))
    size, digest = _hash_file(args.image)
    created_at = _created_at(args.created_at)
    manifest = Manifest.create(
        vendor=args.vendor,
        models=args.model,
        version=args.version,
        size=size,
        sha256=digest,
        key_id=key_id(key.public_key()),
        min_hub_version=args.min_hub,
        release_notes=args.notes,
        created_at=created_at,
    )
    signature = sign_manifest(manifest, key)
    manifest_bytes = manifest.canonical_bytes()
    # Check our own output the way the hub will before handing it out.
    verify_signed(manifest_bytes, signature, {manifest.key_id: VendorKey(args.vendor, key.public_key())})
    out: Path = args.out or args.image.with_name(args.image.name + ".manifest.json")
    sig_path = out.with_name(out.name + ".sig")
    _write(out, manifest_bytes)
    _write(sig_path, (encode_signature(signature) + "\n").encode("ascii"))
    print(f"manifest: {out}")
    print(f"signature: {sig_path}")
    print(
        f"{manifest.vendor} {manifest.version} for {', '.join(manifest.models)}: {size} bytes, sha256 {digest}"
    )
    print(f"key id: {manifest.key_id}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    try:
        public_key = public_key_from_b64(args.pubkey)
    except ValueError as err:
        raise ToolError(f"--pubkey: {err}") from err
    manifest_bytes = _read(args.manifest)
    sig_path: Path = args.sig or args.manifest.with_name(args.manifest.name + ".sig")
    signature = _read(sig_path)
    vendor = args.vendor
    if vendor is None:  # the key is trusted for whatever vendor the manifest names
        vendor = _manifest_vendor(manifest_bytes)
    manifest = verify_signed(manifest_bytes, signature, {key_id(public_key): VendorKey(vendor, public_key)})
    check_compatible(manifest, model=args.model, running_version=args.running, hub_version=args.hub_version)
    asyncio.run(verify_file(args.image, manifest))
    print(
        f"OK: {manifest.vendor} {manifest.version} for {', '.join(manifest.models)}, {manifest.size} bytes, "
        f"signed by key {manifest.key_id}"
    )
    return EXIT_OK


def _manifest_vendor(manifest_bytes: bytes) -> str:
    vendor = load_document(manifest_bytes).get("vendor")
    return vendor if isinstance(vendor, str) else ""


def _password(variable: str | None) -> bytes | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ToolError(f"environment variable {variable} is not set or empty")
    return value.encode("utf-8")


def _load_key(path: Path, password: bytes | None) -> Ed25519PrivateKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as err:  # encrypted without a password, or a password for a plain key
        raise ToolError(f"{path}: {err}") from err
    except ValueError as err:
        raise ToolError(f"{path} is not a PEM private key (or the passphrase is wrong)") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ToolError(f"{path} is not an Ed25519 key")
    return key


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as file:
            while chunk := file.read(DEFAULT_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
    except OSError as err:
        raise ToolError(f"cannot read {path}: {err.strerror}") from err
    return size, digest.hexdigest()


def _created_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise ToolError(f"--created-at {text!r} is not ISO 8601") from err
    if moment.tzinfo is None:
        raise ToolError(f"--created-at {text!r} has no UTC offset")
    return moment


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ToolError(f"cannot read {path}: {err.strerror}") from err


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as err:
        raise ToolError(f"cannot write {path}: {err.strerror}") from err


if __name__ == "__main__":
    sys.exit(main())
