"""Step 4 of the attested channel, client side: fetch the server's evidence, verify it under
the policy, and return what to pin. Nothing but the attestation request (and a nonce) is
sent before this succeeds.

The attestation answer arrives before any trust exists (anyone on the path can write it), so
what the SDK reads of it is bounded in size (`MAX_ATTESTATION_BYTES`) and JSON nesting depth
(`MAX_ATTESTATION_DEPTH`) before it is parsed any further.
"""

from __future__ import annotations

import http.client
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindfold.attestation.binding import spki_sha256
from blindfold.attestation.deployment import DeploymentIdentity, Endorsement, identify
from blindfold.attestation.kinds import VerifierOptions
from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.attestation.verify import verify_server_evidence
from blindfold.client.transport import (
    Endpoint,
    PinnedConnection,
    unverified_context,
)
from blindfold.errors import AttestationError, EvidenceError, PinnedKeyMismatch

# Real documents (DCAP quote + PCK chain + CRLs + TCB info, or a Nitro document) are tens
# of KiB; a few MiB leaves room for large CRLs without letting a hostile answer fill memory.
MAX_ATTESTATION_BYTES = 4 << 20
# Real documents nest three or four levels deep.
MAX_ATTESTATION_DEPTH = 16


@dataclass(frozen=True)
class AttestedServer:
    """What the client verified: the claims, the evidence, the certificate it pins, and
    the deployment the evidence (and the operator's endorsement, if any) names."""

    verdict: Verdict
    evidence: Evidence
    certificate_pem: str
    certificate_der: bytes
    spki_sha256: bytes
    nonce: bytes | None
    endorsement: Endorsement | None = None
    deployment: DeploymentIdentity = DeploymentIdentity()

    def describe(self) -> dict[str, Any]:
        return {
            **self.verdict.describe(),
            "public_key_sha256": self.spki_sha256.hex(),
            "nonce": self.nonce.hex() if self.nonce else None,
            "deployment": self.deployment.describe(),
        }


def fetch_attestation(
    endpoint: Endpoint, nonce: bytes | None, timeout: float = 30.0
) -> tuple[dict[str, Any], bytes]:
    """GET /v2/attestation; returns the document and the certificate the TLS peer presented."""
    connection = PinnedConnection(endpoint, unverified_context(), None, timeout)
    path = "/v2/attestation" + (f"?nonce={nonce.hex()}" if nonce is not None else "")
    where = f"https://{endpoint.host}:{endpoint.port}"
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = _read_bounded(response, where)
    except OSError as exc:
        raise AttestationError(f"cannot fetch attestation from {where}: {exc}") from None
    finally:
        peer = connection.peer_certificate
        connection.close()
    if response.status != 200:
        raise AttestationError(
            f"the server answered {response.status} to GET /v2/attestation: "
            f"{body[:300].decode(errors='replace')}"
        )
    document = _parse_bounded(body)
    return document, peer


def _read_bounded(response: http.client.HTTPResponse, where: str) -> bytes:
    """The body, or an error as soon as it is known to exceed MAX_ATTESTATION_BYTES."""
    too_large = AttestationError(
        f"the attestation answer from {where} is too large (more than "
        f"{MAX_ATTESTATION_BYTES} bytes); a Blindfold server sends tens of KiB. Refusing it "
        "unread: this is not a Blindfold server, or someone on the path is attacking the client"
    )
    declared = response.getheader("content-length")
    if declared is not None and declared.strip().isdigit():
        if int(declared) > MAX_ATTESTATION_BYTES:
            raise too_large
    body = response.read(MAX_ATTESTATION_BYTES + 1)
    if len(body) > MAX_ATTESTATION_BYTES:
        raise too_large
    return body


def _parse_bounded(body: bytes) -> dict[str, Any]:
    too_deep = EvidenceError(
        f"the attestation document nests JSON more than {MAX_ATTESTATION_DEPTH} levels deep; "
        "a Blindfold server's document is flat. Refusing it"
    )
    try:
        document = json.loads(body)
    except RecursionError:
        raise too_deep from None
    except ValueError:
        raise EvidenceError(
            "the attestation document is not JSON; is this a Blindfold server?"
        ) from None
    if _depth_exceeds(document, MAX_ATTESTATION_DEPTH):
        raise too_deep
    if not isinstance(document, dict):
        raise EvidenceError("the attestation document is not a JSON object")
    return document


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Iterative, so checking a hostile document cannot itself exhaust the stack."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return False


def attest(
    endpoint: Endpoint,
    policy: Policy,
    *,
    allow_simulation: bool,
    nonce: bool = True,
    at: int | None = None,
    timeout: float = 30.0,
    check_deployment: bool = True,
    options: VerifierOptions | None = None,
) -> AttestedServer:
    """Verifies the server's evidence under `policy` (code and, unless `check_deployment`
    is False, the `[deployment]` pins) and returns what to pin."""
    nonce_bytes = secrets.token_bytes(32) if nonce else None
    document, peer_certificate = fetch_attestation(endpoint, nonce_bytes, timeout)
    evidence = Evidence.from_json(document)
    try:
        certificate = x509.load_pem_x509_certificate(str(document["certificate"]).encode())
    except (KeyError, ValueError):
        raise EvidenceError("the attestation document has no valid 'certificate' PEM") from None
    certificate_der = certificate.public_bytes(serialization.Encoding.DER)
    verdict = verify_server_evidence(
        evidence,
        certificate_der,
        policy,
        nonce=nonce_bytes,
        allow_simulation=allow_simulation,
        at=at,
        options=options,
    )
    pin = spki_sha256(certificate_der)
    if spki_sha256(peer_certificate) != pin:
        raise PinnedKeyMismatch(
            "the TLS connection that delivered the evidence presented public key "
            f"{spki_sha256(peer_certificate).hex()}, but the evidence binds {pin.hex()}: a "
            "proxy is relaying another server's evidence. Connect to the attested server directly."
        )
    endorsement = None
    if document.get("deployment_endorsement") is not None:
        endorsement = Endorsement.from_json(document["deployment_endorsement"])
        endorsement.verify(pin)
    if check_deployment and policy.deployment is not None:
        policy.deployment.verify(verdict, endorsement)
    return AttestedServer(
        verdict=verdict,
        evidence=evidence,
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        certificate_der=certificate_der,
        spki_sha256=pin,
        nonce=nonce_bytes,
        endorsement=endorsement,
        deployment=identify(verdict, endorsement),
    )
