"""Step 4 of the attested channel, client side: fetch the server's evidence, verify it under
the policy, and return what to pin. Nothing but the attestation request (and a nonce) is
sent before this succeeds.

The SDK asks for the identity binding (`binding=identity`, `attestation.binding`): the evidence
then binds a document naming the TLS key and the HPKE key configurations. A server that
predates it answers with the plain key binding, which the TLS channel still accepts; the
Oblivious HTTP channel needs the document, since that is what binds the HPKE key.

The attestation answer arrives before any trust exists (anyone on the path can write it), so
what the SDK reads of it is bounded in size (`MAX_ATTESTATION_BYTES`) and JSON nesting depth
(`MAX_ATTESTATION_DEPTH`) before it is parsed any further.
"""

from __future__ import annotations

import json
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindfold import ohttp
from blindfold.attestation.binding import IDENTITY_BINDING, IdentityDocument, spki_sha256
from blindfold.attestation.deployment import DeploymentIdentity, Endorsement, identify
from blindfold.attestation.kinds import VerifierOptions
from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.attestation.verify import verify_server_evidence
from blindfold.client.http11 import ResponseTooLarge
from blindfold.client.transport import (
    Endpoint,
    HttpRequest,
    PinnedConnection,
    unverified_context,
)
from blindfold.errors import AttestationError, EvidenceError, PinnedKeyMismatch

# Real documents (DCAP quote + PCK chain + CRLs + TCB info, or a Nitro document) are tens
# of KiB; a few MiB leaves room for large CRLs without letting a hostile answer fill memory.
MAX_ATTESTATION_BYTES = 4 << 20
# Real documents nest three or four levels deep.
MAX_ATTESTATION_DEPTH = 16

# "tls": payloads over TLS pinned to the attested key (the default). "ohttp": payloads as
# Oblivious HTTP messages encrypted to the attested HPKE key, over ordinary TLS to whatever
# terminates it (a proxy or load balancer).
Channel = Literal["tls", "ohttp"]
CHANNELS = ("tls", "ohttp")


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
    deployment: DeploymentIdentity = field(default_factory=DeploymentIdentity)
    # The identity document the evidence binds (None from a server that predates it).
    identity: IdentityDocument | None = None

    def hpke_key_config(self) -> ohttp.KeyConfig:
        """The first HPKE key configuration the evidence binds that uses this SDK's suite."""
        if self.identity is None:
            raise EvidenceError(
                "the server's evidence binds no identity document, so no HPKE key: it "
                "predates the Oblivious HTTP channel (use channel='tls'), or something on the "
                "path removed the document"
            )
        for raw in self.identity.hpke_key_configs:
            try:
                config = ohttp.KeyConfig.decode(raw)
            except ohttp.OhttpError:
                continue
            if config.supports_our_suite():
                return config
        raise EvidenceError(
            "the server's identity document names no HPKE key configuration with X25519, "
            "HKDF-SHA256 and AES-128-GCM"
        )

    def describe(self) -> dict[str, Any]:
        return {
            **self.verdict.describe(),
            "public_key_sha256": self.spki_sha256.hex(),
            "nonce": self.nonce.hex() if self.nonce else None,
            "deployment": self.deployment.describe(),
        }


def fetch_attestation(
    endpoint: Endpoint,
    nonce: bytes | None,
    timeout: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> tuple[dict[str, Any], bytes]:
    """GET /v2/attestation (asking for the identity binding); returns the document and the
    certificate the TLS peer presented. `context`: the TLS to a proxy, for the ohttp channel
    (default: none checked, since the evidence authenticates itself)."""
    connection = PinnedConnection(endpoint, context or unverified_context(), None, timeout)
    nonce_parameter = f"nonce={nonce.hex()}&" if nonce is not None else ""
    path = f"/v2/attestation?{nonce_parameter}binding={IDENTITY_BINDING}"
    where = f"https://{endpoint.host}:{endpoint.port}"
    try:
        # Bounded before trust: the declared length is checked before anything is allocated,
        # and a chunked answer is cut off at the bound.
        response, _ = connection.exchange(HttpRequest("GET", path), MAX_ATTESTATION_BYTES)
    except ResponseTooLarge:
        raise AttestationError(
            f"the attestation answer from {where} is too large (more than "
            f"{MAX_ATTESTATION_BYTES} bytes); a Blindfold server sends tens of KiB. Refusing "
            "it unread: this is not a Blindfold server, or someone on the path is attacking "
            "the client"
        ) from None
    except OSError as exc:
        raise AttestationError(f"cannot fetch attestation from {where}: {exc}") from None
    finally:
        peer = connection.peer_certificate
        connection.close()
    body = response.body
    if response.status != 200:
        raise AttestationError(
            f"the server answered {response.status} to GET /v2/attestation: "
            f"{body[:300].decode(errors='replace')}"
        )
    document = _parse_bounded(body)
    return document, peer


def _parse_bounded(body: bytes | bytearray) -> dict[str, Any]:
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
    channel: Channel = "tls",
    context: ssl.SSLContext | None = None,
) -> AttestedServer:
    """Verifies the server's evidence under `policy` (code and, unless `check_deployment`
    is False, the `[deployment]` pins) and returns what to pin: the TLS key for the "tls"
    channel, the HPKE key configuration for "ohttp"."""
    nonce_bytes = secrets.token_bytes(32) if nonce else None
    document, peer_certificate = fetch_attestation(endpoint, nonce_bytes, timeout, context)
    evidence = Evidence.from_json(document)
    identity = None
    if document.get("identity_document") is not None:
        identity = IdentityDocument.parse(str(document["identity_document"]).encode())
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
        identity=identity,
    )
    pin = spki_sha256(certificate_der)
    # Over the ohttp channel the TLS peer is whatever terminates TLS (a proxy); what must be
    # the attested server's is the HPKE key, which the identity document binds.
    if channel == "tls" and spki_sha256(peer_certificate) != pin:
        raise PinnedKeyMismatch(
            "the TLS connection that delivered the evidence presented public key "
            f"{spki_sha256(peer_certificate).hex()}, but the evidence binds {pin.hex()}: a "
            "proxy is relaying another server's evidence. Connect to the attested server directly, "
            "or use channel='ohttp' to go through a proxy."
        )
    endorsement = None
    if document.get("deployment_endorsement") is not None:
        endorsement = Endorsement.from_json(document["deployment_endorsement"])
        endorsement.verify(pin)
    if check_deployment and policy.deployment is not None:
        policy.deployment.verify(verdict, endorsement)
    attested = AttestedServer(
        verdict=verdict,
        evidence=evidence,
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        certificate_der=certificate_der,
        spki_sha256=pin,
        nonce=nonce_bytes,
        endorsement=endorsement,
        deployment=identify(verdict, endorsement),
        identity=identity,
    )
    if channel == "ohttp":
        attested.hpke_key_config()  # refuses evidence that binds no usable HPKE key
    return attested
