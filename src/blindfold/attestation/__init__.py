"""Remote attestation: evidence, per-TEE verifiers, policies and the server-binding check."""

from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import TEE_KINDS, Evidence, Verdict
from blindfold.attestation.verify import verify_evidence, verify_server_evidence

__all__ = [
    "TEE_KINDS",
    "Evidence",
    "Policy",
    "Verdict",
    "verify_evidence",
    "verify_server_evidence",
]
