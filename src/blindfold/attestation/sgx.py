"""Client-side verifier for Intel SGX evidence (DCAP ECDSA quote v3, e.g. from Gramine).

The SGX report body's layout (MRENCLAVE, MRSIGNER, ISV ids, the DEBUG attribute, report
data) lives in `formats.dcap`; signature, chain, collateral and TCB checks in `dcap`.
"""

from __future__ import annotations

from blindfold.attestation.dcap import verify_quote
from blindfold.attestation.verdict import Verdict

KIND = "sgx"


def verify(evidence: bytes, collateral: dict[str, bytes], at: int) -> Verdict:
    """Verifies an SGX quote against DCAP collateral at unix time `at`.

    Raises EvidenceError when the quote is malformed, not SGX, badly signed, not chained to
    the Intel SGX Root CA, revoked, below every known TCB level, or the collateral is not
    valid at `at`. Any other TCB status is reported in the Verdict for the policy to judge.
    """
    return verify_quote(evidence, collateral, at, KIND).verdict()
