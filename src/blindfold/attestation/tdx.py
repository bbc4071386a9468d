"""Client-side verifier for Intel TDX evidence (DCAP ECDSA quote v4, TD report 1.0).

This module owns the TD report body: which bytes are MRTD, the RTMRs, the owner/config ids,
TD_ATTRIBUTES (and its DEBUG bit) and report data. Signature, chain, collateral and TCB checks
(including the TDX module identity) live in `dcap`.
"""

from __future__ import annotations

from typing import Any

from blindfold.attestation.dcap import verify_quote
from blindfold.attestation.verdict import Verdict

KIND = "tdx"

# Offsets into the 584-byte TDX TD report 1.0 body of a v4 quote (Intel TDX DCAP quote
# library, sgx_report2_body_t).
_FIELDS: dict[str, slice] = {
    "tee_tcb_svn": slice(0, 16),
    "mr_seam": slice(16, 64),
    "td_attributes": slice(120, 128),
    "xfam": slice(128, 136),
    "mr_td": slice(136, 184),
    "mr_config_id": slice(184, 232),
    "mr_owner": slice(232, 280),
    "mr_owner_config": slice(280, 328),
    "rtmr0": slice(328, 376),
    "rtmr1": slice(376, 424),
    "rtmr2": slice(424, 472),
    "rtmr3": slice(472, 520),
}
_REPORT_DATA = slice(520, 584)

# TD_ATTRIBUTES.DEBUG is bit 0 of the little-endian attributes: the TD's memory and CPU
# state are open to the host, so it protects nothing.
_DEBUG_FLAG = 0x1


def verify(evidence: bytes, collateral: dict[str, bytes], at: int) -> Verdict:
    """Verifies a TDX quote against DCAP collateral at unix time `at`.

    Raises EvidenceError when the quote is malformed, not TDX, badly signed, not chained to
    the Intel SGX Root CA, revoked, below every known TCB level, or the collateral is not
    valid at `at`. Any other TCB status is reported in the Verdict for the policy to judge.
    """
    result = verify_quote(evidence, collateral, at, KIND)
    body = result.quote.body
    return result.verdict(KIND, measurements(body), body[_REPORT_DATA], is_debug(body))


def measurements(body: bytes) -> dict[str, Any]:
    """The identity fields of a TD report body, as the policy compares them.

    `mr_seam` (the TDX module's measurement) is not a TD measurement but is included so a
    policy can pin the module too; Intel's TCB info already vets it for genuineness.
    """
    return {name: body[where].hex() for name, where in _FIELDS.items()}


def is_debug(body: bytes) -> bool:
    return bool(body[_FIELDS["td_attributes"]][0] & _DEBUG_FLAG)
