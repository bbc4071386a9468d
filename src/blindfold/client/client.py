"""The SDK's client: attest, pin, then manage models and run inference.

with blindfold.connect("https://127.0.0.1:8443", allow_simulation=True) as client:
    uploaded = client.upload_model("model.onnx")
    outputs = client.run_model(uploaded.sha256, {"x": array})

A Client stays with the deployment it attested: when the server's key changes it re-attests,
and continues only if the new evidence proves the same deployment (`attestation.deployment`);
otherwise it raises `DeploymentChanged` (or asks `on_deployment_change`) and sends nothing.
It remembers the owner tokens of the models it uploaded and uses them for those models.

`channel="ohttp"` sends every request as an Oblivious HTTP message encrypted to the HPKE key
the evidence binds (`client.ohttp_channel`), through any TLS-terminating proxy (`verify=`).
Both channels are transports (`client.transport.BaseTransport`); `transport=` wraps or
replaces them, e.g. to record every exchange.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from blindfold import ohttp, oip
from blindfold.attestation.deployment import (
    Endorsement,
    OperatorPrivateKey,
    deployment_change,
)
from blindfold.attestation.kinds import VerifierOptions
from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import Evidence
from blindfold.attestation.verify import verify_server_evidence
from blindfold.client.attest import CHANNELS, AttestedServer, Channel, attest
from blindfold.client.inputs import normalize_inputs
from blindfold.client.ohttp_channel import OhttpTransport, VerifyTls, outer_tls_context
from blindfold.client.transport import (
    BaseTransport,
    Endpoint,
    HttpRequest,
    HttpResponse,
    Transport,
    pinned_context,
)
from blindfold.errors import (
    BlindfoldError,
    ConfigurationError,
    DeploymentChanged,
    InputError,
    PinnedKeyMismatch,
    ReceiptError,
    ServerError,
    server_error,
)
from blindfold.receipts import Receipt, ReceiptChainVerifier, SavedReceipt
from blindfold.sealing import ModelKey

logger = logging.getLogger("blindfold.client")

UPLOAD_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# Request bodies below this go out in one joined write; larger ones part by part.
_JOIN_BELOW = 64 * 1024
# Standing evidence kept for receipts: one per replica behind a balancer, and renewals.
MAX_STANDING_CACHED = 16

FollowKeyChanges = Literal["same-deployment", "same-code"]
# Called with (previous, current) when the server's new key passes the policy but cannot be
# shown to belong to the deployment attested first; True accepts the new server.
DeploymentChangeCallback = Callable[[AttestedServer, AttestedServer], bool]
# Called after each attestation with the attested server and the default transport to it
# (TLS pinned to its key, or the OHTTP channel); returns the transport to send through: the
# default, a wrapper of it (recording, tracing, ...) or a replacement.
TransportFactory = Callable[[AttestedServer, BaseTransport], BaseTransport]


@dataclass(frozen=True)
class UploadedModel:
    name: str
    sha256: str
    version: str
    # Returned once, for a new model: it runs, replaces, deletes and shares the model. The
    # Client that uploaded remembers it; keep it to manage the model from elsewhere.
    owner_token: str | None
    public: bool
    # The scheduling options the server applies (dynamic batching, concurrency), if any.
    scheduling: dict[str, Any] | None = None
    # The outcome of the configured warm-up (`warmup_shapes`), run before the server
    # answered: "ok", or "failed: " and why (the model loaded all the same); None: none.
    warmup: str | None = None

    @classmethod
    def from_answer(cls, answer: dict[str, Any], sent: str | None = None) -> UploadedModel:
        # On a server with open uploads the token the client sent becomes the new model's
        # owner token (the server says so and does not echo it).
        owner = sent if answer.get("owner_token_chosen") else answer.get("owner_token")
        return cls(
            name=answer["name"],
            sha256=answer["sha256"],
            version=answer["version"],
            owner_token=owner,
            public=answer["public"],
            scheduling=answer.get("scheduling"),
            warmup=answer.get("warmup"),
        )


class Outputs(dict[str, np.ndarray]):
    """Output tensors by name, in the model's declared order; `.receipt` when requested."""

    receipt: Any = None


