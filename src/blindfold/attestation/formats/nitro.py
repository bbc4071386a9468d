"""AWS Nitro Enclaves attestation documents: the COSE_Sign1 envelope (RFC 9052, tagged or
untagged) and the attestation document inside it (AWS "Verifying the root of trust":
module_id, digest, timestamp, pcrs, certificate, cabundle, public_key, user_data, nonce).

Decided once for both sides: only CBOR tag 18 (COSE_Sign1) or no tag is a Nitro document,
and a document missing a required field is malformed; the server used to accept any tag and
read only the certificate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509

from blindfold.errors import EvidenceError

COSE_SIGN1_TAG = 18
COSE_HEADER_ALG = 1
COSE_ALG_ES384 = -35
ES384_SIGNATURE_LEN = 96  # raw r || s, 48 bytes each
PCR_LEN = 48  # SHA-384, the only digest Nitro documents use
REPORTED_PCRS = range(0, 9)  # PCR0..PCR8 are the ones AWS defines (5-7 reserved)
DEBUG_PCRS = (0, 1, 2)  # all-zero in enclaves started with --debug-mode


@dataclass(frozen=True)
class CoseSign1:
    """The parts of a COSE_Sign1 message; `unprotected` is not signed and not used."""

    protected: bytes
    payload: bytes
    signature: bytes

    def algorithm(self) -> object:
        """The protected header's `alg` ("unreadable" when the header is not a CBOR map)."""
        try:
            header = cbor2.loads(self.protected) if self.protected else {}
        except Exception:  # cbor2 raises several types (CBORDecodeError, ValueError...)
            return "unreadable"
        return header.get(COSE_HEADER_ALG) if isinstance(header, dict) else "unreadable"

    def to_be_signed(self) -> bytes:
        """The COSE Sig_structure the ES384 signature covers."""
        return cbor2.dumps(["Signature1", self.protected, b"", self.payload])


def decode_cose_sign1(evidence: bytes) -> CoseSign1:
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
    return CoseSign1(protected=obj[0], payload=obj[2], signature=obj[3])


def _shape(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(type(x).__name__ for x in obj) + "]"
    return type(obj).__name__


def decode_document(payload: bytes) -> dict[str, Any]:
    """The attestation document, with every field's type and the PCRs' size checked."""
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


def decode(evidence: bytes) -> tuple[CoseSign1, dict[str, Any]]:
    """The envelope and the document of a Nitro attestation document."""
    envelope = decode_cose_sign1(evidence)
    return envelope, decode_document(envelope.payload)


def leaf_certificate(doc: dict[str, Any]) -> x509.Certificate:
    """The enclave's leaf certificate (`certificate`), which signs the document."""
    try:
        return x509.load_der_x509_certificate(doc["certificate"])
    except ValueError as exc:
        raise EvidenceError(f"Nitro certificate is not a DER certificate ({exc}).") from None
