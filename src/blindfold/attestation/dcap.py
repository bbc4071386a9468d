"""Shared Intel DCAP (SGX quote v3, TDX quote v4) verification.

This module owns everything SGX and TDX have in common: cutting the quote out of the
evidence bytes by its length fields, turning the collateral files of a vector folder into
the JSON `dcap-qvl` consumes, the validity window of that collateral, the one call into
`dcap-qvl` (with our bundled Intel SGX Root CA as the explicit trust anchor), and turning
its errors into `EvidenceError`s that say what to do. `sgx.py` and `tdx.py` only read the
report body and build the Verdict.

dcap-qvl is called with its `claims_only` quote policy: it checks genuineness exactly as
its one-shot `verify` does, and reports the claims our policy judges (TCB status, the TCB
evaluation data number, and the PCK certificate's dynamic-platform / cached-keys / SMT
flags). Its own acceptance options stay unused so that one place, `attestation.policy`,
decides and explains.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from blindfold.attestation.verdict import Verdict
from blindfold.errors import EvidenceError

TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
TEE_NAMES = {TEE_TYPE_SGX: "sgx", TEE_TYPE_TDX: "tdx"}

HEADER_LEN = 48
SGX_REPORT_LEN = 384
TD_REPORT10_LEN = 584

COLLATERAL_JSON = "collateral.dcap-qvl.json"

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

FETCH_ADVICE = "fetch fresh collateral for this quote from Intel PCS or your PCCS"


@dataclass(frozen=True)
class DcapQuote:
    """A quote cut out of evidence bytes: header fields plus the raw report body."""

    raw: bytes
    version: int
    tee_type: int
    body: bytes


@dataclass(frozen=True)
class DcapResult:
    """What dcap-qvl established about a quote, plus our collateral window."""

    quote: DcapQuote
    tcb_status: str
    advisory_ids: tuple[str, ...]
    valid_from: int
    valid_until: int
    platform: dict[str, Any] = field(default_factory=dict)

    def verdict(
        self, kind: str, measurements: dict[str, Any], report_data: bytes, debug: bool
    ) -> Verdict:
        """The Verdict for this quote, given what the SGX or TDX body module read from it."""
        return Verdict(
            kind=kind,
            measurements={**measurements, **self.platform},
            report_data=report_data,
            debug=debug,
            tcb_status=self.tcb_status,
            advisory_ids=self.advisory_ids,
            valid_from=self.valid_from,
            valid_until=self.valid_until,
        )


# --- quote framing ---


def parse_quote(evidence: bytes) -> DcapQuote:
    """Cuts the quote out of `evidence` by its length fields.

    Done by hand because evidence files often carry trailing bytes (zero padding, test
    markers) and we want to hand dcap-qvl exactly the signed quote, and because we need the
    TEE type before verifying to check it matches the kind the server claims.
    """
    if len(evidence) < HEADER_LEN:
        raise EvidenceError(
            f"DCAP quote is truncated: {len(evidence)} bytes, shorter than the "
            f"{HEADER_LEN}-byte quote header. Check that the evidence is a whole quote."
        )
    version, _key_type, tee_type = struct.unpack_from("<HHI", evidence, 0)
    body_len = _body_len(version, tee_type)
    sig_len_at = HEADER_LEN + body_len
    if len(evidence) < sig_len_at + 4:
        raise EvidenceError(
            f"DCAP quote v{version} is truncated: {len(evidence)} bytes, but its header and "
            f"report body alone need {sig_len_at + 4}. Check that the evidence is a whole quote."
        )
    (sig_len,) = struct.unpack_from("<I", evidence, sig_len_at)
    quote_len = sig_len_at + 4 + sig_len
    if len(evidence) < quote_len:
        raise EvidenceError(
            f"DCAP quote v{version} is truncated: its length fields say {quote_len} bytes, "
            f"only {len(evidence)} are present. Check that the evidence is a whole quote."
        )
    return DcapQuote(
        raw=bytes(evidence[:quote_len]),
        version=version,
        tee_type=tee_type,
        body=bytes(evidence[HEADER_LEN:sig_len_at]),
    )


def _body_len(version: int, tee_type: int) -> int:
    if version not in (3, 4):
        raise EvidenceError(
            f"not a supported DCAP quote: header says version {version} (expected 3 for SGX "
            "or 4 for TDX). The evidence may be garbage, or of another TEE kind."
        )
    if tee_type == TEE_TYPE_SGX:
        return SGX_REPORT_LEN
    if tee_type == TEE_TYPE_TDX and version == 4:
        return TD_REPORT10_LEN
    raise EvidenceError(
        f"not a supported DCAP quote: version {version} with TEE type {tee_type:#x} "
        "(expected 0x0 for SGX or 0x81 for TDX)."
    )


def require_tee(quote: DcapQuote, kind: str) -> None:
    """An SGX quote presented as TDX (or the reverse) is not the evidence it claims to be."""
    found = TEE_NAMES.get(quote.tee_type, f"{quote.tee_type:#x}")
    if found != kind:
        raise EvidenceError(
            f"evidence declared as kind '{kind}' is a DCAP quote of TEE type '{found}'; "
            "the server's attestation kind and its evidence disagree."
        )


# --- collateral ---


def collateral_json(collateral: dict[str, bytes]) -> str:
    """The dcap-qvl `QuoteCollateralV3` JSON: as given, or assembled from PCS-style files."""
    if COLLATERAL_JSON in collateral:
        try:
            return collateral[COLLATERAL_JSON].decode("utf-8")
        except UnicodeDecodeError:
            raise EvidenceError(f"{COLLATERAL_JSON} is not UTF-8 text; {FETCH_ADVICE}.") from None
    return assemble_collateral_json(collateral)


def assemble_collateral_json(files: dict[str, bytes]) -> str:
    """Builds the dcap-qvl collateral JSON from the split files Intel PCS serves.

    Done here because dcap-qvl only reads its own JSON. The TCB info and QE identity
    signatures cover the exact bytes of the `tcbInfo` / `enclaveIdentity` value, so that value
    is cut out of the text, never parsed and re-serialized.
    """
    needed = (
        "tcb_info.json",
        "qe_identity.json",
        "tcb_info_issuer_chain.pem",
        "qe_identity_issuer_chain.pem",
        "pck_crl.der",
        "pck_crl_issuer_chain.pem",
        "root_ca_crl.der",
    )
    missing = [name for name in needed if name not in files]
    if missing:
        raise EvidenceError(
            f"DCAP collateral is incomplete: no {COLLATERAL_JSON} and missing "
            f"{', '.join(missing)}; {FETCH_ADVICE}."
        )
    tcb_body, tcb_sig = _signed_body(files["tcb_info.json"], "tcbInfo", "tcb_info.json")
    qe_body, qe_sig = _signed_body(files["qe_identity.json"], "enclaveIdentity", "qe_identity.json")
    return json.dumps(
        {
            "pck_crl_issuer_chain": _text(
                files["pck_crl_issuer_chain.pem"], "pck_crl_issuer_chain.pem"
            ),
            "root_ca_crl": _crl_der(files["root_ca_crl.der"], "root_ca_crl.der").hex(),
            "pck_crl": _crl_der(files["pck_crl.der"], "pck_crl.der").hex(),
            "tcb_info_issuer_chain": _text(
                files["tcb_info_issuer_chain.pem"], "tcb_info_issuer_chain.pem"
            ),
            "tcb_info": tcb_body,
            "tcb_info_signature": tcb_sig,
            "qe_identity_issuer_chain": _text(
                files["qe_identity_issuer_chain.pem"], "qe_identity_issuer_chain.pem"
            ),
            "qe_identity": qe_body,
            "qe_identity_signature": qe_sig,
        }
    )


def _signed_body(data: bytes, key: str, name: str) -> tuple[str, str]:
    """Returns (exact text of the top-level `key` value, hex signature) of a PCS response."""
    try:
        text = data.decode("utf-8")
        spans = _top_level_spans(text)
        start, end = spans[key]
        signature = json.loads(text[slice(*spans["signature"])])
        bytes.fromhex(signature)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise EvidenceError(
            f"{name} is not an Intel PCS response with '{key}' and a hex 'signature'; "
            f"{FETCH_ADVICE}."
        ) from None
    return text[start:end], signature


def _top_level_spans(text: str) -> dict[str, tuple[int, int]]:
    """Maps each key of a top-level JSON object to the character span of its raw value."""
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}
    pos = _skip_ws(text, 0)
    if text[pos : pos + 1] != "{":
        raise ValueError("not a JSON object")
    pos = _skip_ws(text, pos + 1)
    while text[pos : pos + 1] != "}":
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text[pos : pos + 1] != ":" or not isinstance(key, str):
            raise ValueError("malformed object")
        start = _skip_ws(text, pos + 1)
        _value, end = decoder.raw_decode(text, start)
        spans[key] = (start, end)
        pos = _skip_ws(text, end)
        if text[pos : pos + 1] == ",":
            pos = _skip_ws(text, pos + 1)
        elif text[pos : pos + 1] != "}":
            raise ValueError("malformed object")
    return spans


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise EvidenceError(f"{name} is not a PEM certificate chain; {FETCH_ADVICE}.") from None


def _crl_der(data: bytes, name: str) -> bytes:
    """CRLs come as DER from PCS, but PEM copies are common; dcap-qvl wants DER (as hex)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            return x509.load_pem_x509_crl(data).public_bytes(Encoding.DER)
        except ValueError:
            raise EvidenceError(f"{name} is not a PEM or DER CRL; {FETCH_ADVICE}.") from None
    return data


