"""Verifying a server's attestation: genuine evidence, acceptable claims, bound to its key.

`verify_evidence` calls the verifier of the evidence's TEE kind (`attestation.kinds`), which
checks only that the evidence is genuine; `verify_server_evidence` adds the policy and the
binding of the evidence to the server's TLS certificate (and the client's nonce).
"""

from __future__ import annotations

import time
import warnings

from blindfold.attestation.binding import (
    IdentityDocument,
    expected_report_data,
    identity_report_data,
    spki_sha256,
)
from blindfold.attestation.kinds import VerifierOptions, tee_kind
from blindfold.attestation.policy import Policy
from blindfold.attestation.simulation import WARNING
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.errors import ReportDataMismatch, SimulationNotAllowed, SimulationWarning


def verify_evidence(
    evidence: Evidence, at: int | None = None, options: VerifierOptions | None = None
) -> Verdict:
    """Checks that `evidence` is genuine at time `at` (default: now) and returns its claims.

    `options` reach the verifier of the evidence's kind (e.g. the SEV-SNP VCEK cache)."""
    verifier = tee_kind(evidence.kind).verifier(options or VerifierOptions())
    return verifier(
        evidence.evidence, evidence.collateral, int(time.time()) if at is None else int(at)
    )


def verify_server_evidence(
    evidence: Evidence,
    certificate_der: bytes,
    policy: Policy,
    *,
    nonce: bytes | None,
    allow_simulation: bool,
    at: int | None = None,
    options: VerifierOptions | None = None,
    identity: IdentityDocument | None = None,
) -> Verdict:
    """The whole client-side check of DESIGN.md step 4; raises an AttestationError subclass.
    With `identity`, the report data must bind that identity document, and the document
    this certificate's key."""
    if evidence.kind == "simulation" and not allow_simulation:
        raise SimulationNotAllowed(
            "the server offers simulation evidence, which proves nothing (no TEE protects the "
            "data). Pass allow_simulation=True / --allow-simulation only for development."
        )
    verdict = verify_evidence(evidence, at, options)
    if identity is None:
        check_report_data(verdict, certificate_der, nonce)
    else:
        check_identity_binding(verdict, certificate_der, nonce, identity)
    policy.verify(verdict)
    if verdict.kind == "simulation":
        warnings.warn(WARNING, SimulationWarning, stacklevel=3)
    return verdict


def check_identity_binding(
    verdict: Verdict, certificate_der: bytes, nonce: bytes | None, identity: IdentityDocument
) -> None:
    """The identity form of the binding: report data = SHA-256(document) || nonce, and the
    document names the certificate's key. The HPKE configurations are then the TEE's."""
    found = verdict.report_data
    if found[:32] != identity.sha256():
        raise ReportDataMismatch(
            "the evidence does not bind the identity document the server sent (report data "
            f"binds {found[:32].hex()}, the document hashes to {identity.sha256().hex()}): "
            "someone on the path altered the document, e.g. to swap in their own HPKE key. "
            "Nothing was sent."
        )
    key_hash = spki_sha256(certificate_der)
    if identity.spki_sha256 != key_hash:
        raise ReportDataMismatch(
            "the evidence binds another public key than the certificate this server presents "
            f"(its identity document names {identity.spki_sha256.hex()}, the certificate key "
            f"hashes to {key_hash.hex()}): a proxy or another server may be relaying the "
            "evidence with its own certificate. Nothing was sent."
        )
    _check_freshness(found, identity_report_data(identity.raw, nonce), nonce)


def check_report_data(verdict: Verdict, certificate_der: bytes, nonce: bytes | None) -> None:
    expected = expected_report_data(certificate_der, nonce)
    found = verdict.report_data
    if found[:32] != expected[:32]:
        raise ReportDataMismatch(
            "the evidence binds another public key than the certificate this server presents "
            f"(report data binds {found[:32].hex()}, certificate key hashes to "
            f"{expected[:32].hex()}): a proxy or another server may be relaying the evidence. "
            "Connect directly to the attested server."
        )
    _check_freshness(found, expected, nonce)


def _check_freshness(found: bytes, expected: bytes, nonce: bytes | None) -> None:
    if found[32:64] != expected[32:]:
        what = "the nonce this client sent" if nonce is not None else "32 zero bytes"
        raise ReportDataMismatch(
            f"the evidence's freshness field is {found[32:64].hex()}, expected {what} "
            f"({expected[32:].hex()}): the evidence may be replayed. Retry; if it persists, "
            "the server is not answering attestation requests honestly."
        )
