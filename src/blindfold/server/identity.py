"""The server's attested identity: a fresh TLS key pair and certificate made at each start,
and evidence binding the certificate's public key (DESIGN.md, "The attested channel").

The private key only ever lives in process memory: it is handed to the TLS stack through an
anonymous memory file (memfd), never written to disk.

The standing (nonce-less) evidence, which receipts name by hash, is made again before its
collateral or certificate expires, so clients keep accepting it and receipts keep verifying.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from blindfold.attestation.binding import public_key_sha256
from blindfold.attestation.verdict import Evidence
from blindfold.server.tee.base import TeeProvider


@dataclass(frozen=True)
class AttestationDocument:
    evidence: Evidence
    certificate_pem: str

    def to_json(self) -> dict[str, Any]:
        return {**self.evidence.to_json(), "certificate": self.certificate_pem}


class ServerIdentity:
    def __init__(self, provider: TeeProvider, hostnames: list[str]) -> None:
        self.provider = provider
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = _self_signed_certificate(self.private_key, hostnames)
        self.certificate_der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode()
        self.spki_sha256 = public_key_sha256(self.private_key.public_key())
        self._lock = threading.Lock()
        self._standing: AttestationDocument | None = None
        self._standing_refresh_at: float | None = None

    def attestation(self, nonce: bytes | None = None) -> AttestationDocument:
        """Evidence for `SHA-256(SPKI) || nonce`, or the standing evidence for 32 zero bytes."""
        if nonce is None:
            return self.standing()
        return self._document(nonce)

    def standing(self) -> AttestationDocument:
        """The nonce-less evidence, cached, and made again once it nears expiry."""
        with self._lock:
            now = time.time()
            if self._standing is None or (
                self._standing_refresh_at is not None and now >= self._standing_refresh_at
            ):
                self._standing = self._document(bytes(32))
                # Read right after making the evidence: for Nitro it is the lifetime of the
                # document just made (a concurrent nonce'd request may shift it by moments).
                valid_until = self.provider.collateral_valid_until()
                self._standing_refresh_at = (
                    None if valid_until is None else _refresh_time(now, valid_until)
                )
            return self._standing

    def standing_evidence_sha256(self) -> str:
        """What receipts name: the hash of the current standing evidence."""
        return hashlib.sha256(self.standing().evidence.evidence).hexdigest()

    def _document(self, freshness: bytes) -> AttestationDocument:
        evidence = self.provider.evidence(self.spki_sha256 + freshness)
        return AttestationDocument(evidence, self.certificate_pem)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # ssl can only load keys from a path; a memfd is a path that never touches a disk.
        descriptor = os.memfd_create("blindfold-tls", os.MFD_CLOEXEC)
        try:
            os.write(descriptor, self.certificate_pem.encode() + key_pem)
            context.load_cert_chain(f"/proc/self/fd/{descriptor}")
        finally:
            os.close(descriptor)
        return context


STANDING_REFRESH_MARGIN = 3600.0


def _refresh_time(made: float, valid_until: float) -> float:
    """An hour before expiry, or halfway through a lifetime shorter than two hours."""
    return valid_until - min(STANDING_REFRESH_MARGIN, max(valid_until - made, 0) / 2)


def _self_signed_certificate(
    key: ec.EllipticCurvePrivateKey, hostnames: list[str]
) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Blindfold attested server")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
