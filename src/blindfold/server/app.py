"""The HTTP surface: Open Inference Protocol v2 routes, Triton's model repository extension,
Blindfold's attestation and access-control routes, wired into one Starlette app."""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.resources
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blindfold import __version__
from blindfold.attestation.binding import IDENTITY_BINDING
from blindfold.attestation.deployment import Endorsement
from blindfold.errors import ConfigurationError, EvidenceError, RequestRejected
from blindfold.receipts import ReceiptSigner
from blindfold.sealing import ModelKey
from blindfold.server import admission, cluster, http_errors, logs, model_bytes, ohttp_gateway, oip
from blindfold.server.admission import BodyBudget, read_body, stream_body
from blindfold.server.encrypted_models import EncryptedModels
from blindfold.server.identity import ServerIdentity
from blindfold.server.inference import InferenceResult, InferenceService, ReceiptRequest
from blindfold.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from blindfold.server.metrics import LoadedModel, Metrics, Snapshot
from blindfold.server.model_bytes import ModelBytes, ModelBytesWriter, ModelData
from blindfold.server.model_record import ModelRecord
from blindfold.server.models import OWNER_SECRET_HEADER
from blindfold.server.ohttp_gateway import ReplayGuard, gateway
from blindfold.server.pools import Pools
from blindfold.server.refusals import Refusal
from blindfold.server.responses import parts_response
from blindfold.server.runtime import InferenceRunner
from blindfold.server.scheduler import DEFAULT, SchedulingOptions
from blindfold.server.service import LoadCredentials, LoadResult, ModelService

logger = logging.getLogger("blindfold.server")
JSON_SLACK = 1 << 20  # room for JSON framing around base64 model bytes
# Below these sizes decoding and encoding take microseconds and run on the event loop; above
# them they go to the codec pool, so that no request stalls the others.
INLINE_JSON_BYTES = 64 * 1024
INLINE_JSON_ELEMENTS = 16 * 1024


class ServerState:
    def __init__(
        self,
        identity: ServerIdentity,
        service: ModelService,
        runner: InferenceRunner,
        encrypted_models_dir: Path | None = None,
        pools: Pools | None = None,
    ):
        self.identity = identity
        identity.standing()  # a TEE that cannot produce evidence fails at start, not later
        # Receipts name the standing evidence current when they are signed, which the
        # identity renews before it expires.
        self.receipts = ReceiptSigner(
            identity.private_key,
            identity.spki_sha256.hex(),
            identity.standing_evidence_sha256,
        )
        self.service = service
        self.runner = runner
        self.pools = pools or Pools()
        self.inference = InferenceService(runner, self.receipts, self.pools.codec)
        self.encrypted_models = EncryptedModels(encrypted_models_dir, self.pools.loading)
        self.body_budget = BodyBudget(service.limits.inflight_body_bytes())
        self.started = time.time()
        self.metrics = Metrics(self.snapshot)
        # A cluster replica (`server.cluster`): its join desk and replicator; and, for a
        # replica that joined, the peer to copy models from at start and the members it named.
        self.cluster: tuple[cluster.JoinDesk, cluster.Replicator] | None = None
        self.join_sync: tuple[str, list[str]] | None = None
        self.ohttp_replays = ReplayGuard()

    def snapshot(self) -> Snapshot:
        """What the metrics' live gauges read at each scrape."""
        registry = self.service.registry
        provider = self.identity.provider
        return Snapshot(
            tee_kind=provider.kind,
            started=self.started,
            models=[
                LoadedModel(e.name, e.public, e.loaded().admitted_memory)
                for e in registry.entries()
            ],
            unavailable_models=len(registry.unavailable),
            sessions=registry.session_count(),
            memory_budget_bytes=self.runner.budget.limit,
            collateral_valid_until=provider.collateral_valid_until(),
            evidence_made_at=self.identity.standing_made_at,
            cluster_members=None if self.cluster is None else len(self.cluster[1].members()),
            queued_inferences=self.runner.scheduler.queued,
            batches=self.runner.scheduler.batches,
            batched_requests=self.runner.scheduler.batched_requests,
        )


def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestRejected(401, "the Authorization header must be 'Bearer <token>'")
    return token.strip()


