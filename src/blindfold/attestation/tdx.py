"""Client-side verifier for Intel TDX evidence (DCAP ECDSA quote v4, TD report 1.0).

The TD report body's layout (MRTD, the RTMRs, the owner/config ids, TD_ATTRIBUTES and its
DEBUG bit, report data) lives in `formats.dcap`; signature, chain, collateral and TCB checks
(including the TDX module identity) in `dcap`.
"""

from __future__ import annotations

from blindfold.attestation.dcap import verify_quote
from blindfold.attestation.verdict import Verdict

KIND = "tdx"


def verify(evidence: bytes, collateral: dict[str, bytes], at: int) -> Verdict:
    """Verifies a TDX quote against DCAP collateral at unix time `at`.

    Raises EvidenceError when the quote is malformed, not TDX, badly signed, not chained to
    the Intel SGX Root CA, revoked, below every known TCB level, or the collateral is not
    valid at `at`. Any other TCB status is reported in the Verdict for the policy to judge.
    """
    return verify_quote(evidence, collateral, at, KIND).verdict()