def parse_collateral(text: str) -> dcap_qvl.QuoteCollateralV3:
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, TypeError) as exc:
        raise EvidenceError(
            f"DCAP collateral does not parse as dcap-qvl QuoteCollateralV3 JSON ({exc}); "
            f"{FETCH_ADVICE}."
        ) from None


# --- validity window ---


def validity_window(col: dcap_qvl.QuoteCollateralV3, pck_chain: bytes) -> tuple[int, int]:
    """The time span in which every piece of collateral and every certificate is valid.

    Computed by hand because dcap-qvl's one-shot `verify` only says yes/no at one instant;
    we publish the window in the Verdict and enforce its lower bound ourselves, since
    dcap-qvl accepts a CRL whose thisUpdate is still in the future.
    """
    starts: list[int] = []
    ends: list[int] = []
    for body, key in ((col.tcb_info, "tcbInfo"), (col.qe_identity, "enclaveIdentity")):
        issue, next_update = _issue_and_next_update(body, key)
        starts.append(issue)
        ends.append(next_update)
    for crl_der in (bytes(col.root_ca_crl), bytes(col.pck_crl)):
        crl = x509.load_der_x509_crl(crl_der)
        starts.append(int(crl.last_update_utc.timestamp()))
        if crl.next_update_utc is not None:
            ends.append(int(crl.next_update_utc.timestamp()))
    for cert in _all_certificates(col, pck_chain):
        starts.append(int(cert.not_valid_before_utc.timestamp()))
        ends.append(int(cert.not_valid_after_utc.timestamp()))
    return max(starts), min(ends)