def owner_secret_header(request: Request) -> str | None:
    """The owner token a client chose for the model it loads (`X-Blindfold-Owner-Token`)."""
    value = request.headers.get(OWNER_SECRET_HEADER)
    if value is None:
        return None
    if not value.strip():
        raise RequestRejected(400, f"the {OWNER_SECRET_HEADER} header is empty")
    return value.strip()


def load_credentials(request: Request) -> LoadCredentials:
    """Authorizes a load from its headers alone, before any byte of its body is read."""
    name = request.path_params["name"]
    service = state_of(request).service
    return service.authorize_load(name, bearer_token(request), owner_secret_header(request))


def received_bytes(request: Request) -> int:
    """A request's body size as declared (for the metrics; 0 when absent or malformed)."""
    try:
        return admission.declared_length(request) or 0
    except RequestRejected:
        return 0


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.blindfold
    return state


# --- health, metadata, attestation ---


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    state = state_of(request)
    if state.cluster is not None and not state.cluster[1].synced.is_set():
        joining = {"ready": False, "error": "joining: copying the models from the peer replica"}
        return JSONResponse(joining, status_code=503)
    valid_until = state.identity.provider.collateral_valid_until()
    body: dict[str, Any] = {"ready": True, "tee": state.identity.provider.kind}
    if valid_until is not None:
        remaining = int(valid_until - time.time())
        body.update(collateral_valid_until=valid_until, collateral_seconds_remaining=remaining)
        if remaining <= 0:
            body["ready"] = False
            body["error"] = "the attestation collateral expired; clients will refuse this server"
            return JSONResponse(body, status_code=503)
    return JSONResponse(body)


async def metrics(request: Request) -> Response:
    """Prometheus text format (server/metrics.py): never tensor contents, tokens, or the
    names of restricted models."""
    return Response(state_of(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)


# The API's OpenAPI 3.1 description, kept beside this module (a test checks that it names
# every route below, and validates the server against it).
OPENAPI = importlib.resources.files("blindfold.server").joinpath("openapi.json").read_bytes()


async def openapi(request: Request) -> Response:
    return Response(OPENAPI, media_type="application/json")


async def server_metadata(request: Request) -> Response:
    state = state_of(request)
    return JSONResponse(
        {
            "name": "blindfold",
            "version": __version__,
            "extensions": [
                "binary_tensor_data",
                "model_repository",
                "blindfold_attestation",
                "blindfold_model_hash",
            ],
            "tee": state.identity.provider.kind,
        }
    )


async def attestation(request: Request) -> Response:
    state = state_of(request)
    nonce_hex = request.query_params.get("nonce")
    nonce = None
    if nonce_hex is not None:
        try:
            nonce = bytes.fromhex(nonce_hex)
        except ValueError:
            nonce = b""
        if len(nonce) != 32:
            raise RequestRejected(400, "nonce must be 64 hex characters (32 bytes)")
    binding = request.query_params.get("binding")
    if binding not in (None, "spki", IDENTITY_BINDING):
        raise RequestRejected(400, f"binding must be 'spki' (the default) or '{IDENTITY_BINDING}'")
    # Its own pool: a client attests even while every inference slot is busy.
    outcome = "failed"
    try:
        document = await state.pools.attestation.call(
            state.identity.attestation, nonce, binding == IDENTITY_BINDING
        )
        outcome = "ok"
    finally:
        state.metrics.attestations.labels("fresh" if nonce else "standing", outcome).inc()
    return JSONResponse(document.to_json())


async def endorse_deployment(request: Request) -> Response:
    """The operator's endorsement of this server's key (`blindfold deployment endorse`); it
    authenticates itself, so the route needs no token."""
    state = state_of(request)
    body = await read_body(request, state.body_budget, 1 << 16, "request", "fixed")
    document = oip.parse_json(body, "send an endorsement made by `blindfold deployment endorse`")
    try:
        endorsement = Endorsement.from_json(document)
    except (ValueError, EvidenceError) as exc:
        raise RequestRejected(
            400, f"send an endorsement made by `blindfold deployment endorse`: {exc}"
        ) from None
    state.identity.endorse(endorsement)
    logger.info(
        "deployment %r endorsed by operator %s", endorsement.deployment, endorsement.operator_key_id
    )
    if state.cluster is not None:
        state.cluster[1].share_endorsement(endorsement.to_json())
    return JSONResponse(
        {"deployment": endorsement.deployment, "operator_key": endorsement.operator_key_id}
    )


def _metadata(entry: ModelRecord) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": entry.name,
        "versions": [str(entry.version)],
        "platform": "onnxruntime_onnx",
        "sha256": entry.sha256,
        "inputs": [spec.metadata() for spec in entry.loaded().inputs],
        "outputs": [spec.metadata() for spec in entry.loaded().outputs],
    }
    if entry.scheduling != DEFAULT:
        # Users see that their requests may share a session run with other callers'.
        metadata["scheduling"] = entry.scheduling.to_json()
    return metadata


