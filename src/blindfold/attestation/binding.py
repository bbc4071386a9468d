"""What the TEE's report data binds (DESIGN.md, "The attested channel", step 2):
`SHA-256(DER SubjectPublicKeyInfo of the server certificate) || nonce-or-32-zero-bytes`.

Kept apart from the verifiers and policies so that anything needing the key hash (TLS
pinning, the server identity, receipts) shares this one definition without importing them.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


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
