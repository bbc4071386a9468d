"""The simulation TEE: evidence format, its (trivial) verifier, and the code measurement.

Simulation evidence is signed by a key the server process makes for itself, so anyone can
produce it for any measurement: it proves nothing and exists only so the whole protocol runs
on machines without TEE hardware. Clients refuse it unless the caller opts in.

The measurement is a reproducible SHA-256 over the installed `blindfold` package's own code
(sorted relative paths and file digests), so changing one line of server code changes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from blindfold.attestation.verdict import Verdict
from blindfold.errors import EvidenceError

FORMAT = "blindfold-simulation-evidence/1"
WARNING = (
    "SIMULATION TEE: this evidence is signed by a key the server made for itself. "
    "It protects nothing: the host can read every model and tensor."
)
_MEASURED_SUFFIXES = (".py", ".pem", ".der", ".template")


def package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def measure_package(root: Path | None = None) -> str:
    """SHA-256 over `<file sha256>  <relative path>` lines of every code file, sorted by path."""
    root = root or package_root()
    lines = []
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        if path.suffix not in _MEASURED_SUFFIXES:
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(root).as_posix()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _signed_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class SimulationSigner:
    """The server-side half: produces simulation evidence for given report data."""

    def __init__(self, measurement: str | None = None, lifetime: int | None = None) -> None:
        self.measurement = measurement or measure_package()
        # Evidence normally never expires; a lifetime makes it behave like hardware evidence
        # whose collateral or certificate runs out, so expiry handling runs without hardware.
        self.lifetime = lifetime
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._public_der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def evidence(self, report_data: bytes) -> bytes:
        body: dict[str, Any] = {
            "format": FORMAT,
            "warning": WARNING,
            "measurement": self.measurement,
            "report_data": report_data.hex(),
            "signer": base64.b64encode(self._public_der).decode(),
        }
        if self.lifetime is not None:
            now = int(time.time())
            body.update(valid_from=now, valid_until=now + self.lifetime)
        signature = self._key.sign(_signed_body(body), ec.ECDSA(hashes.SHA256()))
        return json.dumps({**body, "signature": base64.b64encode(signature).decode()}).encode()


def verify(evidence: bytes, collateral: dict[str, bytes], at: int) -> Verdict:
    """Checks the format, the self-signature (integrity only, never authenticity) and, when
    the evidence carries one, its validity window."""
    del collateral  # simulation evidence has no collateral
    try:
        document = json.loads(evidence)
        signature = base64.b64decode(document.pop("signature"), validate=True)
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}")
        report_data = bytes.fromhex(document["report_data"])
        measurement = str(document["measurement"])
        signer = serialization.load_der_public_key(base64.b64decode(document["signer"]))
        window = _window(document)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EvidenceError(
            f"simulation evidence is malformed ({exc}); expected {FORMAT} JSON. "
            "Check that the server is a Blindfold server of a compatible version."
        ) from None
    if not isinstance(signer, ec.EllipticCurvePublicKey):
        raise EvidenceError("simulation evidence signer is not an EC key")
    try:
        signer.verify(signature, _signed_body(document), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceError(
            "simulation evidence signature does not verify: the evidence was altered in transit"
        ) from None
    if len(report_data) != 64:
        raise EvidenceError(f"simulation report data is {len(report_data)} bytes, expected 64")
    if window is not None and not window[0] <= at <= window[1]:
        raise EvidenceError(
            f"simulation evidence expired or not yet valid at {at}: it is valid from "
            f"{window[0]} to {window[1]}. Fetch fresh evidence from the server."
        )
    return Verdict(
        kind="simulation",
        measurements={"measurement": measurement},
        report_data=report_data,
        valid_from=window[0] if window else None,
        valid_until=window[1] if window else None,
    )


def _window(document: dict[str, Any]) -> tuple[int, int] | None:
    if "valid_until" not in document:
        return None
    start, end = document["valid_from"], document["valid_until"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        raise ValueError("valid_from/valid_until are not integers")
    return start, end
