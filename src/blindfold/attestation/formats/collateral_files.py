"""The collateral files a verifier needs beside the evidence, as `Evidence.collateral` names
them (the file names of a vector folder in the attestation store).

This module owns: the file names (Intel PCS's seven DCAP files, dcap-qvl's one-file JSON,
the AMD VCEK and ASK/ARK chain), cutting Intel's signed JSON (TCB info, QE identity) into the
exact signed text and its signature, assembling dcap-qvl's `QuoteCollateralV3` JSON from the
PCS files, reading CRLs in the encodings found in the wild, reading Intel's timestamps, and
the validity window of a DCAP collateral set.

Decided once for both sides: the signed text is cut by a JSON span parser (keys in any order,
any whitespace; the value's exact bytes are kept because the signature covers them), never by
a regular expression; a timestamp without a zone is UTC (Intel writes UTC), never local time;
the window also ends at the earliest certificate expiry, not only at the nextUpdate dates.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from blindfold.errors import EvidenceError

# --- Intel DCAP (SGX, TDX) ---

TCB_INFO = "tcb_info.json"
TCB_INFO_ISSUER_CHAIN = "tcb_info_issuer_chain.pem"
QE_IDENTITY = "qe_identity.json"
QE_IDENTITY_ISSUER_CHAIN = "qe_identity_issuer_chain.pem"
PCK_CRL = "pck_crl.der"
PCK_CRL_ISSUER_CHAIN = "pck_crl_issuer_chain.pem"
ROOT_CA_CRL = "root_ca_crl.der"
# The files Intel PCS serves (bodies and issuer-chain headers), as a server stores them.
PCS_FILES = (
    TCB_INFO,
    TCB_INFO_ISSUER_CHAIN,
    QE_IDENTITY,
    QE_IDENTITY_ISSUER_CHAIN,
    PCK_CRL,
    PCK_CRL_ISSUER_CHAIN,
    ROOT_CA_CRL,
)
# The same collateral as one dcap-qvl QuoteCollateralV3 JSON document.
DCAP_QVL_JSON = "collateral.dcap-qvl.json"

# --- AMD SEV-SNP ---

VCEK = "vcek.der"  # the chip's endorsement key certificate (DER or PEM)
VLEK = "vlek.der"  # a cloud provider's endorsement key (not verified by Blindfold)
ASK_ARK = "ask_ark.pem"  # ASK + ARK, KDS cert_chain order

FETCH_ADVICE = "fetch fresh collateral for this quote from Intel PCS or your PCCS"


def dcap_qvl_json(collateral: dict[str, bytes]) -> str:
    """The dcap-qvl `QuoteCollateralV3` JSON: as given, or assembled from the PCS files."""
    if DCAP_QVL_JSON in collateral:
        try:
            return collateral[DCAP_QVL_JSON].decode("utf-8")
        except UnicodeDecodeError:
            raise EvidenceError(f"{DCAP_QVL_JSON} is not UTF-8 text; {FETCH_ADVICE}.") from None
    return assemble_dcap_qvl_json(collateral)


def assemble_dcap_qvl_json(files: dict[str, bytes]) -> str:
    """Builds dcap-qvl's collateral JSON from the split files Intel PCS serves (dcap-qvl
    reads only its own JSON)."""
    missing = [name for name in PCS_FILES if name not in files]
    if missing:
        raise EvidenceError(
            f"DCAP collateral is incomplete: no {DCAP_QVL_JSON} and missing "
            f"{', '.join(missing)}; {FETCH_ADVICE}."
        )
    tcb_body, tcb_sig = signed_body(files[TCB_INFO], "tcbInfo", TCB_INFO)
    qe_body, qe_sig = signed_body(files[QE_IDENTITY], "enclaveIdentity", QE_IDENTITY)
    return json.dumps(
        {
            "pck_crl_issuer_chain": _pem_text(files[PCK_CRL_ISSUER_CHAIN], PCK_CRL_ISSUER_CHAIN),
            "root_ca_crl": crl_der(files[ROOT_CA_CRL], ROOT_CA_CRL).hex(),
            "pck_crl": crl_der(files[PCK_CRL], PCK_CRL).hex(),
            "tcb_info_issuer_chain": _pem_text(files[TCB_INFO_ISSUER_CHAIN], TCB_INFO_ISSUER_CHAIN),
            "tcb_info": tcb_body,
            "tcb_info_signature": tcb_sig,
            "qe_identity_issuer_chain": _pem_text(
                files[QE_IDENTITY_ISSUER_CHAIN], QE_IDENTITY_ISSUER_CHAIN
            ),
            "qe_identity": qe_body,
            "qe_identity_signature": qe_sig,
        },
        indent=1,
    )


def signed_body(data: bytes, key: str, name: str) -> tuple[str, str]:
    """(exact text of the top-level `key` value, hex signature) of an Intel PCS response
    such as ``{"tcbInfo": {...}, "signature": "<hex>"}``. The signature covers the exact
    bytes of the value, so it is cut out of the text, never parsed and re-serialized."""
    try:
        text = data.decode("utf-8")
        spans = _top_level_spans(text)
        start, end = spans[key]
        if not text[start:end].startswith("{"):
            raise ValueError("the signed value is not an object")
        signature = json.loads(text[slice(*spans["signature"])])
        if not isinstance(signature, str):
            raise TypeError("the signature is not a string")
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
        if key in spans:
            # Two values under one key: which one a reader takes is ambiguous.
            raise ValueError(f"duplicate key {key!r}")
        spans[key] = (start, end)
        pos = _skip_ws(text, end)
        if text[pos : pos + 1] == ",":
            pos = _skip_ws(text, pos + 1)
        elif text[pos : pos + 1] != "}":
            raise ValueError("malformed object")
    if text[pos + 1 :].strip():
        raise ValueError("trailing data after the object")
    return spans


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _pem_text(data: bytes, name: str) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise EvidenceError(f"{name} is not a PEM certificate chain; {FETCH_ADVICE}.") from None


def crl_der(data: bytes, name: str) -> bytes:
    """A CRL as DER. PCS serves DER, PCCS serves the root CA CRL hex-encoded, and PEM copies
    are common; dcap-qvl wants DER (as hex in its JSON)."""
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        try:
            return x509.load_pem_x509_crl(stripped).public_bytes(Encoding.DER)
        except ValueError:
            raise EvidenceError(f"{name} is not a PEM or DER CRL; {FETCH_ADVICE}.") from None
    if stripped and all(c in b"0123456789abcdefABCDEF" for c in stripped):
        return bytes.fromhex(stripped.decode("ascii"))
    return data


def timestamp(stamp: Any) -> int:
    """Unix seconds of an Intel collateral date such as ``2025-07-19T10:01:18Z``. Intel's
    dates are UTC: a stamp without an offset is read as UTC, never as local time."""
    if not isinstance(stamp, str):
        raise ValueError(f"not a date string: {stamp!r}")
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def validity_window(qvl_json: str, pck_chain_pem: bytes = b"") -> tuple[int, int]:
    """(start, end) in unix seconds in which every piece of the collateral, and every
    certificate in it and in the quote's PCK chain, is valid.

    The start is the latest issueDate / CRL thisUpdate / notBefore (dcap-qvl accepts a CRL
    whose thisUpdate is still in the future, so verifiers enforce it themselves); the end is
    the earliest nextUpdate / notAfter. Servers refresh collateral before the end.
    """
    try:
        document = json.loads(qvl_json)
        starts: list[int] = []
        ends: list[int] = []
        for key in ("tcb_info", "qe_identity"):
            body = json.loads(document[key])
            starts.append(timestamp(body["issueDate"]))
            ends.append(timestamp(body["nextUpdate"]))
        for key in ("root_ca_crl", "pck_crl"):
            crl = x509.load_der_x509_crl(bytes.fromhex(document[key]))
            starts.append(int(crl.last_update_utc.timestamp()))
            if crl.next_update_utc is not None:
                ends.append(int(crl.next_update_utc.timestamp()))
        pems = [
            str(document[key]).encode()
            for key in ("tcb_info_issuer_chain", "qe_identity_issuer_chain", "pck_crl_issuer_chain")
        ]
        for pem in [*pems, pck_chain_pem] if pck_chain_pem else pems:
            for cert in x509.load_pem_x509_certificates(pem.rstrip(b"\0")):
                starts.append(int(cert.not_valid_before_utc.timestamp()))
                ends.append(int(cert.not_valid_after_utc.timestamp()))
    except (ValueError, KeyError, TypeError) as exc:
        raise EvidenceError(
            f"DCAP collateral holds an unreadable date, certificate or CRL ({exc}); {FETCH_ADVICE}."
        ) from None
    return max(starts), min(ends)
