"""The server's attested identity: the service identity (`service_identity.py`: TLS key and
certificate, made at start or released by a peer replica), and this replica's own evidence
binding the certificate's public key (DESIGN.md, "The attested channel"), and the
operator's endorsement naming the deployment that key belongs to (`attestation.deployment`).

The private key only ever lives in process memory. Python's ssl module loads keys only from
a path, so the key reaches the TLS stack through an anonymous memory file (memfd). Where there
is no memfd_create (Gramine SGX enclaves), it goes through a temporary file holding the key
ENCRYPTED under a random 256-bit password that exists only in process memory, removed as soon
as it is loaded: whatever storage the file lands on learns nothing of the key.

The standing (nonce-less) evidence, which receipts name by hash, is made again before its
collateral or certificate expires, so clients keep accepting it and receipts keep verifying.

Clients that ask for the identity binding get evidence over the identity document instead
(`attestation.binding`): the same key hash plus the HPKE key configurations of `hpke`
(`server.hpke_keys`), which Oblivious HTTP requests are encrypted to. Its standing form is
made again whenever the document changes (an HPKE key rotation).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import serialization

from blindfold.attestation.binding import identity_document, public_key_sha256
from blindfold.attestation.deployment import Endorsement
from blindfold.attestation.verdict import Evidence
from blindfold.errors import EvidenceError
from blindfold.server.hpke_keys import DEFAULT_GRACE_SECONDS, DEFAULT_ROTATION_SECONDS, HpkeKeyring
from blindfold.server.refusals import AccessDenied, Conflict, InvalidRequest
from blindfold.server.service_identity import ServiceIdentity
from blindfold.server.tee.base import TeeProvider


@dataclass(frozen=True)
class AttestationDocument:
    evidence: Evidence
    certificate_pem: str
    endorsement: Endorsement | None = None
    # The canonical identity document the evidence binds, when the client asked for it.
    identity_document: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        document = {**self.evidence.to_json(), "certificate": self.certificate_pem}
        if self.endorsement is not None:
            document["deployment_endorsement"] = self.endorsement.to_json()
        if self.identity_document is not None:
            document["identity_document"] = self.identity_document.decode()
        return document


class ServerIdentity:
    def __init__(
        self,
        provider: TeeProvider,
        hostnames: list[str],
        operator_key_ids: frozenset[str] = frozenset(),
        service: ServiceIdentity | None = None,
        hpke_schedule: tuple[float, float] = (DEFAULT_ROTATION_SECONDS, DEFAULT_GRACE_SECONDS),
    ) -> None:
        self.provider = provider
        # Made here, or (a replica that joined a cluster) released by an attested peer.
        self.service = service or ServiceIdentity.create(hostnames)
        # Derived from the service identity: every replica holds the same gateway keys.
        rotation, grace = hpke_schedule
        self.hpke = HpkeKeyring(rotation, grace, seed=self.service.hpke_seed())
        # Who may endorse this server's key (`--deployment-operator-key`); empty: the first
        # operator to post a valid endorsement, and later only that operator.
        self.operator_key_ids = operator_key_ids
        self.endorsement: Endorsement | None = None
        self.private_key = self.service.tls_key
        self.certificate = self.service.certificate
        self.certificate_der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode()
        self.spki_sha256 = public_key_sha256(self.private_key.public_key())
        self._lock = threading.Lock()
        self._standing: AttestationDocument | None = None
        self._standing_refresh_at: float | None = None
        self.standing_made_at: float | None = None  # for the evidence-age metric
        self._standing_identity: AttestationDocument | None = None
        self._standing_identity_refresh_at: float | None = None

    def attestation(
        self, nonce: bytes | None = None, identity: bool = False
    ) -> AttestationDocument:
        """Evidence for `SHA-256(SPKI) || nonce`, or the standing evidence for 32 zero bytes;
        with `identity`, evidence for `SHA-256(identity document) || nonce` instead."""
        if identity:
            if nonce is None:
                return replace(self.standing_identity(), endorsement=self.endorsement)
            return self._identity_document(nonce, self.identity_document())
        if nonce is None:
            return replace(self.standing(), endorsement=self.endorsement)
        return self._document(nonce)

    def identity_document(self) -> bytes:
        """The TLS key hash and the HPKE key configurations accepted now."""
        configs = [config.encode() for config in self.hpke.configs()]
        return identity_document(self.spki_sha256, configs)

    def standing_identity(self) -> AttestationDocument:
        """The nonce-less identity evidence, made again when the document changes or nears
        expiry."""
        document = self.identity_document()
        with self._lock:
            now = time.time()
            cached = self._standing_identity
            refresh_at = self._standing_identity_refresh_at
            if (
                cached is None
                or cached.identity_document != document
                or (refresh_at is not None and now >= refresh_at)
            ):
                cached = self._identity_document(bytes(32), document)
                valid_until = self.provider.collateral_valid_until()
                self._standing_identity = cached
                self._standing_identity_refresh_at = (
                    None if valid_until is None else _refresh_time(now, valid_until)
                )
            return cached

    def _identity_document(self, freshness: bytes, document: bytes) -> AttestationDocument:
        evidence = self.provider.evidence(hashlib.sha256(document).digest() + freshness)
        return AttestationDocument(evidence, self.certificate_pem, self.endorsement, document)

    def standing(self) -> AttestationDocument:
        """The nonce-less evidence, cached, and made again once it nears expiry."""
        with self._lock:
            now = time.time()
            if self._standing is None or (
                self._standing_refresh_at is not None and now >= self._standing_refresh_at
            ):
                self._standing = self._document(bytes(32))
                self.standing_made_at = now
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
        return AttestationDocument(evidence, self.certificate_pem, self.endorsement)

    def endorse(self, endorsement: Endorsement) -> None:
        """Publishes an operator's endorsement of this server's key. It authenticates
        itself (signature, and the key hash only this TEE holds the private half of); a
        second operator cannot replace the first one's, so no client can take it over."""
        try:
            endorsement.verify(self.spki_sha256)
        except EvidenceError as exc:
            raise InvalidRequest(str(exc)) from None
        key_id = endorsement.operator_key_id
        if self.operator_key_ids and key_id not in self.operator_key_ids:
            raise AccessDenied(
                f"operator key {key_id} may not endorse this server; it accepts only "
                f"{', '.join(sorted(self.operator_key_ids))} (--deployment-operator-key)",
            )
        with self._lock:
            current = self.endorsement
            if current is not None and current.operator_key_id != key_id:
                raise Conflict(
                    f"this server is already endorsed by operator {current.operator_key_id}; "
                    "another operator cannot replace it. Restart the server to endorse it anew.",
                )
            if current is not None and endorsement.issued_at < current.issued_at:
                raise Conflict("a newer endorsement by this operator is in place")
            self.endorsement = endorsement

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self._load_through_memfd(context)
        except (AttributeError, OSError):  # no memfd_create, or no /proc/self/fd to open it
            self._load_through_encrypted_file(context)
        return context

    def _load_through_memfd(self, context: ssl.SSLContext) -> None:
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # A memfd is a path that never touches a disk.
        descriptor = os.memfd_create("blindfold-tls", os.MFD_CLOEXEC)
        try:
            os.write(descriptor, self.certificate_pem.encode() + key_pem)
            context.load_cert_chain(f"/proc/self/fd/{descriptor}")
        finally:
            os.close(descriptor)

    def _load_through_encrypted_file(self, context: ssl.SSLContext) -> None:
        password = secrets.token_bytes(32)
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        # The temporary folder (a tmpfs inside the enclave under the Gramine manifest); even
        # on host-visible storage the file holds only ciphertext under `password`.
        descriptor, path = tempfile.mkstemp(prefix="blindfold-tls-", suffix=".pem")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(self.certificate_pem.encode() + key_pem)
            context.load_cert_chain(path, password=password)
        finally:
            os.unlink(path)


STANDING_REFRESH_MARGIN = 3600.0


def _refresh_time(made: float, valid_until: float) -> float:
    """An hour before expiry, or halfway through a lifetime shorter than two hours."""
    return valid_until - min(STANDING_REFRESH_MARGIN, max(valid_until - made, 0) / 2)
