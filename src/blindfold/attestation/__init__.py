"""Remote attestation: evidence, per-TEE verifiers, policies and the server-binding check."""

from blindfold.attestation.kinds import KINDS, TEE_KINDS, TeeKind, Verifier, VerifierOptions
from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.attestation.verify import verify_evidence, verify_server_evidence

__all__ = [
    "KINDS",
    "TEE_KINDS",
    "Evidence",
    "Policy",
    "TeeKind",
    "Verdict",
    "Verifier",
    "VerifierOptions",
    "verify_evidence",
    "verify_server_evidence",
]