def _issue_and_next_update(body: str, key: str) -> tuple[int, int]:
    try:
        data = json.loads(body)
        return _unix(data["issueDate"]), _unix(data["nextUpdate"])
    except (ValueError, KeyError, TypeError):
        raise EvidenceError(
            f"DCAP collateral '{key}' lacks a readable issueDate/nextUpdate; {FETCH_ADVICE}."
        ) from None


def _unix(stamp: str) -> int:
    # Python 3.10's fromisoformat does not accept the trailing "Z" Intel writes; Intel's
    # dates are UTC, so a stamp without an offset must not be read as local time.
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())


def _all_certificates(col: dcap_qvl.QuoteCollateralV3, pck_chain: bytes) -> list[x509.Certificate]:
    chains = [col.tcb_info_issuer_chain, col.qe_identity_issuer_chain, col.pck_crl_issuer_chain]
    pems = [chain.encode() for chain in chains]
    if pck_chain:
        pems.append(pck_chain)
    certs: list[x509.Certificate] = []
    for pem in pems:
        # Quote-embedded chains may end with a NUL inside their declared size.
        certs.extend(x509.load_pem_x509_certificates(pem.rstrip(b"\0")))
    return certs


def pck_chain_pem(quote: DcapQuote) -> bytes:
    """The PEM PCK chain embedded in the quote (empty if the quote carries none).

    Left to dcap-qvl because the chain sits deep in the certification data (nested inside
    the QE report certification data for TDX) and dcap-qvl already parses it.
    """
    try:
        chain = dcap_qvl.parse_quote(quote.raw).cert_chain_pem_bytes()
    except ValueError as exc:
        raise EvidenceError(
            f"DCAP quote is malformed ({' '.join(str(exc).split())}). Check that the "
            "evidence is a whole quote."
        ) from None
    return bytes(chain) if chain else b""


def utc(at: int) -> str:
    return datetime.fromtimestamp(at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_window(at: int, window: tuple[int, int]) -> None:
    if not window[0] <= at <= window[1]:
        raise EvidenceError(
            f"DCAP collateral expired or not yet valid at {utc(at)}: it is valid from "
            f"{utc(window[0])} to {utc(window[1])}; {FETCH_ADVICE}."
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
    quote = parse_quote(evidence)
    require_tee(quote, kind)
    pck_chain = pck_chain_pem(quote)
    col = parse_collateral(collateral_json(collateral))
    try:
        window = validity_window(col, pck_chain)
    except ValueError as exc:
        raise EvidenceError(
            f"DCAP collateral or the quote's PCK chain holds an unreadable certificate or CRL "
            f"({exc}); {FETCH_ADVICE}."
        ) from None
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
        return f"DCAP collateral expired or not yet valid at {utc(at)} ({detail}); {FETCH_ADVICE}."
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
            f"it is for the other PCK CA (processor vs platform); {FETCH_ADVICE}."
        )
    if "fmspc" in lower or "mismatch" in lower:
        return (
            f"DCAP collateral does not belong to this quote's platform ({detail}); {FETCH_ADVICE}."
        )
    if "certificate" in lower or "chain" in lower or "crl" in lower:
        return (
            f"DCAP certificate chain does not verify to the pinned Intel SGX Root CA ({detail}); "
            "the quote or its collateral is not from Intel."
        )
    if "parse" in lower or "decode" in lower:
        return f"DCAP quote is malformed ({detail}). Check that the evidence is a whole quote."
    return f"DCAP quote verification failed ({detail})."
