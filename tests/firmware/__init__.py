"""Shared helpers for the firmware tests: real Ed25519 vendor keys and signed releases built from documents.

``sign_document`` signs any JSON object (valid or deliberately broken) the way a vendor does, so a test can
produce a correctly signed manifest that must still be refused for what it says.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.manifest import canonical_bytes, encode_signature, key_id
from firmware.verify import VendorKey

CREATED_AT = "2025-06-01T12:00:00Z"


@dataclass(frozen=True, slots=True)
class Vendor:
    """A vendor with a fresh signing key."""

    name: str
    private_key: Ed25519PrivateKey

    @classmethod
    def new(cls, name: str = "Acme Solar") -> Vendor:
        return cls(name, Ed25519PrivateKey.generate())

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    @property
    def trusted(self) -> VendorKey:
        return VendorKey(self.name, self.private_key.public_key())

    def trust(self) -> dict[str, VendorKey]:
        """A trusted-key mapping holding only this vendor's key."""
        return {self.key_id: self.trusted}


def document(signer: Vendor, image: bytes, /, **overrides: Any) -> dict[str, Any]:
    """A valid manifest object for ``image`` signed by ``signer``, with fields replaced by ``overrides``."""
    doc: dict[str, Any] = {
        "format_version": 1,
        "vendor": signer.name,
        "models": ["MI-600"],
        "version": "1.2.0",
        "size": len(image),
        "sha256": hashlib.sha256(image).hexdigest(),
        "min_hub_version": "0.1.0",
        "release_notes": "Faster MPPT tracking.",
        "created_at": CREATED_AT,
        "key_id": signer.key_id,
    }
    doc.update(overrides)
    return doc


def sign_document(doc: dict[str, Any], signer: Vendor) -> tuple[bytes, str]:
    """The manifest file (canonical bytes) and its base64 signature by ``signer``."""
    data = canonical_bytes(doc)
    return data, encode_signature(signer.private_key.sign(data))
