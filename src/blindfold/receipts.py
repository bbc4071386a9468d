"""Signed inference receipts: what the server ran, on what, for whom, in which order.

This module owns the canonical tensor digest, the receipt format and its signature, the
server-side signer (one hash chain per server start), the client-side checks (one receipt,
or a stream of receipts from one server) and the offline bundle an auditor checks later.

A receipt is signed with the server's TLS key (ECDSA P-256, SHA-256). The SHA-256 of that
key's SubjectPublicKeyInfo is bound into the TEE evidence's report data, so a receipt that
verifies under the attested certificate's key was produced inside the attested TEE.
Receipts never hold tensor contents or model bytes, only their digests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from blindfold.attestation.binding import public_key_sha256
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.errors import BlindfoldError, ConfigurationError, ReceiptError
from blindfold.tensors import np_to_oip_dtype, tensor_to_bytes

RECEIPT_VERSION = 1
ZERO_SHA256 = "0" * 64
# Domain-separation prefixes: a tensor digest can never collide with a set digest or with
# any other SHA-256 Blindfold computes.
_TENSOR_DOMAIN = b"blindfold-tensor/v1"
_TENSORS_DOMAIN = b"blindfold-tensors/v1"
_HEX = frozenset("0123456789abcdef")
# Chains a ReceiptChainVerifier remembers (replicas times evidence renewals); oldest dropped.
MAX_CHAINS = 256


# --- digests ---


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def tensor_digest(name: str, array: np.ndarray) -> str:
    """Hex SHA-256 of one named tensor, independent of its memory layout and byte order.

    Hand-written encoding (not JSON, not numpy's .npy) because it must be reproducible by any
    client in any language and must hash a 1 GiB tensor without copying it: every variable
    field is length-prefixed (u64 LE) so no two (name, dtype, shape, data) tuples encode the
    same; the data is the OIP wire bytes (little-endian; BYTES as 4-byte-length-prefixed
    elements), exactly what travels in the binary tensor data extension.
    """
    digest = hashlib.sha256(_TENSOR_DOMAIN)
    for text in (name, np_to_oip_dtype(array.dtype)):
        encoded = text.encode("utf-8")
        digest.update(_u64(len(encoded)))
        digest.update(encoded)
    digest.update(_u64(len(array.shape)))
    for dim in array.shape:
        digest.update(_u64(dim))
    data = tensor_to_bytes(array)
    digest.update(_u64(len(data)))
    digest.update(data)
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """Hex SHA-256 over the sorted per-tensor digests (names are inside each digest, so the
    result does not depend on the order of the mapping)."""
    digests = sorted(tensor_digest(name, array) for name, array in tensors.items())
    digest = hashlib.sha256(_TENSORS_DOMAIN)
    digest.update(_u64(len(digests)))
    for item in digests:
        digest.update(bytes.fromhex(item))
    return digest.hexdigest()


def public_key_sha256_hex(public_key: ec.EllipticCurvePublicKey) -> str:
    """`binding.public_key_sha256` (the SHA-256 of the DER SubjectPublicKeyInfo, what report
    data binds) as lowercase hex, the form receipts carry."""
    return public_key_sha256(public_key).hex()


# --- the receipt ---


def _is_hex(value: object, length: int | None = None) -> bool:
    return (
        isinstance(value, str)
        and (length is None or len(value) == length)
        and len(value) % 2 == 0
        and set(value) <= _HEX
    )


# Strict on purpose: a receipt is evidence for an auditor, so anything not exactly in the
# format is refused rather than coerced.
_SHA_FIELDS = (
    "server_key_sha256",
    "evidence_sha256",
    "model_sha256",
    "inputs_sha256",
    "outputs_sha256",
    "previous_sha256",
)


@dataclass(frozen=True)
class Receipt:
    """One signed inference receipt. All digests are lowercase hex SHA-256."""

    version: int
    server_key_sha256: str
    evidence_sha256: str
    model_sha256: str
    inputs_sha256: str
    outputs_sha256: str
    request_id: str
    server_time: float
    client_nonce: str
    sequence: int
    previous_sha256: str
    signature: str

    def __post_init__(self) -> None:
        for name in ("version", "sequence"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ReceiptError(f"receipt {name}: expected an integer >= 0, found {value!r}")
        for name in _SHA_FIELDS:
            value = getattr(self, name)
            if not _is_hex(value, 64):
                raise ReceiptError(
                    f"receipt {name}: expected 64 lowercase hex digits, found {value!r}"
                )
        if not isinstance(self.request_id, str):
            raise ReceiptError(
                f"receipt request_id: expected a string, found {type(self.request_id).__name__}"
            )
        if not isinstance(self.server_time, float) or not np.isfinite(self.server_time):
            raise ReceiptError(
                f"receipt server_time: expected a finite float, found {self.server_time!r}"
            )
        if not _is_hex(self.client_nonce):
            raise ReceiptError(
                f"receipt client_nonce: expected lowercase hex or '', found {self.client_nonce!r}"
            )
        if not _is_hex(self.signature):
            raise ReceiptError("receipt signature: expected lowercase hex (DER ECDSA)")

    def _unsigned_fields(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["signature"]
        return fields

    def signed_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces, ASCII) of every field but the signature.

        Python's float repr is the shortest string that round-trips, so server_time survives
        a JSON round trip unchanged and a verifier rebuilds exactly the signed bytes.
        """
        return json.dumps(
            self._unsigned_fields(), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode("ascii")

    def digest(self) -> str:
        """Hex SHA-256 of signed_bytes(): what the next receipt's previous_sha256 holds."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Receipt:
        """Strict: every field present, no other field, each of its exact type."""
        if not isinstance(data, dict):
            raise ReceiptError(f"receipt: expected a JSON object, found {type(data).__name__}")
        expected = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(expected - set(data))
        extra = sorted(set(data) - expected)
        if missing or extra:
            raise ReceiptError(
                f"receipt fields: expected {sorted(expected)}, missing {missing}, "
                f"unexpected {extra}"
            )
        return cls(**data)


def _mismatch(field: str, expected: object, found: object, advice: str = "") -> ReceiptError:
    message = f"receipt {field}: expected {expected}, found {found}"
    return ReceiptError(f"{message}. {advice}" if advice else message)


# --- server side ---


class ReceiptSigner:
    """Signs receipts as one hash chain per server start; safe to call from many threads."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        server_key_sha256: str,
        evidence_sha256: str | Callable[[], str],
    ) -> None:
        """`evidence_sha256` is the hash of the standing evidence, or a function returning
        the current one (the server renews its standing evidence before it expires)."""
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ConfigurationError(
                f"receipt key: expected an ECDSA P-256 key, found curve {private_key.curve.name}"
            )
        actual = public_key_sha256_hex(private_key.public_key())
        if actual != server_key_sha256:
            # Catches wiring mistakes: receipts would never verify against the attested key.
            raise ConfigurationError(
                f"receipt signer: server_key_sha256 {server_key_sha256} is not the SHA-256 of "
                f"the signing key's SubjectPublicKeyInfo ({actual})"
            )
        self._key = private_key
        self._server_key_sha256 = server_key_sha256
        self._evidence_sha256 = (
            evidence_sha256 if callable(evidence_sha256) else (lambda: evidence_sha256)
        )
        self._lock = threading.Lock()
        self._sequence = 0
        self._previous = ZERO_SHA256

    def sign(
        self,
        model_sha256: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        request_id: str,
        client_nonce: str,
    ) -> Receipt:
        # Hash the tensors before taking the lock: it is the slow part and needs no order.
        inputs_sha256 = tensors_digest(inputs)
        outputs_sha256 = tensors_digest(outputs)
        evidence_sha256 = self._evidence_sha256()
        with self._lock:
            unsigned = Receipt(
                version=RECEIPT_VERSION,
                server_key_sha256=self._server_key_sha256,
                evidence_sha256=evidence_sha256,
                model_sha256=model_sha256,
                inputs_sha256=inputs_sha256,
                outputs_sha256=outputs_sha256,
                request_id=request_id,
                server_time=float(time.time()),
                client_nonce=client_nonce,
                sequence=self._sequence,
                previous_sha256=self._previous,
                signature="",
            )
            self._sequence += 1
            self._previous = unsigned.digest()
        # The chain links signed_bytes, which exclude the signature, so signing can happen
        # outside the lock without changing the chain.
        signature = self._key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        return dataclasses.replace(unsigned, signature=signature.hex())


# --- client side ---


def _check_equal(field: str, expected: str, found: str, advice: str = "") -> None:
    # Plain comparison: digests and nonces are public, so timing does not matter.
    if expected != found:
        raise _mismatch(field, expected, found, advice)


def _check_link(receipt: Receipt, previous: Receipt) -> None:
    _check_equal(
        "server_key_sha256",
        previous.server_key_sha256,
        receipt.server_key_sha256,
        "the previous receipt comes from another server key",
    )
    if receipt.sequence != previous.sequence + 1:
        raise _mismatch(
            "sequence",
            previous.sequence + 1,
            receipt.sequence,
            "receipts were dropped, replayed or reordered",
        )
    _check_equal(
        "previous_sha256",
        previous.digest(),
        receipt.previous_sha256,
        "the receipt does not extend the previous one",
    )


def verify_receipt(
    receipt: Receipt,
    public_key: ec.EllipticCurvePublicKey,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    outputs: Mapping[str, np.ndarray] | None = None,
    model_sha256: str | None = None,
    client_nonce: str | None = None,
    previous: Receipt | None = None,
) -> None:
    """Checks the receipt's key, signature, every datum given, and its link to `previous`.

    Raises ReceiptError naming the field, the expected and the found value.
    """
    if receipt.version != RECEIPT_VERSION:
        raise _mismatch("version", RECEIPT_VERSION, receipt.version)
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise ReceiptError("receipt key: expected an ECDSA P-256 public key")
    _check_equal(
        "server_key_sha256",
        public_key_sha256_hex(public_key),
        receipt.server_key_sha256,
        "the receipt was issued by another server key",
    )
    try:
        public_key.verify(
            bytes.fromhex(receipt.signature), receipt.signed_bytes(), ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, ValueError):
        raise ReceiptError(
            "receipt signature: does not verify under the server key "
            f"{receipt.server_key_sha256}; the receipt was altered or not signed by that key"
        ) from None
    # The first receipt of a chain, and only it, links to the all-zero digest.
    if (receipt.sequence == 0) != (receipt.previous_sha256 == ZERO_SHA256):
        raise _mismatch(
            "previous_sha256",
            ZERO_SHA256 if receipt.sequence == 0 else "a non-zero digest",
            receipt.previous_sha256,
            f"inconsistent with sequence {receipt.sequence}",
        )
    if model_sha256 is not None:
        _check_equal("model_sha256", model_sha256, receipt.model_sha256)
    if inputs is not None:
        _check_equal(
            "inputs_sha256", tensors_digest(inputs), receipt.inputs_sha256, "inputs differ"
        )
    if outputs is not None:
        _check_equal(
            "outputs_sha256", tensors_digest(outputs), receipt.outputs_sha256, "outputs differ"
        )
    if client_nonce is not None:
        _check_equal("client_nonce", client_nonce, receipt.client_nonce)
    if previous is not None:
        _check_link(receipt, previous)


class ReceiptChainVerifier:
    """Checks a client's stream of receipts, remembering the recent ones per chain: per server
    key and standing evidence. Replicas sharing one service key (README "Scaling out") each
    sign their own chain and each has its own standing evidence, which the receipt names, so
    the evidence tells their chains apart; a server renewing its evidence starts a new one.

    A client sees only its own requests' receipts, a subsequence of the server's chain, unless
    it is the server's only client; and a client running requests from several threads gets
    their receipts back in any order. So a sequence may arrive after a higher one, but never
    twice (a repeat is a replay and always fails) and never more than `window` behind the
    highest seen (older is refused as replayed or reordered beyond what concurrency explains).
    Wherever two seen receipts are neighbours (sequence n and n + 1), n + 1's previous_sha256
    must link to n, whichever arrived first (a broken link, a forked chain, always fails).
    A gap is accepted only with `allow_gaps=True`, the default for servers with several
    clients. A sole client that runs one request at a time should pass `allow_gaps=False`:
    every receipt must then directly follow the last, so a dropped one is an error. A new
    server key (e.g. a restart) starts a new chain.
    """

    def __init__(self, *, allow_gaps: bool = True, window: int = 1024) -> None:
        self.allow_gaps = allow_gaps
        self.window = window
        # (server key, evidence) -> that chain's receipts seen within the window
        self._seen: dict[tuple[str, str], _SeenChain] = {}
        self._lock = threading.Lock()

    def last(self, server_key_sha256: str, evidence_sha256: str | None = None) -> Receipt | None:
        """The highest receipt seen of that chain; without `evidence_sha256`, of the chain
        under the key that was extended last."""
        with self._lock:
            if evidence_sha256 is not None:
                seen = self._seen.get((server_key_sha256, evidence_sha256))
            else:
                chains = [c for (key, _), c in self._seen.items() if key == server_key_sha256]
                seen = chains[-1] if chains else None
            return seen.receipts[seen.newest] if seen else None

    def verify(
        self,
        receipt: Receipt,
        public_key: ec.EllipticCurvePublicKey,
        *,
        inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Mapping[str, np.ndarray] | None = None,
        model_sha256: str | None = None,
        client_nonce: str | None = None,
    ) -> None:
        """Verifies `receipt` and, only if it passes, remembers it."""
        with self._lock:
            chain = (receipt.server_key_sha256, receipt.evidence_sha256)
            seen = self._seen.get(chain) or _SeenChain()
            # Signature and data first, so a forged receipt is reported as forged, not as
            # out of order.
            verify_receipt(
                receipt,
                public_key,
                inputs=inputs,
                outputs=outputs,
                model_sha256=model_sha256,
                client_nonce=client_nonce,
                previous=seen.receipts.get(receipt.sequence - 1),
            )
            self._check_order(receipt, seen)
            seen.add(receipt, self.window)
            self._seen.pop(chain, None)  # re-inserted last: the newest chain is last
            self._seen[chain] = seen
            while len(self._seen) > MAX_CHAINS:  # evidence renewals over a long life
                del self._seen[next(iter(self._seen))]

    def _check_order(self, receipt: Receipt, seen: _SeenChain) -> None:
        if not seen.receipts:
            return
        newest = seen.newest
        if receipt.sequence in seen.receipts:
            raise _mismatch(
                "sequence", "one not seen before", receipt.sequence, "the receipt was replayed"
            )
        if receipt.sequence < newest - self.window:
            raise _mismatch(
                "sequence",
                f"at least {newest - self.window} (the newest seen, {newest}, minus the "
                f"window of {self.window})",
                receipt.sequence,
                "receipts were replayed or reordered",
            )
        if not self.allow_gaps and receipt.sequence != newest + 1:
            raise _mismatch(
                "sequence",
                newest + 1,
                receipt.sequence,
                "receipts were dropped or reordered (allow_gaps=False)",
            )
        following = seen.receipts.get(receipt.sequence + 1)
        if following is not None:
            _check_link(following, receipt)


@dataclass
class _SeenChain:
    """The receipts of one chain seen within the window, by sequence in arrival order."""

    receipts: dict[int, Receipt] = field(default_factory=dict)
    newest: int = -1

    def add(self, receipt: Receipt, window: int) -> None:
        self.receipts[receipt.sequence] = receipt
        self.newest = max(self.newest, receipt.sequence)
        # Receipts arrive in nearly sequence order, so the first to arrive are the first to
        # leave the window: dropping from the front costs O(1) per receipt, where scanning
        # the whole window did not. A late arrival leaves once those before it have.
        while self.receipts:
            oldest = next(iter(self.receipts))
            if oldest >= self.newest - window:
                break
            del self.receipts[oldest]


# --- offline bundle ---


def _bundle_error(path: object, problem: str) -> ReceiptError:
    return ReceiptError(
        f"saved receipt {path}: {problem}; expected JSON with 'receipt', 'evidence' and "
        "'certificate' (PEM)"
    )


@dataclass
class SavedReceipt:
    """A receipt with the evidence and certificate that make it checkable offline."""

    receipt: Receipt
    evidence: Evidence
    certificate_pem: str

    def to_json(self) -> dict[str, Any]:
        return {
            "receipt": self.receipt.to_json(),
            "evidence": self.evidence.to_json(),
            "certificate": self.certificate_pem,
        }

    @classmethod
    def from_json(cls, data: Any, *, source: object = "<json>") -> SavedReceipt:
        expected = {"receipt", "evidence", "certificate"}
        if not isinstance(data, dict) or set(data) != expected:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise _bundle_error(source, f"found keys {found}")
        if not isinstance(data["certificate"], str):
            raise _bundle_error(source, "'certificate' is not a PEM string")
        try:
            evidence = Evidence.from_json(data["evidence"])
        except BlindfoldError as exc:
            raise _bundle_error(source, f"evidence is malformed ({exc})") from None
        return cls(
            receipt=Receipt.from_json(data["receipt"]),
            evidence=evidence,
            certificate_pem=data["certificate"],
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> SavedReceipt:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise _bundle_error(path, f"cannot be read ({exc})") from None
        return cls.from_json(data, source=path)

    def verify(
        self,
        *,
        verify_evidence: Callable[[Evidence, bytes], Verdict],
        inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Mapping[str, np.ndarray] | None = None,
        model_sha256: str | None = None,
        client_nonce: str | None = None,
    ) -> Verdict:
        """Checks the evidence (with the injected verifier), then the receipt against it.

        `verify_evidence(evidence, certificate_der)` must check the evidence signature, the
        policy, and that the report data binds the certificate's public key; it is injected
        so this module does not depend on the policy module.
        """
        try:
            certificate = x509.load_pem_x509_certificate(self.certificate_pem.encode())
        except ValueError:
            raise ReceiptError("saved receipt certificate: not a valid PEM certificate") from None
        public_key = certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise _mismatch("certificate key", "an ECDSA P-256 key", type(public_key).__name__)
        verdict = verify_evidence(
            self.evidence, certificate.public_bytes(serialization.Encoding.DER)
        )
        # Defence in depth: the injected verifier is meant to check this binding, but the
        # whole value of a receipt rests on it, so it is checked here too (DESIGN.md: report
        # data = SHA-256(SPKI) || nonce-or-zeros).
        key_sha256 = public_key_sha256_hex(public_key)
        _check_equal(
            "certificate binding",
            key_sha256,
            verdict.report_data[:32].hex(),
            "the evidence's report data does not bind this certificate's key",
        )
        _check_equal(
            "evidence_sha256",
            hashlib.sha256(self.evidence.evidence).hexdigest(),
            self.receipt.evidence_sha256,
            "the receipt was issued under other evidence",
        )
        verify_receipt(
            self.receipt,
            public_key,
            inputs=inputs,
            outputs=outputs,
            model_sha256=model_sha256,
            client_nonce=client_nonce,
        )
        return verdict