def _resolve(request: Request) -> ModelRecord:
    params = request.path_params
    entry = state_of(request).service.resolve(
        params["name"], params.get("version"), bearer_token(request)
    )
    logs.request_model.set((entry.name, entry.sha256))
    return entry


async def model_metadata(request: Request) -> Response:
    return JSONResponse(_metadata(_resolve(request)))


async def model_ready(request: Request) -> Response:
    _resolve(request)
    return JSONResponse({"name": request.path_params["name"], "ready": True})


# --- inference ---


async def infer(request: Request) -> Response:
    state = state_of(request)
    entry = _resolve(request)  # authorized from the headers, before the body is read
    with state.metrics.inference(entry.name, entry.public) as timing:
        parsed = await _infer_request(request, state)
        receipt = None
        if parsed.parameters.get("receipt"):
            receipt = ReceiptRequest(parsed.id, parsed.parameters.get("receipt_nonce", ""))
        outputs = None if parsed.outputs is None else list(parsed.outputs)
        result = await state.inference.infer(entry, parsed.inputs, outputs, timing, receipt)
        if _encodes_quickly(parsed, result.outputs):
            parts, header_out = _encode(entry, parsed, result)
        else:
            parts, header_out = await state.pools.codec.call(_encode, entry, parsed, result)
    if header_out is None:
        return parts_response(parts, "application/json")
    return parts_response(
        parts,
        "application/octet-stream",
        headers={oip.HEADER_LENGTH: str(header_out)},
    )


async def _infer_request(request: Request, state: ServerState) -> oip.InferRequest:
    """The request's tensors and options, each limit refused from the headers first."""
    limits = state.service.limits
    header_length = request.headers.get(oip.HEADER_LENGTH)
    admission.refuse_if_larger(request, limits.max_request_bytes, "request", "--max-request-bytes")
    if header_length is None and (admission.declared_length(request) or 0) > limits.max_json_bytes:
        raise oip.json_too_large(limits)
    body = await read_body(
        request, state.body_budget, limits.max_request_bytes, "request", "--max-request-bytes"
    )
    if _decodes_quickly(body, header_length):
        return oip.parse_infer_request(body, header_length, limits)
    return await state.pools.codec.call(oip.parse_infer_request, body, header_length, limits)


def _decodes_quickly(body: bytearray, header_length: str | None) -> bool:
    """Small JSON without BYTES tensors decodes in microseconds (binary tensors are views)."""
    try:
        json_length = len(body) if header_length is None else int(header_length)
    except ValueError:
        return True  # refused at once by the parser
    if json_length > INLINE_JSON_BYTES:
        return False
    return b'"BYTES"' not in body[:json_length]


def _encodes_quickly(parsed: oip.InferRequest, outputs: dict[str, Any]) -> bool:
    for name, array in outputs.items():
        if array.dtype.kind in ("U", "O"):
            return False
        wants_binary = parsed.binary_default if parsed.outputs is None else parsed.outputs[name]
        if not wants_binary and array.size > INLINE_JSON_ELEMENTS:
            return False
    return True


def _encode(
    entry: ModelRecord, parsed: oip.InferRequest, result: InferenceResult
) -> tuple[list[bytes | memoryview], int | None]:
    return oip.encode_infer_response(
        entry.name, str(entry.version), parsed, result.outputs, result.parameters
    )


# --- model repository extension ---


async def repository_index(request: Request) -> Response:
    # What this caller may run: READY models, and stored ones that could not be loaded as
    # UNAVAILABLE with a reason. Restricted models need their owner token or a run key.
    return JSONResponse(state_of(request).service.index(bearer_token(request)))


