"""Client-side verifier for Intel SGX evidence (DCAP ECDSA quote v3, e.g. from Gramine).

This module owns the SGX report body: which bytes are MRENCLAVE, MRSIGNER, ISV ids, the
DEBUG attribute and report data. Signature, chain, collateral and TCB checks live in `dcap`.
"""

from __future__ import annotations

import struct
from typing import Any

from blindfold.attestation.dcap import verify_quote
from blindfold.attestation.verdict import Verdict

KIND = "sgx"

# Offsets into the 384-byte SGX REPORTBODY (Intel SGX DCAP quote library, sgx_report_body_t).
_CPU_SVN = slice(0, 16)
_ATTRIBUTES = slice(48, 64)
_MR_ENCLAVE = slice(64, 96)
_MR_SIGNER = slice(128, 160)
_ISV_PROD_ID_AT = 256
_ISV_SVN_AT = 258
_REPORT_DATA = slice(320, 384)

# SGX_FLAGS_DEBUG: bit 1 of the low 64-bit ATTRIBUTES.FLAGS word.
_DEBUG_FLAG = 0x2


def verify(evidence: bytes, collateral: dict[str, bytes], at: int) -> Verdict:
    """Verifies an SGX quote against DCAP collateral at unix time `at`.

    Raises EvidenceError when the quote is malformed, not SGX, badly signed, not chained to
    the Intel SGX Root CA, revoked, below every known TCB level, or the collateral is not
    valid at `at`. Any other TCB status is reported in the Verdict for the policy to judge.
    """
    result = verify_quote(evidence, collateral, at, KIND)
    body = result.quote.body
    return result.verdict(KIND, measurements(body), body[_REPORT_DATA], is_debug(body))


def measurements(body: bytes) -> dict[str, Any]:
    """The identity fields of an SGX report body, as the policy compares them."""
    (isv_prod_id,) = struct.unpack_from("<H", body, _ISV_PROD_ID_AT)
    (isv_svn,) = struct.unpack_from("<H", body, _ISV_SVN_AT)
    return {
        "mr_enclave": body[_MR_ENCLAVE].hex(),
        "mr_signer": body[_MR_SIGNER].hex(),
        "isv_prod_id": isv_prod_id,
        "isv_svn": isv_svn,
        "attributes": body[_ATTRIBUTES].hex(),
        "cpu_svn": body[_CPU_SVN].hex(),
    }


def is_debug(body: bytes) -> bool:
    (flags,) = struct.unpack_from("<Q", body, _ATTRIBUTES.start)
    return bool(flags & _DEBUG_FLAG)