class Client:
    """A connection to one attested Blindfold server (build it with `connect`).

    Creating it attests the server (a fresh nonce, the policy, the report-data binding) and
    pins the TLS key the evidence binds; every request then goes over that pinned key only.
    After a key change it re-attests and continues only with the same deployment. Models it
    uploads are managed with their owner token, which it remembers. Use it as a context
    manager, or call `close()`.
    """

    def __init__(
        self,
        url: str,
        *,
        policy: Policy | None = None,
        allow_simulation: bool = False,
        nonce: bool = True,
        token: str | None = None,
        timeout: float = 300.0,
        follow_key_changes: FollowKeyChanges = "same-deployment",
        on_deployment_change: DeploymentChangeCallback | None = None,
        verifier_options: VerifierOptions | None = None,
        channel: Channel = "tls",
        verify: VerifyTls = True,
        pad_buckets: tuple[int, ...] = ohttp.DEFAULT_BUCKETS,
        transport: TransportFactory | None = None,
    ) -> None:
        if channel not in CHANNELS:
            raise ConfigurationError(
                f"channel={channel!r}: use 'tls' (TLS pinned to the attested key, end to end) "
                "or 'ohttp' (messages encrypted to the attested HPKE key, through proxies)"
            )
        if any(size <= 0 for size in pad_buckets) or list(pad_buckets) != sorted(pad_buckets):
            raise ConfigurationError(
                f"pad_buckets={pad_buckets!r}: give increasing positive sizes in bytes, e.g. "
                "(1024, 4096, 65536); () sends messages unpadded"
            )
        if follow_key_changes not in ("same-deployment", "same-code"):
            raise ConfigurationError(
                f"follow_key_changes={follow_key_changes!r}: use 'same-deployment' (default: "
                "continue after a key change only on proof of the same deployment) or "
                "'same-code' (continue with any instance the policy accepts)"
            )
        self.url = url
        self.policy = policy if policy is not None else Policy.simulation()
        self.allow_simulation = allow_simulation
        self.token = token
        self.follow_key_changes = follow_key_changes
        self.on_deployment_change = on_deployment_change
        self.verifier_options = verifier_options
        # model name or "sha256:<hex>" -> owner token, for the models this Client uploaded
        self._owner_tokens: dict[str, str] = {}
        self._nonce = nonce
        self._timeout = timeout
        self._endpoint = Endpoint.parse(url)
        self._lock = threading.Lock()
        self._metadata: dict[str, dict[str, Any]] = {}
        self._receipt_chain = ReceiptChainVerifier()
        # (pinned key hash, evidence hash) -> verified standing evidence, oldest first.
        self._standing: dict[tuple[bytes, str], Evidence] = {}
        self.channel: Channel = channel
        self.pad_buckets = pad_buckets
        # The TLS to a proxy (ohttp channel only; the tls channel pins the attested key).
        self._outer_context = outer_tls_context(verify) if channel == "ohttp" else None
        self.attestation: AttestedServer = attest(
            self._endpoint,
            self.policy,
            allow_simulation=allow_simulation,
            nonce=nonce,
            timeout=min(timeout, 60.0),
            options=verifier_options,
            channel=channel,
            context=self._outer_context,
        )
        self._transport_factory = transport
        self._transport = self._new_transport()

    @property
    def transport(self) -> BaseTransport:
        """The transport this Client sends through (rebuilt after each attestation, since the
        pin changes with it). `client.transport.handle_request(HttpRequest(...))` sends a
        hand-made request over the same attested channel, e.g. to a route the Client has no
        method for (`GET /metrics`); the Client's token is not added to it."""
        return self._transport

    def _new_transport(self) -> BaseTransport:
        default = self._default_transport()
        if self._transport_factory is None:
            return default
        return self._transport_factory(self.attestation, default)

    def _default_transport(self) -> BaseTransport:
        if self._outer_context is not None:
            return OhttpTransport(
                self._endpoint,
                self._outer_context,
                self.attestation.hpke_key_config(),
                self.pad_buckets,
                self._timeout,
            )
        return Transport(
            self._endpoint,
            pinned_context(self.attestation.certificate_pem),
            self.attestation.spki_sha256,
            self._timeout,
        )

    # --- plumbing ---

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | Any = None,
        headers: Mapping[str, str] | None = None,
        *,
        token: str | None = None,
        content_length: int | None = None,
        body_factory: Callable[[], Any] | None = None,
    ) -> HttpResponse:
        send = dict(headers or {})
        bearer = token if token is not None else self.token
        if bearer:
            send["Authorization"] = f"Bearer {bearer}"
        transport = self._transport
        if self._attestation_expired():
            # The verdict's collateral (or Nitro certificate) ran out: the pin is only as good
            # as the evidence behind it, so attest again before sending anything more.
            self._reattest(transport)
            transport = self._transport
        try:
            response = self._send(transport, method, path, body, send, content_length)
        except PinnedKeyMismatch:
            # The server's key changed (a restart, or someone re-routed us): re-attest, and
            # retry only if it is the same deployment. The mismatch is detected at the
            # handshake, before any byte was sent.
            self._reattest(transport)
            if body_factory is not None:
                body = body_factory()
            response = self._transport.handle_request(
                HttpRequest(method, path, send, body, content_length)
            )
        if response.status >= 400:
            try:
                message = json.loads(response.body)["error"]
            except (ValueError, KeyError, TypeError):
                message = response.body[:300].decode(errors="replace")
            raise server_error(response.status, message, method=method, path=path)
        return response

    def _send(
        self,
        transport: BaseTransport,
        method: str,
        path: str,
        body: Any,
        headers: Mapping[str, str],
        content_length: int | None,
    ) -> HttpResponse:
        """Sends once; an idempotent request (reads, inference) whose connection failed is
        sent again on a new connection (behind a balancer, possibly to another replica of the
        same service). Each new connection checks the pinned key again in its handshake, so
        a retry reaches only the attested service identity."""
        # A list of parts (a large inference request) can be sent again; a generator cannot.
        retry = _idempotent(method, path) and isinstance(body, (bytes, list, type(None)))
        for attempt in range(RETRIES + 1 if retry else 1):
            try:
                return transport.handle_request(
                    HttpRequest(method, path, headers, body, content_length)
                )
            except PinnedKeyMismatch:
                raise
            except (ConnectionError, ssl.SSLError) as exc:  # http11.ProtocolError included
                if not retry or attempt == RETRIES:
                    raise
                logger.info("retrying %s %s after %s", method, path, type(exc).__name__)
                time.sleep(RETRY_BACKOFF * (attempt + 1))
        raise AssertionError("unreachable")

    def _attestation_expired(self) -> bool:
        valid_until = self.attestation.verdict.valid_until
        return valid_until is not None and time.time() >= valid_until

    def _reattest(self, failed: BaseTransport) -> None:
        with self._lock:
            if self._transport is not failed:
                return  # another thread already re-attested
            previous = self.attestation
            current = attest(
                self._endpoint,
                self.policy,
                allow_simulation=self.allow_simulation,
                nonce=self._nonce,
                check_deployment=False,  # judged below, as a deployment change
                options=self.verifier_options,
                channel=self.channel,
                context=self._outer_context,
            )
            self._check_same_deployment(previous, current)
            self.attestation = current
            self._transport = self._new_transport()
            self._metadata.clear()
            failed.close()

    def _check_same_deployment(self, previous: AttestedServer, current: AttestedServer) -> None:
        if current.spki_sha256 == previous.spki_sha256:
            # The same TLS key, whose private half never leaves that TEE: the same server
            # (re-attested because its evidence expired), not a deployment change.
            return
        change = deployment_change(
            self.policy.deployment,
            previous.deployment,
            current.deployment,
            current.verdict,
            current.endorsement,
        )
        if change is None:
            return
        reason, acceptable = change
        if acceptable and (
            self.follow_key_changes == "same-code"
            or (
                self.on_deployment_change is not None
                and self.on_deployment_change(previous, current)
            )
        ):
            # Another deployment: the owner tokens of our models there mean nothing here,
            # and are not handed to it.
            self._owner_tokens.clear()
            return
        if acceptable and self.on_deployment_change is not None:
            reason += "; on_deployment_change refused it"
        raise DeploymentChanged(
            f"the server at {self.url} changed its key and its new evidence does not prove it "
            f"is the deployment this client attested: {reason}. It may be another instance "
            "of the same code that the network re-routed this client to. Nothing was sent. "
            "If the operator restarted the server, retry once they endorsed the new key; or "
            "connect again to accept the new server explicitly.",
            previous=previous,
            current=current,
        )

    def _token_for(self, model: str, token: str | None) -> str | None:
        """An explicit token, else the owner token of a model this Client uploaded, else
        the Client's own token."""
        if token is not None:
            return token
        return self._owner_tokens.get(model, self.token)

    def _remember(self, uploaded: UploadedModel, sent: str | None) -> UploadedModel:
        """A new model's owner token; for a replacement, the token that was accepted for
        it (which can only be the owner token)."""
        owner = uploaded.owner_token or sent
        if owner is not None:
            self._owner_tokens[uploaded.name] = owner
            self._owner_tokens[f"sha256:{uploaded.sha256}"] = owner
        return uploaded

    def _forget(self, name: str) -> None:
        token = self._owner_tokens.pop(name, None)
        for key in [k for k, v in self._owner_tokens.items() if v == token]:
            del self._owner_tokens[key]

    def _json(self, method: str, path: str, document: Any = None, **kwargs: Any) -> Any:
        body = None if document is None else json.dumps(document).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return json.loads(self._request(method, path, body, headers, **kwargs).body)

    # --- server ---

    def server_metadata(self) -> dict[str, Any]:
        """The server's OIP metadata (`GET /v2`): name, version and extensions."""
        result: dict[str, Any] = self._json("GET", "/v2")
        return result

    def is_ready(self) -> bool:
        """Whether the server is ready to serve (`GET /v2/health/ready`); False, for example,
        once its attestation collateral expired and it cannot renew it."""
        return bool(self._json("GET", "/v2/health/ready").get("ready"))

    # --- models ---

    def upload_model(
        self,
        model: str | Path | bytes | Any,
        name: str | None = None,
        *,
        public: bool | None = None,
        token: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        preferred_batch_sizes: Sequence[int] | None = None,
        max_concurrency: int | None = None,
        warmup_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> UploadedModel:
        """Uploads ONNX bytes (a path, bytes or an onnx.ModelProto) and returns its identity.

        A new model is restricted (only its owner token and run keys run it) unless
        `public=True`; a replaced model keeps its rule unless `public` is given. `token` is
        the upload key for a new name, or the owner token to replace a model (by default
        the owner token this Client remembers for `name`, else the Client's token).

        Scheduling (README, "Dynamic batching"): `max_batch_size` > 0 lets the server run
        concurrent requests together (every input and output needs a dynamic first axis),
        waiting at most `max_queue_delay_us` for company and sending early at one of
        `preferred_batch_sizes`; `max_concurrency` caps this model's simultaneous runs.
        `warmup_shapes` ({input name: dims}, e.g. {"images": [1, 3, 640, 640]}) makes the
        server run the model once on zeros of those shapes before it answers (README, "Warm-up
        shapes"); the answer's `warmup` says how it went. A replaced model keeps its options
        unless one of them is given.
        """
        data, default_name = _model_bytes(model)
        name = name or default_name or f"model-{hashlib.sha256(data).hexdigest()[:12]}"
        path = f"/v2/repository/models/{quote(name, safe='')}/load"
        query: dict[str, str | int] = {}
        if public is not None:
            query["public"] = "true" if public else "false"
        options = _model_options(
            max_batch_size,
            max_queue_delay_us,
            preferred_batch_sizes,
            max_concurrency,
            warmup_shapes,
        )
        for option, value in options.items():
            if isinstance(value, list):
                query[option] = ",".join(str(size) for size in value)
            elif isinstance(value, dict):
                # The JSON form: input names may hold the ',' and ':' of the short form.
                query[option] = json.dumps(value, separators=(",", ":"))
            else:
                query[option] = value
        if query:
            path += "?" + urlencode(query)

        def chunks() -> Iterator[bytes]:
            view = memoryview(data)
            for start in range(0, len(view), UPLOAD_CHUNK):
                yield bytes(view[start : start + UPLOAD_CHUNK])
                if progress is not None:
                    progress(min(start + UPLOAD_CHUNK, len(view)), len(view))

        sent = self._token_for(name, token)
        answer = json.loads(
            self._request(
                "POST",
                path,
                chunks(),
                {"Content-Type": "application/octet-stream"},
                token=sent,
                content_length=len(data),
                body_factory=chunks,
            ).body
        )
        self._metadata.pop(name, None)
        return self._remember(UploadedModel.from_answer(answer, sent), sent)

    def delete_model(self, name: str, *, token: str | None = None) -> None:
        """Deletes (unloads) the model `name`. Needs its owner token: the one this Client
        remembers from the upload, or `token`. Raises NotFoundError if it does not exist,
        AuthenticationError if the token is not the owner's."""
        self._json(
            "POST",
            f"/v2/repository/models/{quote(name, safe='')}/unload",
            {},
            token=self._token_for(name, token),
        )
        self._metadata.pop(name, None)
        self._forget(name)

    def list_models(self, *, token: str | None = None) -> list[dict[str, Any]]:
        """The models this client may run: public ones, and those its token, `token`, or the
        owner tokens it remembers grant (the server lists what one token grants per call)."""
        tokens = dict.fromkeys([token or self.token, *self._owner_tokens.values()])
        rows: dict[str, dict[str, Any]] = {}
        for each in tokens:
            for row in self._json("POST", "/v2/repository/index", {}, token=each):
                rows[row["name"]] = row
        return [rows[name] for name in sorted(rows)]

    def model_metadata(
        self, model: str, *, version: str | None = None, token: str | None = None
    ) -> dict[str, Any]:
        """The OIP metadata of `model` (a name or "sha256:<hex>"): its inputs and outputs
        with names, datatypes and shapes. Cached per Client; a restricted model needs a
        token that may run it (remembered for models this Client uploaded)."""
        key = model if version is None else f"{model}@{version}"
        cached = self._metadata.get(key)
        if cached is None:
            cached = self._json(
                "GET", _model_path(model, version), token=self._token_for(model, token)
            )
            self._metadata[key] = cached
        return cached

    def set_public(self, name: str, public: bool, *, token: str | None = None) -> None:
        """Lets anyone who attests the server run the model (`public=True`), or only its
        owner and run-key holders (`public=False`). Needs the owner token."""
        self._json(
            "POST",
            f"/v2/repository/models/{quote(name, safe='')}/access",
            {"public": public},
            token=self._token_for(name, token),
        )

    def create_run_key(self, name: str, *, token: str | None = None) -> tuple[str, str]:
        """Issues a key that may run a restricted model; returns (key id, run key)."""
        answer = self._json(
            "POST",
            f"/v2/repository/models/{quote(name, safe='')}/keys",
            {},
            token=self._token_for(name, token),
        )
        return answer["key_id"], answer["run_key"]

    def revoke_run_key(self, name: str, key_id: str, *, token: str | None = None) -> None:
        """Revokes the run key `key_id` (as `create_run_key` returned it) of model `name`;
        requests with that key fail from now on. Needs the owner token."""
        self._json(
            "DELETE",
            f"/v2/repository/models/{quote(name, safe='')}/keys/{key_id}",
            token=self._token_for(name, token),
        )

    # --- inference ---

    def run_model(
        self,
        model: str,
        inputs: Any,
        *,
        dtype: Any = None,
        outputs: list[str] | None = None,
        version: str | None = None,
        token: str | None = None,
        receipt: bool = False,
    ) -> Outputs:
        """Runs `model` (a name or "sha256:<hex>" or a bare 64-hex hash) on `inputs`.

        Running by hash pins the exact model bytes you reviewed: a name can be replaced by
        its owner at any time, a hash cannot.

        With `receipt=True` the server signs a receipt over the model hash, the inputs and
        the outputs; it is verified on arrival and returned as `outputs.receipt`
        (a `SavedReceipt`: `.save(path)` writes a file `blindfold receipt verify` checks).
        """
        if len(model) == 64 and _HEX64.fullmatch(model):
            model = f"sha256:{model.lower()}"
        token = self._token_for(model, token)
        metadata = self.model_metadata(model, version=version, token=token)
        arrays = normalize_inputs(inputs, metadata["inputs"], dtype)
        nonce = secrets.token_hex(16) if receipt else ""
        parameters = {"receipt": True, "receipt_nonce": nonce} if receipt else None
        encoded = oip.encode_infer_request(arrays, outputs, parameters)
        parts = encoded.parts
        # Large tensors go out straight from the arrays' memory; small ones in one write.
        body: bytes | list[bytes | memoryview] = (
            b"".join(parts) if encoded.total < _JOIN_BELOW or len(parts) == 1 else parts
        )
        response = self._request(
            "POST",
            _model_path(model, version) + "/infer",
            body,
            encoded.headers(),
            token=token,
            content_length=encoded.total,
        )
        try:
            answer = oip.decode_infer_response(
                response.body, response.headers.get(oip.HEADER_LENGTH)
            )
        except oip.MalformedMessage as exc:
            raise BlindfoldError(
                f"the server's infer response is malformed ({exc}); is it a Blindfold server?"
            ) from None
        decoded = answer.outputs
        result = Outputs(decoded)
        if receipt:
            result.receipt = self._check_receipt(
                answer.parameters, metadata["sha256"], arrays, decoded, nonce
            )
        return result

    def _check_receipt(
        self,
        parameters: dict[str, Any],
        model_sha256: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        nonce: str,
    ) -> SavedReceipt:
        document = parameters.get("receipt")
        if document is None:
            raise ReceiptError("the server sent no receipt although one was requested")
        receipt = Receipt.from_json(document)
        certificate = x509.load_pem_x509_certificate(self.attestation.certificate_pem.encode())
        public_key = certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ReceiptError(
                "the attested certificate's key is not an EC key, so it cannot have signed "
                "an inference receipt; the server is not a Blindfold server"
            )
        self._receipt_chain.verify(
            receipt,
            public_key,
            inputs=inputs,
            outputs=outputs,
            model_sha256=model_sha256,
            client_nonce=nonce,
        )
        standing = self._standing_evidence(receipt.evidence_sha256)
        if hashlib.sha256(standing.evidence).hexdigest() != receipt.evidence_sha256:
            raise ReceiptError(
                "the receipt names evidence other than the server's standing evidence; "
                "the server may have restarted: retry"
            )
        return SavedReceipt(receipt, standing, self.attestation.certificate_pem)

    def _standing_evidence(self, named_sha256: str) -> Evidence:
        """The standing (nonce-less) evidence a receipt names, verified. Cached per evidence,
        and fetched again when a receipt names other evidence: the server renews its standing
        evidence before it expires, and replicas sharing the service key (behind a balancer)
        each have their own, which any of them finds by hash (`/v2/cluster/evidence/`)."""
        spki = self.attestation.spki_sha256
        cached = self._standing.get((spki, named_sha256))
        if cached is not None:
            return cached
        evidence = Evidence.from_json(self._json("GET", "/v2/attestation"))
        if hashlib.sha256(evidence.evidence).hexdigest() != named_sha256:
            try:
                document = self._json("GET", f"/v2/cluster/evidence/{named_sha256}")
            except ServerError:
                pass  # not a replica, or no replica holds it: refused by the caller
            else:
                evidence = Evidence.from_json(document)
        verify_server_evidence(
            evidence,
            self.attestation.certificate_der,
            self.policy,
            nonce=None,
            allow_simulation=self.allow_simulation,
            options=self.verifier_options,
        )
        digest = hashlib.sha256(evidence.evidence).hexdigest()
        with self._lock:
            while len(self._standing) >= MAX_STANDING_CACHED:
                del self._standing[next(iter(self._standing))]
            self._standing[(spki, digest)] = evidence
        return evidence

    def load_encrypted_model(
        self,
        name: str,
        path_on_server: str,
        key: ModelKey | str | Path,
        *,
        public: bool | None = None,
        token: str | None = None,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        preferred_batch_sizes: Sequence[int] | None = None,
        max_concurrency: int | None = None,
        warmup_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> UploadedModel:
        """Serves a model left encrypted on the server's disk (`blindfold encrypt-model`):
        only the key travels, over the attested channel; the server checks its SHA-256.
        The options are `upload_model`'s."""
        if not isinstance(key, ModelKey):
            key = ModelKey.load(Path(key))
        document: dict[str, Any] = {
            "path": path_on_server,
            "key": key.to_json(),
            **_model_options(
                max_batch_size,
                max_queue_delay_us,
                preferred_batch_sizes,
                max_concurrency,
                warmup_shapes,
            ),
        }
        if public is not None:
            document["public"] = public
        sent = self._token_for(name, token)
        answer = self._json(
            "POST",
            f"/v2/repository/models/{quote(name, safe='')}/load-encrypted",
            document,
            token=sent,
        )
        self._metadata.pop(name, None)
        return self._remember(UploadedModel.from_answer(answer, sent), sent)

    # --- deployment ---

    def endorse_deployment(self, operator_key: OperatorPrivateKey, name: str) -> Endorsement:
        """For the operator: signs (`name`, the attested server's TLS key hash) with the
        operator's key and posts it, so clients pinning that key in their policy's
        `[deployment] operator_keys` accept this server and follow it across restarts."""
        endorsement = Endorsement.sign(operator_key, name, self.attestation.spki_sha256)
        self._json("POST", "/v2/deployment/endorsement", endorsement.to_json())
        return endorsement

    # --- lifetime ---

    def close(self) -> None:
        """Closes the pinned connection. The Client cannot be used afterwards."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Connection failures an idempotent request survives (a replica restarting or being removed
# from behind a balancer), and the pause before each new attempt.
RETRIES = 3
RETRY_BACKOFF = 0.2


def _idempotent(method: str, path: str) -> bool:
    """Reads and inference change nothing on the server (a repeated run gives the same
    outputs); uploads, deletes and access changes are never sent twice."""
    return method in ("GET", "HEAD") or path.endswith("/infer") or path == "/v2/repository/index"


def _model_path(model: str, version: str | None) -> str:
    path = f"/v2/models/{quote(model, safe=':')}"
    return path if version is None else f"{path}/versions/{quote(version, safe='')}"


def _safe_name(name: str | None) -> str | None:
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "-", name or "").strip("-.")[:128]
    return cleaned or None


def _model_options(
    max_batch_size: int | None,
    max_queue_delay_us: int | None,
    preferred_batch_sizes: Sequence[int] | None,
    max_concurrency: int | None,
    warmup_shapes: Mapping[str, Sequence[int]] | None,
) -> dict[str, Any]:
    """The per-model options given (None: not given), as JSON values; the server checks
    them."""
    options: dict[str, Any] = {
        name: value
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_queue_delay_us", max_queue_delay_us),
            ("max_concurrency", max_concurrency),
        )
        if value is not None
    }
    if preferred_batch_sizes is not None:
        options["preferred_batch_sizes"] = [int(size) for size in preferred_batch_sizes]
    if warmup_shapes is not None:
        options["warmup_shapes"] = {
            name: [int(dim) for dim in dims] for name, dims in warmup_shapes.items()
        }
    return options


def _model_bytes(model: str | Path | bytes | Any) -> tuple[bytes, str | None]:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), None
    if isinstance(model, (str, Path)):
        path = Path(model)
        try:
            return path.read_bytes(), _safe_name(path.stem)
        except OSError as exc:
            raise InputError(f"cannot read model file {path}: {exc.strerror}") from None
    if hasattr(model, "SerializeToString"):
        buffer = io.BytesIO(model.SerializeToString())
        return buffer.getvalue(), _safe_name(getattr(getattr(model, "graph", None), "name", None))
    raise InputError(
        f"cannot upload a {type(model).__name__}: pass a path, bytes or an onnx.ModelProto"
    )


def connect(
    url: str = "https://127.0.0.1:8443",
    *,
    policy: Policy | str | Path | None = None,
    allow_simulation: bool = False,
    nonce: bool = True,
    token: str | None = None,
    timeout: float = 300.0,
    follow_key_changes: FollowKeyChanges = "same-deployment",
    on_deployment_change: DeploymentChangeCallback | None = None,
    verifier_options: VerifierOptions | None = None,
    channel: Channel = "tls",
    verify: VerifyTls = True,
    pad_buckets: tuple[int, ...] = ohttp.DEFAULT_BUCKETS,
    transport: TransportFactory | None = None,
) -> Client:
    """Attests the server at `url` under `policy` (a Policy or a TOML path; default: the
    simulation TEE running this installed package's code) and returns a pinned Client.

    After the server's key changes the Client continues only with the same deployment
    (see `blindfold.attestation.deployment`); `on_deployment_change(previous, current)`
    may accept another instance the policy accepts, and `follow_key_changes="same-code"`
    accepts any such instance without asking (the behaviour before deployments existed).
    `verifier_options` reach the TEE verifiers, e.g.
    `VerifierOptions(vcek_cache_dir=...)` for SEV-SNP servers that do not publish their VCEK.

    `channel="ohttp"` reaches the server through proxies that terminate TLS: requests are
    Oblivious HTTP messages encrypted to the HPKE key the evidence binds, padded to the
    sizes in `pad_buckets`; `verify` (True: the system CA bundle, or a bundle path, or an
    SSLContext) checks the proxy's certificate.

    `transport(attested, default)` is called after each attestation with the default
    transport to the attested server and returns the one to send through (see
    `blindfold.client.transport.BaseTransport`), e.g. a wrapper that records exchanges."""
    if isinstance(policy, (str, Path)):
        policy = Policy.load(policy)
    return Client(
        url,
        policy=policy,
        allow_simulation=allow_simulation,
        nonce=nonce,
        token=token,
        timeout=timeout,
        follow_key_changes=follow_key_changes,
        on_deployment_change=on_deployment_change,
        verifier_options=verifier_options,
        channel=channel,
        verify=verify,
        pad_buckets=pad_buckets,
        transport=transport,
    )