async def repository_load(request: Request) -> Response:
    state = state_of(request)
    name = request.path_params["name"]
    # Authorized from the headers: a body the server would refuse is never read.
    credentials = load_credentials(request)
    state.service.check_capacity(name)
    # New models are restricted unless the owner opts in: `?public=true` (any client, also
    # tritonclient's load_model(query_params=...)) or Triton's load parameter "public".
    public = None
    if "public" in request.query_params:
        public = request.query_params["public"].lower() in ("1", "true", "yes")
    scheduling = SchedulingOptions.parse(request.query_params)
    data, sha256, parameter, options = await _received_model(request, state)
    try:
        result = await state.service.load(
            name,
            data,
            credentials.token,
            public=public if parameter is None else parameter,
            sha256=sha256,
            owner_secret=credentials.owner_secret,
            scheduling=scheduling if options is None else options,
        )
    finally:
        if isinstance(data, ModelBytes):
            data.close()  # a session made from it holds its own descriptor
    return _load_answer(name, result)


async def _received_model(
    request: Request, state: ServerState
) -> tuple[ModelData, str, bool | None, SchedulingOptions | None]:
    """The uploaded model, its SHA-256 (hashed as it arrived, never on the event loop), and
    the options a Triton load request carries as parameters (None: not given).

    Blindfold's raw upload (`application/octet-stream`) is the ONNX file itself, no base64
    blow-up: it streams into one sealed memfd that the checker, the store and the model's
    worker all read (whole, as bytes, where there is no memfd: Gramine). A Triton load
    request carries it base64-encoded in JSON."""
    limits = state.service.limits
    if request.headers.get("content-type", "").startswith("application/octet-stream"):
        if not model_bytes.memfd_available():
            hasher = hashlib.sha256()
            body = await read_body(
                request,
                state.body_budget,
                limits.max_model_bytes,
                "model",
                "--max-model-bytes",
                hasher,
            )
            return bytes(body), hasher.hexdigest(), None, None
        writer = ModelBytesWriter()
        try:
            await stream_body(
                request,
                state.body_budget,
                limits.max_model_bytes,
                "model",
                "--max-model-bytes",
                writer.write,
            )
            model = writer.finish()
        finally:
            writer.abandon()
        return model, model.sha256, None, None
    limit = limits.max_model_bytes * 4 // 3 + JSON_SLACK
    body = await read_body(request, state.body_budget, limit, "model", "--max-model-bytes")
    data, public, options = await state.pools.loading.call(_model_from_triton_load, body)
    del body
    hasher = await state.pools.loading.call(hashlib.sha256, data)
    return data, hasher.hexdigest(), public, options


def _load_answer(name: str, result: LoadResult) -> Response:
    answer: dict[str, Any] = {
        "name": name,
        "version": str(result.entry.version),
        "sha256": result.entry.sha256,
        "replaced": result.replaced,
        "public": result.entry.public,
    }
    if result.entry.scheduling != DEFAULT:
        answer["scheduling"] = result.entry.scheduling.to_json()
    if result.owner_token is not None:
        answer["owner_token"] = result.owner_token
    if result.owner_chosen:  # the client's own secret: never echoed
        answer["owner_token_chosen"] = True
    if result.warmup is not None:  # the configured warm-up ran before this answer
        answer["warmup"] = result.warmup
    return JSONResponse(answer)


def _model_from_triton_load(
    body: bytearray,
) -> tuple[bytes, bool | None, SchedulingOptions | None]:
    """Triton's load request: `{"parameters": {"config": ..., "file:<path>": base64}}`, with
    Blindfold's options (`public`, the scheduling options) as further parameters."""
    document = oip.parse_json(body, "the load request is not valid JSON") if body else {}
    parameters = document.get("parameters") if isinstance(document, dict) else None
    if not isinstance(parameters, dict):
        raise RequestRejected(
            400,
            "the load request needs a 'parameters' object with the ONNX file as a "
            "'file:<version>/model.onnx' parameter (tritonclient's load_model(files=...))",
        )
    files = {k: v for k, v in parameters.items() if k.startswith("file:")}
    if len(files) != 1:
        raise RequestRejected(
            400,
            f"the load request must carry exactly one 'file:' parameter with the ONNX "
            f"model, found {len(files)}; loading from a server-side repository is not supported",
        )
    ((path, encoded),) = files.items()
    if not path.endswith(".onnx"):
        raise RequestRejected(400, f"file parameter {path!r} must name an .onnx file")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise RequestRejected(400, f"file parameter {path!r} is not valid base64") from None
    public = parameters.get("public")
    scheduling = SchedulingOptions.parse(parameters)
    return data, public if isinstance(public, bool) else None, scheduling


