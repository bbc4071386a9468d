"""BlindAI 0.6 wire compatibility (`blindfold serve --blindai-compat`), so that code written
for BlindAI's client (`blindai.core.connect(...)`) keeps working while its users migrate.

BlindAI 0.6 listened on three ports, each served here by its own small Starlette app:
- unattested (9923, plain HTTP): `GET /` answers the server's certificate (DER) as a CBOR
  byte string; its `Server` header says `mock` when the TEE is simulation;
- attested (9924, TLS with that certificate): `POST /run`;
- model management (9925, same TLS): `POST /upload` and `POST /delete`.
Bodies are CBOR both ways, and every error is HTTP 500 with a CBOR text string, as BlindAI
answered them.

The ports use the main API's `ModelService` and `InferenceRunner`: BlindAI models live in the
same registry and store, under the same limits, run in the same confined workers, and share
a session with any model of identical bytes. BlindAI requests carry no credential, so these
ports act as a client without a token: `/run` reaches public models only, and an upload
makes a public model that nobody owns, named by its new `model_id` (a UUID4), which anyone
knowing the id may delete here and no Blindfold token may change. Uploads and deletes are
refused unless the server's uploads are open, or the operator accepted the risk with
`--unsafe-blindai-upload-without-key`.

BlindAI's client sends the model as a CBOR array with one integer per byte. Decoding that
with cbor2 would hold a Python list of 8 bytes per model byte, so `CborReader` finds the
array and decodes it in bulk with numpy, and walks every other part of a body before cbor2
builds it, refusing bodies with more items than any BlindAI request holds.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from blindfold import __version__, tensors
from blindfold.errors import InputError, RequestRejected
from blindfold.server import admission
from blindfold.server.admission import read_body
from blindfold.server.app import ServerState, received_bytes
from blindfold.server.limits import Limits
from blindfold.server.model_record import ModelRecord
from blindfold.server.refusals import ModelNotFound, Refusal
from blindfold.server.runtime import Session

logger = logging.getLogger("blindfold.blindai")

DEFAULT_PORTS = (9923, 9924, 9925)  # unattested, attested (run), model management
CERTIFICATE_NAME = "blindai-srv"  # BlindAI's client checks this DNS name, whatever it dialed
MAX_ITEMS = 65536  # CBOR items in a request besides the model's bytes; BlindAI sends dozens
UPLOAD_SLACK = 1 << 16  # room for the other upload fields beside the model
SMALL_BODY = 1 << 16
MAX_ID = 128  # model ids are UUIDs (36 characters); names of public models at most 128
CHUNK = 1 << 22  # bytes of the model array decoded at once


def _bad(message: str) -> RequestRejected:
    return RequestRejected(400, message)


# --- reading CBOR bodies within bounds ---


class CborReader:
    """Reads one CBOR body: walks item heads without building objects (counting items, so no
    body can make the decoder allocate much more than its own size), hands bounded parts to
    cbor2, and decodes arrays of byte values in bulk."""

    def __init__(self, body: bytes | bytearray) -> None:
        self.body = body
        self.items = 0

    def head(self, offset: int) -> tuple[int, int, int]:
        """(major type, argument, offset after the head) of the item at `offset`."""
        self.items += 1
        if self.items > MAX_ITEMS:
            raise _bad(f"the CBOR body holds more than {MAX_ITEMS} items")
        if offset >= len(self.body):
            raise _bad("the CBOR body ends in the middle of an item")
        initial = self.body[offset]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info, offset + 1
        if info > 27:  # indefinite lengths, and reserved values
            raise _bad("indefinite-length CBOR items are not accepted; send definite lengths")
        end = offset + 1 + (1 << (info - 24))
        if end > len(self.body):
            raise _bad("the CBOR body ends in the middle of an item")
        return major, int.from_bytes(self.body[offset + 1 : end], "big"), end

    def skip(self, offset: int) -> int:
        """The offset after the item at `offset` (with everything it contains)."""
        pending = 1
        while pending:
            pending -= 1
            major, argument, offset = self.head(offset)
            if major in (2, 3):  # byte and text strings
                offset += argument
                if offset > len(self.body):
                    raise _bad("the CBOR body ends in the middle of a string")
            elif major == 4:
                pending += argument
            elif major == 5:
                pending += 2 * argument
            elif major == 6:
                raise _bad("CBOR tags are not accepted in BlindAI requests")
        return offset

    def decode(self, start: int, end: int) -> Any:
        """cbor2's value of the items in body[start:end], already walked by `skip`."""
        try:
            return cbor2.loads(self.body[start:end])
        except (cbor2.CBORDecodeError, ValueError, RecursionError):
            raise _bad("the body is not valid CBOR") from None

    def value(self) -> Any:
        """The whole body as one CBOR item."""
        end = self.skip(0)
        if end != len(self.body):
            raise _bad("the body has bytes after its CBOR item")
        return self.decode(0, end)

    def byte_values(self, offset: int, count: int) -> tuple[bytes, int]:
        """The `count` integers 0-255 of a CBOR array whose items start at `offset`, as bytes,
        and the offset after them.

        An item is its value when below 24, else the prefix 0x18 and the value; so every item
        ends in the byte holding its value. A run of 0x18 bytes always starts an item, and
        within it the bytes at even positions are prefixes (0x18 0x18 is the value 24): the
        values are all the other bytes. A byte from 0x19 on that follows no prefix starts
        some other kind of CBOR item, which is refused."""
        out = bytearray(count)
        data = np.frombuffer(self.body, dtype=np.uint8)
        done, position = 0, offset
        run_parity = 0  # length modulo 2 of the run of 0x18 reaching `position`
        after_prefix = False  # whether the byte before `position` is a prefix
        while done < count:
            chunk = data[position : position + min(CHUNK, 2 * (count - done))]
            if len(chunk) == 0:
                raise _bad("the body ends inside the model array")
            is_18 = chunk == 0x18
            index = np.arange(len(chunk), dtype=np.int32)
            last_other = np.maximum.accumulate(np.where(is_18, -1, index))
            in_run = index - last_other - 1 + np.where(last_other < 0, run_parity, 0)
            value = ~(is_18 & (in_run % 2 == 0))
            ends = np.flatnonzero(value)
            if len(ends) >= count - done:  # the array ends in this chunk
                cut = int(ends[count - done - 1]) + 1
                chunk, is_18, in_run, value = chunk[:cut], is_18[:cut], in_run[:cut], value[:cut]
            follows_prefix = np.concatenate(([after_prefix], ~value[:-1]))
            if np.any((chunk > 0x18) & ~follows_prefix):
                raise _bad("'model' must be an array of integers from 0 to 255 (the file's bytes)")
            values = chunk[value]
            out[done : done + len(values)] = values.tobytes()
            done += len(values)
            position += len(chunk)
            run_parity = int(in_run[-1] + 1) % 2 if is_18[-1] else 0
            after_prefix = not bool(value[-1])
        return bytes(out), position


