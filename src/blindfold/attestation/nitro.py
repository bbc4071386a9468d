"""Client-side verifier for AWS Nitro Enclaves attestation documents (kind ``nitro``).

This module owns the ES384 signature over the COSE Sig_structure with the enclave's leaf
certificate, and the certificate chain from the bundled AWS Nitro Enclaves Root G1 through
the document's cabundle to that leaf. The envelope's and the document's layout live in
`formats.nitro`, shared with the server.

Nitro needs no collateral: the chain travels inside the document. The `collateral` argument
is accepted for a uniform verifier signature and ignored. What the PCRs mean, and whether they
are acceptable, is the policy's job.
"""

from __future__ import annotations

import datetime as _dt
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from blindfold.attestation.formats import nitro
from blindfold.attestation.verdict import Verdict
from blindfold.errors import EvidenceError

KIND = "nitro"

ROOT_PATH = Path(__file__).resolve().parent / "roots" / "aws_nitro_root_g1.pem"
_DER = serialization.Encoding.DER


def verify(evidence: bytes, collateral: dict[str, bytes], at: int) -> Verdict:
    """Verifies a Nitro attestation document at unix time `at` and returns its claims.

    Raises EvidenceError naming the failed check when the document is malformed, its
    signature does not verify with the leaf certificate, or the chain does not reach the AWS
    Nitro root or is not valid at `at`.
    """
    del collateral  # the certificate chain is inside the document
    envelope, doc = nitro.decode(evidence)
    _check_algorithm(envelope)
    chain = _load_chain(doc)
    _check_chain(chain)
    valid_from, valid_until = _check_validity(chain, at)
    _check_signature(chain[-1], envelope)
    return _verdict(doc, valid_from, valid_until)


# --- the COSE envelope ---


def _check_algorithm(envelope: nitro.CoseSign1) -> None:
    found = envelope.algorithm()
    if found != nitro.COSE_ALG_ES384:
        raise EvidenceError(
            f"Nitro COSE protected header alg: expected {nitro.COSE_ALG_ES384} (ES384), found "
            f"{found}. Nitro documents are always ES384; this one was not made by the NSM."
        )


def _check_signature(leaf: x509.Certificate, envelope: nitro.CoseSign1) -> None:
    sig = envelope.signature
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError(
            f"Nitro leaf certificate key: expected ECDSA P-384, found {type(key).__name__}."
        )
    if len(sig) != nitro.ES384_SIGNATURE_LEN:
        raise EvidenceError(
            f"Nitro COSE signature: expected {nitro.ES384_SIGNATURE_LEN} bytes (r || s), found "
            f"{len(sig)}. The document is corrupt."
        )
    r = int.from_bytes(sig[:48], "big")
    s = int.from_bytes(sig[48:], "big")
    to_be_signed = envelope.to_be_signed()
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError(
            "Nitro COSE signature does not verify with the leaf certificate (ES384 over the "
            "Sig_structure): the document was altered after the enclave's NSM signed it. Do "
            "not trust this server."
        ) from None


# --- the certificate chain ---


@lru_cache(maxsize=1)
def bundled_root() -> x509.Certificate:
    """The AWS Nitro Enclaves Root G1 certificate bundled with Blindfold."""
    return x509.load_pem_x509_certificate(ROOT_PATH.read_bytes())


def _load_chain(doc: dict[str, Any]) -> list[x509.Certificate]:
    """Root first, leaf last: cabundle[0] (the root), cabundle[1:], certificate."""
    blobs = [*doc["cabundle"], doc["certificate"]]
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
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the verdict ---


def _verdict(doc: dict[str, Any], valid_from: int, valid_until: int) -> Verdict:
    pcrs: dict[int, bytes] = doc["pcrs"]
    measurements: dict[str, Any] = {
        f"pcr{index}": pcrs[index].hex() for index in nitro.REPORTED_PCRS if index in pcrs
    }
    measurements["module_id"] = doc["module_id"]
    return Verdict(
        kind=KIND,
        measurements=measurements,
        report_data=doc.get("user_data") or b"",
        debug=all(pcrs[index] == bytes(nitro.PCR_LEN) for index in nitro.DEBUG_PCRS),
        valid_from=valid_from,
        valid_until=valid_until,
        nonce=doc.get("nonce"),
        public_key=doc.get("public_key"),
    )
