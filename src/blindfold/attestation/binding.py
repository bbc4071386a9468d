"""What the TEE's report data binds (DESIGN.md, "The attested channel", step 2):
`SHA-256(DER SubjectPublicKeyInfo of the server certificate) || nonce-or-32-zero-bytes`, or,
for clients that ask, `SHA-256(identity document) || nonce-or-32-zero-bytes`, where the
identity document names that key hash and the server's HPKE key configurations.

Kept apart from the verifiers and policies so that anything needing the key hash (TLS
pinning, the server identity, receipts) shares this one definition without importing them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from blindfold.errors import EvidenceError


def public_key_sha256(public_key: PublicKeyTypes) -> bytes:
    """SHA-256 of a public key's DER SubjectPublicKeyInfo: what the report data binds."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def spki_sha256(certificate_der: bytes) -> bytes:
    """The report-data hash of the key in a DER certificate."""
    return public_key_sha256(x509.load_der_x509_certificate(certificate_der).public_key())


def expected_report_data(certificate_der: bytes, nonce: bytes | None) -> bytes:
    return spki_sha256(certificate_der) + (nonce if nonce is not None else bytes(32))


# --- the identity document (DESIGN.md, "Next step of the channel") ---
#
# A client that asks for it (`GET /v2/attestation?binding=identity`) gets evidence whose report
# data's first half is SHA-256 of this document instead of the bare key hash; the document
# names the same TLS key hash and, besides it, the HPKE key configurations (RFC 9458 section 3)
# that Oblivious HTTP requests may be encrypted to. Without the parameter the server answers
# as before, so clients that check `SHA-256(SPKI)` directly keep working unchanged.

IDENTITY_BINDING = "identity"
IDENTITY_VERSION = 1


def identity_document(spki_hash: bytes, hpke_key_configs: list[bytes]) -> bytes:
    """The canonical bytes: sorted keys, no spaces, lower-case hex; what the report data hashes."""
    return json.dumps(
        {
            "hpke_key_configs": [config.hex() for config in hpke_key_configs],
            "tls_spki_sha256": spki_hash.hex(),
            "version": IDENTITY_VERSION,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True)
class IdentityDocument:
    raw: bytes
    spki_sha256: bytes
    hpke_key_configs: tuple[bytes, ...]

    @classmethod
    def parse(cls, raw: bytes) -> IdentityDocument:
        """Parses a document and refuses any that is not in canonical form, so that one
        identity has exactly one hash."""
        try:
            value = json.loads(raw)
            spki = bytes.fromhex(value["tls_spki_sha256"])
            configs = tuple(bytes.fromhex(item) for item in value["hpke_key_configs"])
            version = value["version"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EvidenceError(
                "the server's identity document is not a Blindfold identity document"
            ) from None
        if version != IDENTITY_VERSION or len(spki) != 32:
            raise EvidenceError(
                f"the server's identity document has version {version!r} or a key hash of "
                f"{len(spki)} bytes; this client reads version {IDENTITY_VERSION}"
            )
        if identity_document(spki, list(configs)) != raw:
            raise EvidenceError("the server's identity document is not in canonical form")
        return cls(raw, spki, configs)

    def sha256(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def identity_report_data(document: bytes, nonce: bytes | None) -> bytes:
    return hashlib.sha256(document).digest() + (nonce if nonce is not None else bytes(32))