def read_upload(body: bytes | bytearray, max_model_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """The model bytes of an `/upload` body (an array of byte values, or a byte string) and
    its other fields."""
    reader = CborReader(body)
    major, count, offset = reader.head(0)
    if major != 5:
        raise _bad("the body must be a CBOR map")
    fields: dict[str, Any] = {}
    model: bytes | None = None
    for _ in range(count):  # each round walks items, so `count` is bounded by MAX_ITEMS
        start, offset = offset, reader.skip(offset)
        key = reader.decode(start, offset)
        if not isinstance(key, str) or key in fields or (key == "model" and model is not None):
            raise _bad("the body's map keys must be distinct text strings")
        major, length, array_start = reader.head(offset)
        if key == "model" and major == 4:
            if length > max_model_bytes:
                raise _model_too_large(length, max_model_bytes)
            model, offset = reader.byte_values(array_start, length)
            continue
        start, offset = offset, reader.skip(offset)
        fields[key] = reader.decode(start, offset)
    if offset != len(body):
        raise _bad("the body has bytes after its CBOR map")
    if model is None:
        model = fields.pop("model", None)
        if not isinstance(model, bytes):
            raise _bad("'model' must hold the ONNX file: an array of byte values, or bytes")
    return model, fields


def _model_too_large(size: int, limit: int) -> RequestRejected:
    return RequestRejected(
        413,
        f"the model is {size} bytes, more than the server's limit of {limit} (--max-model-bytes)",
    )


def read_map(body: bytes | bytearray) -> dict[str, Any]:
    document = CborReader(body).value()
    if not isinstance(document, dict):
        raise _bad("the body must be a CBOR map")
    return document


# --- tensors ---


def read_inputs(inputs: Any, session: Session, limits: Limits) -> dict[str, np.ndarray]:
    """The model's feeds from BlindAI's `inputs`: a `node_name` places a tensor by name, a
    null one by its position among the model's inputs."""
    shape_of_input = "{info: {fact: [dims], datum_type, node_name}, bytes_data: <bytes>}"
    if not isinstance(inputs, list):
        raise _bad(f"'inputs' must be a list of {shape_of_input}")
    feeds: dict[str, np.ndarray] = {}
    elements = 0
    for index, item in enumerate(inputs):
        info = item.get("info") if isinstance(item, dict) else None
        data = item.get("bytes_data") if isinstance(item, dict) else None
        if not isinstance(info, dict) or not isinstance(data, bytes):
            raise _bad(f"inputs[{index}] must be {shape_of_input}")
        fact, node_name = info.get("fact"), info.get("node_name")
        try:
            datatype = tensors.by_blindai(info.get("datum_type"))
            if not isinstance(fact, list):
                raise InputError("'fact' must be the tensor's shape, a list of integers")
            elements += tensors.element_count(fact)
            if elements > limits.max_tensor_elements:
                raise RequestRejected(
                    413,
                    f"the request's tensors hold more than the server's limit of "
                    f"{limits.max_tensor_elements} elements (--max-tensor-elements)",
                )
            array = tensors.tensor_from_bytes(data, datatype.oip, fact)
        except InputError as exc:
            raise _bad(f"inputs[{index}]: {exc}") from None
        if datatype.oip == "BOOL" and array.size and array.view(np.uint8).max() > 1:
            raise _bad(f"inputs[{index}]: Bool data must be one byte per value, 0 or 1")
        if node_name is None:
            if index >= len(session.inputs):
                raise _bad(
                    f"inputs[{index}] has no node_name and the model has only "
                    f"{len(session.inputs)} inputs"
                )
            node_name = session.inputs[index].name
        if not isinstance(node_name, str):
            raise _bad(f"inputs[{index}]: node_name must be text or null")
        if node_name in feeds:
            raise _bad(f"input {node_name[:MAX_ID]!r} is given twice")
        feeds[node_name] = array
    session.check_inputs(feeds)
    return feeds


def write_output(name: str, array: np.ndarray) -> dict[str, Any]:
    """One output as BlindAI's client reads it (`TensorInfo(**info)`: exactly these keys)."""
    datatype = tensors.by_oip(tensors.np_to_oip_dtype(array.dtype))
    if datatype.blindai is None:
        raise _bad(
            f"the model's output {name!r} has datatype {datatype.oip}, which BlindAI 0.6 "
            "clients cannot receive; run it through the Blindfold API instead"
        )
    return {
        "info": {"fact": list(array.shape), "datum_type": datatype.blindai[1], "node_name": name},
        "bytes_data": bytes(tensors.tensor_to_bytes(array)),
    }


# --- the routes ---


@dataclass(frozen=True)
class CompatState:
    server: ServerState
    # Whether /upload and /delete are served: open upload, or the operator's unsafe opt-in.
    management: bool


def _compat(request: Request) -> CompatState:
    compat: CompatState = request.app.state.blindai
    return compat


def _cbor(value: Any, status: int = 200) -> Response:
    return Response(cbor2.dumps(value), status_code=status, media_type="application/cbor")


def _require_management(compat: CompatState) -> None:
    if not compat.management:
        raise RequestRejected(
            403,
            "this server needs an upload key, which BlindAI 0.6 clients cannot send: upload "
            "with Blindfold (blindfold upload --public) and run the model here by model_hash, "
            "or have the operator start the server with --unsafe-blindai-upload-without-key",
        )


async def certificate(request: Request) -> Response:
    return _cbor(_compat(request).server.identity.certificate_der)


async def hello(request: Request) -> Response:
    return _cbor("Blindfold, BlindAI 0.6 compatible port")


async def upload(request: Request) -> Response:
    compat = _compat(request)
    _require_management(compat)  # before reading the body
    state = compat.server
    limit = state.service.limits.max_model_bytes
    # At most two CBOR bytes per model byte in BlindAI's array of integers.
    body = await read_body(
        request, state.body_budget, 2 * limit + UPLOAD_SLACK, "upload", "--max-model-bytes"
    )
    model, fields = await state.pools.loading.call(read_upload, body, limit)
    del body
    length = fields.get("length")
    if length is not None and length != len(model):
        raise _bad(f"'length' is {str(length)[:40]} but the model has {len(model)} bytes")
    if not isinstance(fields.get("model_name", ""), str):
        raise _bad("'model_name' must be text")
    model_id = str(uuid.uuid4())
    digest = (await state.pools.loading.call(hashlib.sha256, model)).hexdigest()
    result = await state.service.load_unowned(model_id, model, digest)
    logger.info(
        "BlindAI upload: model_id %s, sha256 %s (public, no owner)", model_id, result.entry.sha256
    )
    return _cbor({"hash": bytes.fromhex(result.entry.sha256), "model_id": model_id})


def _resolve(state: ServerState, document: dict[str, Any]) -> ModelRecord:
    model_id = document.get("model_id") or ""
    model_hash = document.get("model_hash") or ""
    if not isinstance(model_id, str) or not isinstance(model_hash, str):
        raise _bad("model_id and model_hash must be text")
    if bool(model_id) == bool(model_hash):
        raise _bad("send exactly one of model_id and model_hash, and the other empty")
    if model_hash:
        digest = model_hash.lower()
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise _bad("model_hash must be the model's SHA-256 as 64 hex characters")
        reference, what = f"sha256:{digest}", f"model_hash {digest}"
    else:
        reference, what = model_id, f"model_id {model_id[:MAX_ID]!r}"
    if len(reference) <= MAX_ID:
        try:
            return state.service.resolve(reference, None, None)
        except ModelNotFound:
            pass
    raise RequestRejected(404, f"no public model has {what}; it may have been deleted")


async def run(request: Request) -> Response:
    state = _compat(request).server
    limits = state.service.limits
    body = await read_body(
        request, state.body_budget, limits.max_request_bytes, "request", "--max-request-bytes"
    )
    document = await state.pools.codec.call(read_map, body)
    del body
    entry = _resolve(state, document)
    session = entry.loaded()
    feeds = read_inputs(document.get("inputs"), session, limits)
    with state.metrics.inference(entry.name, entry.public) as timing:
        result = await state.inference.infer(entry, feeds, None, timing)
    outputs = [write_output(name, array) for name, array in result.outputs.items()]
    return _cbor({"outputs": outputs})


async def delete(request: Request) -> Response:
    compat = _compat(request)
    _require_management(compat)
    body = await read_body(request, compat.server.body_budget, SMALL_BODY, "request", "fixed")
    model_id = read_map(body).get("model_id")
    if not isinstance(model_id, str) or not model_id or len(model_id) > MAX_ID:
        raise _bad("send {model_id: <the id /upload answered>}")
    compat.server.service.unload_unowned(model_id)
    return _cbor(None)


# --- errors, headers and the three apps ---


def _cbor_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
    """BlindAI answered every error as HTTP 500 with a CBOR text string; so does this, with
    the same messages as the main API (never the request's data)."""

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        response = await _answer(request)
        _compat(request).server.metrics.request(
            f"(blindai) {request.url.path}",  # one of the fixed routes this wraps
            request.method,
            response.status_code,
            time.perf_counter() - started,
            received_bytes(request),
            len(response.body),
        )
        return response

    async def _answer(request: Request) -> Response:
        try:
            response = await handler(request)
        except (RequestRejected, Refusal) as exc:
            response = _cbor(exc.message.encode("utf-8", "backslashreplace").decode(), 500)
        except ClientDisconnect:
            logger.info("client disconnected during %s %s", request.method, request.url.path)
            admission.release(request)
            return Response(status_code=400, headers={"Connection": "close"})
        except Exception as exc:
            incident = uuid.uuid4().hex[:12]
            logger.error(
                "internal error %s on BlindAI %s %s: %s",
                incident,
                request.method,
                request.url.path,
                type(exc).__name__,
            )
            response = _cbor(f"internal server error (incident {incident})", 500)
        try:
            # A body left unread (a refusal before reading it) closes the connection.
            if await admission.must_close(request):
                response.headers["Connection"] = "close"
        except Exception:
            response.headers["Connection"] = "close"
        finally:
            admission.release(request)
        return response

    return endpoint


def server_header(tee_kind: str) -> bytes:
    """BlindAI's client refuses a server whose `Server` header says `mock` unless it runs in
    simulation mode: so it says so exactly when the TEE is simulation."""
    value = f"blindfold/{__version__} (BlindAI 0.6 compatible)"
    if tee_kind == "simulation":
        value += " mock: simulation TEE, no protection"
    return value.encode()


class _ServerHeader:
    """Sets the `Server` header on every answer, Starlette's own 404s included."""

    def __init__(self, app: Starlette, value: bytes) -> None:
        self.app = app
        self.value = value

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"server"]
                message["headers"] = [*headers, (b"server", self.value)]
            await send(message)

        await self.app(scope, receive, send_with_header)


@dataclass(frozen=True)
class CompatApps:
    unattested: Any  # plain HTTP: the certificate
    attested: Any  # TLS: /run
    management: Any  # TLS: /upload, /delete


def create_apps(state: ServerState, management: bool) -> CompatApps:
    compat = CompatState(state, management)
    header = server_header(state.identity.provider.kind)

    def app(*routes: tuple[str, Callable[[Request], Awaitable[Response]], str]) -> Any:
        starlette = Starlette(
            routes=[Route(path, _cbor_errors(f), methods=[method]) for path, f, method in routes]
        )
        starlette.state.blindai = compat
        return _ServerHeader(starlette, header)

    return CompatApps(
        unattested=app(("/", certificate, "GET")),
        attested=app(("/", hello, "GET"), ("/run", run, "POST")),
        management=app(
            ("/", hello, "GET"), ("/upload", upload, "POST"), ("/delete", delete, "POST")
        ),
    )
