"""Client-side verifier for AWS Nitro Enclaves attestation documents (kind ``nitro``).

This module owns: decoding the COSE_Sign1 envelope (RFC 9052, tagged or untagged) and the
attestation document inside it (AWS "Verifying the root of trust": module_id, digest,
timestamp, pcrs, certificate, cabundle, public_key, user_data, nonce), the ES384 signature
over the COSE Sig_structure with the enclave's leaf certificate, and the certificate chain
from the bundled AWS Nitro Enclaves Root G1 through the document's cabundle to that leaf.

Nitro needs no collateral: the chain travels inside the document. The `collateral` argument
is accepted for a uniform verifier signature and ignored. What the PCRs mean, and whether they
are acceptable, is the policy's job.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from blindfold.attestation.verdict import Verdict
from blindfold.errors import EvidenceError

KIND = "nitro"

COSE_SIGN1_TAG = 18
COSE_HEADER_ALG = 1
COSE_ALG_ES384 = -35
ES384_SIGNATURE_LEN = 96  # raw r || s, 48 bytes each
PCR_LEN = 48  # SHA-384, the only digest Nitro documents use
REPORTED_PCRS = range(0, 9)  # PCR0..PCR8 are the ones AWS defines (5-7 reserved)
DEBUG_PCRS = (0, 1, 2)  # all-zero in enclaves started with --debug-mode

ROOT_PATH = Path(__file__).resolve().parent / "roots" / "aws_nitro_root_g1.pem"
_DER = serialization.Encoding.DER


def verify(evidence: bytes, collateral: dict[str, bytes], at: int) -> Verdict:
    """Verifies a Nitro attestation document at unix time `at` and returns its claims.

    Raises EvidenceError naming the failed check when the document is malformed, its
    signature does not verify with the leaf certificate, or the chain does not reach the AWS
    Nitro root or is not valid at `at`.
    """
    del collateral  # the certificate chain is inside the document
    protected, payload, signature = _decode_cose_sign1(evidence)
    _check_algorithm(protected)
    doc = _decode_document(payload)
    chain = _load_chain(doc)
    _check_chain(chain)
    valid_from, valid_until = _check_validity(chain, at)
    _check_signature(chain[-1], protected, payload, signature)
    return _verdict(doc, valid_from, valid_until)


# --- the COSE envelope ---


def _decode_cose_sign1(evidence: bytes) -> tuple[bytes, bytes, bytes]:
    if not isinstance(evidence, (bytes, bytearray)) or not evidence:
        raise EvidenceError(
            "Nitro attestation document is empty or not bytes. Pass the raw COSE_Sign1 "
            "document the enclave got from the NSM, as published at GET /v2/attestation."
        )
    try:
        obj = cbor2.loads(bytes(evidence))
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError...)
        raise EvidenceError(
            f"Nitro attestation document is not valid CBOR ({type(exc).__name__}: {exc}); "
            "it may be truncated or not a Nitro document. Fetch the evidence again."
        ) from None
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != COSE_SIGN1_TAG:
            raise EvidenceError(
                f"Nitro attestation document: expected COSE_Sign1 (CBOR tag {COSE_SIGN1_TAG}), "
                f"found CBOR tag {obj.tag}."
            )
        obj = obj.value
    if (
        # cbor2 decodes the array inside a tag as a tuple and its maps as frozendicts
        not isinstance(obj, (list, tuple))
        or len(obj) != 4
        or not isinstance(obj[0], bytes)
        or not isinstance(obj[1], Mapping)
        or not isinstance(obj[2], bytes)
        or not isinstance(obj[3], bytes)
    ):
        raise EvidenceError(
            "Nitro attestation document: expected a COSE_Sign1 array [protected: bstr, "
            f"unprotected: map, payload: bstr, signature: bstr], found {_shape(obj)}. "
            "This is not a Nitro attestation document."
        )
    return obj[0], obj[2], obj[3]


def _shape(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(type(x).__name__ for x in obj) + "]"
    return type(obj).__name__


def _check_algorithm(protected: bytes) -> None:
    try:
        header = cbor2.loads(protected) if protected else {}
    except Exception:
        header = None
    if not isinstance(header, dict) or header.get(COSE_HEADER_ALG) != COSE_ALG_ES384:
        found = header.get(COSE_HEADER_ALG) if isinstance(header, dict) else "unreadable"
        raise EvidenceError(
            f"Nitro COSE protected header alg: expected {COSE_ALG_ES384} (ES384), found "
            f"{found}. Nitro documents are always ES384; this one was not made by the NSM."
        )


def _check_signature(leaf: x509.Certificate, protected: bytes, payload: bytes, sig: bytes) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError(
            f"Nitro leaf certificate key: expected ECDSA P-384, found {type(key).__name__}."
        )
    if len(sig) != ES384_SIGNATURE_LEN:
        raise EvidenceError(
            f"Nitro COSE signature: expected {ES384_SIGNATURE_LEN} bytes (r || s), found "
            f"{len(sig)}. The document is corrupt."
        )
    r = int.from_bytes(sig[:48], "big")
    s = int.from_bytes(sig[48:], "big")
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError(
            "Nitro COSE signature does not verify with the leaf certificate (ES384 over the "
            "Sig_structure): the document was altered after the enclave's NSM signed it. Do "
            "not trust this server."
        ) from None


# --- the attestation document ---


def _decode_document(payload: bytes) -> dict[str, Any]:
    try:
        doc = cbor2.loads(payload)
    except Exception as exc:
        raise EvidenceError(
            f"Nitro attestation document payload is not valid CBOR ({type(exc).__name__})."
        ) from None
    if not isinstance(doc, dict):
        raise EvidenceError(
            f"Nitro attestation document payload: expected a map, found {type(doc).__name__}."
        )
    _require(doc, "module_id", str)
    _require(doc, "digest", str)
    _require(doc, "timestamp", int)
    _require(doc, "pcrs", dict)
    _require(doc, "certificate", bytes)
    _require(doc, "cabundle", list)
    for name in ("public_key", "user_data", "nonce"):
        if doc.get(name) is not None and not isinstance(doc[name], bytes):
            raise EvidenceError(
                f"Nitro attestation document field {name!r}: expected bytes or null, found "
                f"{type(doc[name]).__name__}."
            )
    if doc["digest"] != "SHA384":
        raise EvidenceError(
            f"Nitro attestation document digest: expected 'SHA384', found {doc['digest']!r}."
        )
    for index, value in doc["pcrs"].items():
        if not isinstance(index, int) or not isinstance(value, bytes) or len(value) != PCR_LEN:
            raise EvidenceError(
                f"Nitro attestation document PCR {index!r}: expected {PCR_LEN} bytes "
                "(SHA-384), found something else. The document is corrupt."
            )
    for index in DEBUG_PCRS:
        if index not in doc["pcrs"]:
            raise EvidenceError(f"Nitro attestation document has no PCR{index}.")
    return doc


def _require(doc: dict[str, Any], name: str, kind: type) -> None:
    if name not in doc:
        raise EvidenceError(f"Nitro attestation document has no {name!r} field.")
    # bool is an int subclass; a boolean timestamp is still malformed
    if not isinstance(doc[name], kind) or isinstance(doc[name], bool):
        raise EvidenceError(
            f"Nitro attestation document field {name!r}: expected {kind.__name__}, found "
            f"{type(doc[name]).__name__}."
        )


# --- the certificate chain ---


@lru_cache(maxsize=1)
def bundled_root() -> x509.Certificate:
    """The AWS Nitro Enclaves Root G1 certificate bundled with Blindfold."""
    return x509.load_pem_x509_certificate(ROOT_PATH.read_bytes())


def _load_chain(doc: dict[str, Any]) -> list[x509.Certificate]:
    """Root first, leaf last: cabundle[0] (the root), cabundle[1:], certificate."""
    blobs = list(doc["cabundle"]) + [doc["certificate"]]
    if len(doc["cabundle"]) == 0:
        raise EvidenceError(
            "Nitro attestation document has an empty cabundle; expected the AWS Nitro root "
            "first. The document was not made by the NSM."
        )
    chain = []
    for position, blob in enumerate(blobs):
        what = "certificate" if position == len(blobs) - 1 else f"cabundle[{position}]"
        if not isinstance(blob, bytes):
            raise EvidenceError(f"Nitro {what}: expected DER bytes, found {type(blob).__name__}.")
        try:
            chain.append(x509.load_der_x509_certificate(blob))
        except ValueError as exc:
            raise EvidenceError(f"Nitro {what} is not a DER certificate ({exc}).") from None
    return chain


def _check_chain(chain: list[x509.Certificate]) -> None:
    root = bundled_root()
    if chain[0].public_bytes(_DER) != root.public_bytes(_DER):
        raise EvidenceError(
            "Nitro cabundle[0] is not the AWS Nitro Enclaves Root G1 bundled with Blindfold "
            f"(found subject {chain[0].subject.rfc4514_string()}, SHA-256 "
            f"{chain[0].fingerprint(hashes.SHA256()).hex()}, expected "
            f"{root.fingerprint(hashes.SHA256()).hex()}). Do not trust this server."
        )
    for issuer, cert in pairwise(chain):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise EvidenceError(
                f"Nitro certificate {cert.subject.rfc4514_string()} is not signed by "
                f"{issuer.subject.rfc4514_string()} ({type(exc).__name__}: {exc}). The chain "
                "does not lead to AWS; do not trust this server."
            ) from None


def _check_validity(chain: list[x509.Certificate], at: int) -> tuple[int, int]:
    for cert in chain:
        start = int(cert.not_valid_before_utc.timestamp())
        end = int(cert.not_valid_after_utc.timestamp())
        if not start <= at <= end:
            raise EvidenceError(
                f"Nitro certificate {cert.subject.rfc4514_string()} is not valid at {_utc(at)}: "
                f"valid {_utc(start)} .. {_utc(end)}. Nitro leaf certificates live 3 hours; "
                "ask the server for fresh evidence (or check the clock)."
            )
    valid_from = max(int(c.not_valid_before_utc.timestamp()) for c in chain)
    valid_until = min(int(c.not_valid_after_utc.timestamp()) for c in chain)
    return valid_from, valid_until


def _utc(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the verdict ---


def _verdict(doc: dict[str, Any], valid_from: int, valid_until: int) -> Verdict:
    pcrs: dict[int, bytes] = doc["pcrs"]
    measurements: dict[str, Any] = {
        f"pcr{index}": pcrs[index].hex() for index in REPORTED_PCRS if index in pcrs
    }
    measurements["module_id"] = doc["module_id"]
    return Verdict(
        kind=KIND,
        measurements=measurements,
        report_data=doc.get("user_data") or b"",
        debug=all(pcrs[index] == bytes(PCR_LEN) for index in DEBUG_PCRS),
        valid_from=valid_from,
        valid_until=valid_until,
        nonce=doc.get("nonce"),
        public_key=doc.get("public_key"),
    )