async def repository_load_encrypted(request: Request) -> Response:
    """Loads a model the owner left encrypted on the host's disk: only the key travels (over
    the attested channel); the server decrypts inside the TEE and checks the SHA-256."""
    state = state_of(request)
    name = request.path_params["name"]
    # Authorized before reading the body or touching the host's disk, so no one without
    # upload rights can even learn whether a path exists.
    credentials = load_credentials(request)
    body = await read_body(request, state.body_budget, 1 << 16, "request", "fixed")
    advice = (
        'send {"path": "<file on the server>", "key": <key file JSON from blindfold encrypt-model>'
        "} and, optionally, the upload's options (public, max_batch_size, warmup_shapes, ...)"
    )
    document = oip.parse_json(body, advice)
    try:
        path = _path_parameter(document["path"])
        key = ModelKey.from_json(document["key"])
        public = document.get("public")
    except (KeyError, TypeError, ConfigurationError):
        raise RequestRejected(400, advice) from None
    # Checked before the file is read: a wrong option costs no decryption.
    scheduling = SchedulingOptions.parse(document)
    limit = state.service.limits.max_model_bytes
    data = await state.encrypted_models.decrypt(path, key, limit)
    try:
        result = await state.service.load(
            name,
            data,
            credentials.token,
            public=public if isinstance(public, bool) else None,
            owner_secret=credentials.owner_secret,
            scheduling=scheduling,
        )
    finally:
        if isinstance(data, ModelBytes):
            data.close()  # a session made from it holds its own descriptor
    return _load_answer(name, result)


def _path_parameter(value: object) -> Path:
    """A path as the operating system can take it: text without NUL, encodable as UTF-8
    (JSON can carry lone surrogates, which no file name holds)."""
    if not isinstance(value, str):
        raise TypeError
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestRejected(400, "'path' is not valid UTF-8 text") from None
    if "\0" in value:
        raise RequestRejected(400, "'path' must not contain NUL characters")
    return Path(value)


async def repository_unload(request: Request) -> Response:
    state = state_of(request)
    entry = state.service.unload(request.path_params["name"], bearer_token(request))
    return JSONResponse({"name": entry.name, "sha256": entry.sha256, "unloaded": True})


async def set_access(request: Request) -> Response:
    state = state_of(request)
    body = await read_body(request, state.body_budget, 1 << 16, "request", "fixed")
    advice = 'send {"public": true} or {"public": false}'
    document = oip.parse_json(body, advice)
    if not isinstance(document, dict) or not isinstance(document.get("public"), bool):
        raise RequestRejected(400, advice)
    public = document["public"]
    entry = state.service.set_public(request.path_params["name"], bearer_token(request), public)
    return JSONResponse({"name": entry.name, "public": entry.public})


async def create_run_key(request: Request) -> Response:
    state = state_of(request)
    key_id, run_key = state.service.create_run_key(
        request.path_params["name"], bearer_token(request)
    )
    return JSONResponse({"key_id": key_id, "run_key": run_key})


async def revoke_run_key(request: Request) -> Response:
    state = state_of(request)
    name, key_id = request.path_params["name"], request.path_params["key_id"]
    state.service.revoke_run_key(name, bearer_token(request), key_id)
    return JSONResponse({"name": name, "key_id": key_id, "revoked": True})


# --- errors ---


async def rejected(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestRejected):  # registered for RequestRejected only
        raise exc
    headers = dict(exc.headers)
    if await admission.must_close(request):
        headers["Connection"] = "close"
    # A message can name something the client sent (a path, a model name) that is not
    # encodable text, e.g. a lone surrogate from JSON; the answer must still be UTF-8.
    message = exc.message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message}, status_code=exc.status, headers=headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    incident = uuid.uuid4().hex[:12]
    # Only the exception type: its message could quote data.
    logger.error(
        "internal error %s on %s %s: %s",
        incident,
        request.method,
        request.url.path,
        type(exc).__name__,
    )
    return JSONResponse(
        {"error": f"internal server error (incident {incident}); the server keeps serving"},
        status_code=500,
    )


