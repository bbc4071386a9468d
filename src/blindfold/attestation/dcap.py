"""Shared Intel DCAP (SGX quote v3, TDX quote v4) verification.

This module owns the verification SGX and TDX have in common: the one call into `dcap-qvl`
(with our bundled Intel SGX Root CA as the explicit trust anchor), enforcing the collateral's
validity window, and turning dcap-qvl's errors into `EvidenceError`s that say what to do.
The quote's layout and the collateral files live in `formats.dcap` and
`formats.collateral_files`, shared with the server; `sgx.py` and `tdx.py` only build the
Verdict.

dcap-qvl is called with its `claims_only` quote policy: it checks genuineness exactly as
its one-shot `verify` does, and reports the claims our policy judges (TCB status, the TCB
evaluation data number, and the PCK certificate's dynamic-platform / cached-keys / SMT
flags). Its own acceptance options stay unused so that one place, `attestation.policy`,
decides and explains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import dcap_qvl

from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.formats import dcap as formats
from blindfold.attestation.verdict import Verdict
from blindfold.errors import EvidenceError

# Statuses dcap-qvl returns for a genuine platform. Acceptability (e.g. OutOfDate) is the
# policy's call; "Revoked" means Intel withdrew trust in the platform, so it is not genuine.
GENUINE_TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
    }
)


@dataclass(frozen=True)
class DcapResult:
    """What dcap-qvl established about a quote, plus our collateral window."""

    quote: formats.Quote
    tcb_status: str
    advisory_ids: tuple[str, ...]
    valid_from: int
    valid_until: int
    platform: dict[str, Any] = field(default_factory=dict)

    def verdict(self) -> Verdict:
        """The Verdict: the report body's claims (`formats.dcap.Quote.claims`) and the
        platform claims dcap-qvl established."""
        return Verdict(
            kind=self.quote.kind,
            measurements={**self.quote.claims(), **self.platform},
            report_data=self.quote.report_data,
            debug=self.quote.debug,
            tcb_status=self.tcb_status,
            advisory_ids=self.advisory_ids,
            valid_from=self.valid_from,
            valid_until=self.valid_until,
        )


def parse_collateral(text: str) -> dcap_qvl.QuoteCollateralV3:
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, TypeError) as exc:
        raise EvidenceError(
            f"DCAP collateral does not parse as dcap-qvl QuoteCollateralV3 JSON ({exc}); "
            f"{files.FETCH_ADVICE}."
        ) from None


def utc(at: int) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_window(at: int, window: tuple[int, int]) -> None:
    if not window[0] <= at <= window[1]:
        raise EvidenceError(
            f"DCAP collateral expired or not yet valid at {utc(at)}: it is valid from "
            f"{utc(window[0])} to {utc(window[1])}; {files.FETCH_ADVICE}."
        )


# --- verification ---


@lru_cache(maxsize=1)
def intel_root_ca_der() -> bytes:
    """The Intel SGX Root CA we pin (identical to dcap-qvl's built-in one)."""
    return (
        resources.files("blindfold.attestation")
        .joinpath("roots/intel_sgx_root_ca.der")
        .read_bytes()
    )


def verify_quote(evidence: bytes, collateral: dict[str, bytes], at: int, kind: str) -> DcapResult:
    """Checks that `evidence` is a genuine DCAP quote of TEE `kind` at time `at`."""
    if isinstance(at, bool) or not isinstance(at, int):
        # dcap-qvl requires an int and silently flooring a float would hide caller bugs.
        raise TypeError(f"'at' must be unix seconds as an int, got {type(at).__name__}")
    quote = formats.parse_quote(evidence)
    formats.require_kind(quote, kind)
    pck = formats.pck_certificate(quote)
    text = files.dcap_qvl_json(collateral)
    col = parse_collateral(text)
    window = files.validity_window(text, pck.chain_pem)
    _check_window(at, window)
    try:
        claims = dcap_qvl.QuoteVerifier(intel_root_ca_der()).verify_with_policy(
            quote.raw, col, at, dcap_qvl.QuotePolicy.claims_only(at)
        )
    except ValueError as exc:
        raise EvidenceError(explain_failure(str(exc), at)) from None
    tcb, platform = _read_claims(claims.to_json())
    status = str(tcb["status"])
    if status not in GENUINE_TCB_STATUSES:
        raise EvidenceError(
            f"Intel reports the platform's TCB status as '{status}': the platform is revoked "
            "or unknown to Intel and cannot be trusted, whatever the policy."
        )
    return DcapResult(
        quote=quote,
        tcb_status=status,
        advisory_ids=tuple(str(a) for a in tcb.get("advisory_ids") or ()),
        valid_from=window[0],
        valid_until=window[1],
        platform=platform,
    )


# PCK certificate flags as dcap-qvl reports them; "Undefined": the platform does not say
# (single-package platforms), which the policy cannot hold against it.
_PCK_FLAGS = {"True": True, "False": False, "Undefined": None}


def _read_claims(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the TCB claims, the platform claims for the Verdict) from dcap-qvl's claims JSON."""
    try:
        claims = json.loads(text)
        tcb = claims["tcb"]
        pck = claims["platform"]["pck"]
        platform = {
            "tcb_eval_data_number": int(tcb["eval_data_number"]),
            **{name: _PCK_FLAGS.get(str(pck.get(name))) for name in _PCK_FLAG_NAMES},
        }
    except (ValueError, KeyError, TypeError) as exc:
        # Only a dcap-qvl release with another claims layout gets here.
        raise EvidenceError(f"dcap-qvl returned claims this client cannot read ({exc!r})") from None
    return tcb, platform


_PCK_FLAG_NAMES = ("dynamic_platform", "cached_keys", "smt_enabled")
# The claims every SGX/TDX Verdict carries beside its report body's fields.
PLATFORM_CLAIMS = ("tcb_eval_data_number", *_PCK_FLAG_NAMES)


def explain_failure(detail: str, at: int) -> str:
    """Names what failed (dcap-qvl's own words are kept) and what to do about it."""
    detail = " ".join(detail.split())
    lower = detail.lower()
    if "expired" in lower or "in the future" in lower or "not yet valid" in lower:
        return (
            f"DCAP collateral expired or not yet valid at {utc(at)} ({detail}); "
            f"{files.FETCH_ADVICE}."
        )
    if "no matching tcb level" in lower:
        return (
            f"the platform's TCB is below every level in Intel's TCB info ({detail}); the host "
            "needs a microcode/firmware update, or the collateral is for another platform."
        )
    if "revoked" in lower:
        return f"a certificate in the quote's chain is revoked ({detail}); do not trust this host."
    if "signature" in lower:
        return (
            f"DCAP quote signature check failed ({detail}): the quote was altered or was not "
            "produced by a genuine Intel quoting enclave."
        )
    if "unknownrevocationstatus" in lower:
        return (
            f"the collateral's PCK CRL does not cover this quote's PCK certificate ({detail}): "
            f"it is for the other PCK CA (processor vs platform); {files.FETCH_ADVICE}."
        )
    if "fmspc" in lower or "mismatch" in lower:
        return (
            f"DCAP collateral does not belong to this quote's platform ({detail}); "
            f"{files.FETCH_ADVICE}."
        )
    if "certificate" in lower or "chain" in lower or "crl" in lower:
        return (
            f"DCAP certificate chain does not verify to the pinned Intel SGX Root CA ({detail}); "
            "the quote or its collateral is not from Intel."
        )
    if "parse" in lower or "decode" in lower:
        return f"DCAP quote is malformed ({detail}). Check that the evidence is a whole quote."
    return f"DCAP quote verification failed ({detail})."