def _guarded(route: Route) -> Route:
    """Turns every exception into an `{"error": ...}` answer here, because Starlette's own
    fallback re-raises and the server would log a traceback that may quote request data."""
    handler = route.endpoint
    template = route.path

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        rid = logs.choose_request_id(request.headers.get(logs.REQUEST_ID_HEADER))
        logs.request_id.set(rid)  # uvicorn runs each request in its own task and context
        response = await _answer(request)
        response.headers[logs.REQUEST_ID_HEADER] = rid
        state_of(request).metrics.request(
            template,
            request.method,
            response.status_code,
            time.perf_counter() - started,
            received_bytes(request),
            len(response.body),
        )
        return response

    async def _answer(request: Request) -> Response:
        try:
            response: Response = await handler(request)
            if await admission.must_close(request):
                response.headers["Connection"] = "close"
            return response
        except (RequestRejected, Refusal) as exc:
            return await rejected(request, http_errors.rejection(exc))
        except ClientDisconnect:
            # The client left (or was cut for sending too slowly): nobody reads an answer.
            logger.info("client disconnected during %s %s", request.method, request.url.path)
            return Response(status_code=400, headers={"Connection": "close"})
        except Exception as exc:
            return await internal_error(request, exc)
        finally:
            admission.release(request)

    return Route(route.path, endpoint, methods=list(route.methods or ()) or None)


MODEL = "/v2/models/{name}"
VERSION = "/v2/models/{name}/versions/{version}"
REPO = "/v2/repository/models/{name}"

# The routes' patterns do not overlap, so their order decides only how many patterns a
# request is tried against before its own (Starlette tries them in turn): the gateway and
# inference, which every request of the two channels takes, come first.
ROUTES = [
    # Any of the routes below, as an Oblivious HTTP message encrypted to the TEE.
    Route(ohttp_gateway.PATH, gateway, methods=["POST"]),
    Route(MODEL + "/infer", infer, methods=["POST"]),
    Route(VERSION + "/infer", infer, methods=["POST"]),
    Route("/v2/health/live", live),
    Route("/v2/health/ready", ready),
    Route("/v2", server_metadata),
    Route("/metrics", metrics),
    Route("/openapi.json", openapi),
    Route("/v2/attestation", attestation),
    Route("/v2/deployment/endorsement", endorse_deployment, methods=["POST"]),
    Route(MODEL, model_metadata),
    Route(VERSION, model_metadata),
    Route(MODEL + "/ready", model_ready),
    Route(VERSION + "/ready", model_ready),
    Route("/v2/repository/index", repository_index, methods=["POST"]),
    Route(REPO + "/load", repository_load, methods=["POST"]),
    Route(REPO + "/unload", repository_unload, methods=["POST"]),
    Route(REPO + "/load-encrypted", repository_load_encrypted, methods=["POST"]),
    Route(REPO + "/access", set_access, methods=["POST"]),
    Route(REPO + "/keys", create_run_key, methods=["POST"]),
    Route(REPO + "/keys/{key_id}", revoke_run_key, methods=["DELETE"]),
]


async def no_route(request: Request, exc: Exception) -> Response:
    """Starlette's own answers (no such route, or method) as JSON errors like all others."""
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        raise exc
    what = "no such route" if exc.status_code == 404 else exc.detail
    response = JSONResponse(
        {"error": f"{what}; the routes are described at GET /openapi.json"},
        status_code=exc.status_code,
        headers=exc.headers,
    )
    response.headers[logs.REQUEST_ID_HEADER] = logs.choose_request_id(
        request.headers.get(logs.REQUEST_ID_HEADER)
    )
    return response


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    """Before the server listens (uvicorn runs this first): restored models with configured
    warm-up shapes are warmed, and a replica that joined copies the existing models, so it
    never answers "unknown model" for one its peers serve."""
    state: ServerState = app.state.blindfold
    await state.service.warm_up_restored()
    if state.cluster is not None:
        replicator = state.cluster[1]
        if state.join_sync is not None:
            peer, members = state.join_sync
            copied = await replicator.sync_from(peer, members)
            logger.info("copied %d models from the peer replica %s", copied, peer)
        replicator.synced.set()
    try:
        yield
    finally:
        if state.cluster is not None:
            state.cluster[1].stop()


def create_app(state: ServerState) -> Starlette:
    routes = ROUTES + (cluster.ROUTES if state.cluster is not None else [])
    app = Starlette(
        routes=[_guarded(route) for route in routes],
        exception_handlers={HTTPException: no_route},
        lifespan=_lifespan,
    )
    app.state.blindfold = state
    return app
