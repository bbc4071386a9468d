"""The Oblivious HTTP gateway (RFC 9458): `POST /v2/ohttp` takes a `message/ohttp-req`,
opens it inside the TEE with the HPKE key the evidence binds (`server.hpke_keys`), runs the
Binary HTTP request inside through the same ASGI app as any other request (so its
authorization, limits and errors are exactly those of the route it names), and answers with
the response encrypted to the request's context (`message/ohttp-res`), padded to a size
bucket.

What a proxy in front sees: the outer request and response (sizes padded to buckets) and
their timing. Errors that concern the outer message (not OHTTP, a key this gateway does not
hold, does not decrypt) are plain answers, since whoever sent it cannot be answered
privately; every error of the inner request is encrypted like any response.

Replays: an encapsulated request carries a `date` field inside (RFC 9458 section 6.9); the
gateway refuses one outside `REPLAY_WINDOW_SECONDS` of its own clock (answering with its
date, so the client can correct its offset and retry), and remembers the encapsulated key of
every request inside the window, refusing a second arrival. A relay therefore cannot make
the server run a request twice (upload, delete, key changes, or inference whose timing it
would observe again).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from blindfold import ohttp
from blindfold.errors import RequestRejected
from blindfold.server.admission import read_body
from blindfold.server.limits import Limits

logger = logging.getLogger("blindfold.server")

PATH = "/v2/ohttp"
REPLAY_WINDOW_SECONDS = 120.0
# Requests remembered at most (about 100 bytes each); beyond it the gateway asks clients to
# retry rather than forget an encapsulated key that could then be replayed.
REPLAY_CACHE_ENTRIES = 500_000
# Above this, decrypting and encrypting go to the codec pool rather than the event loop
# (AES-GCM takes well under a millisecond for this much; a pool hop costs about 0.1 ms).
INLINE_BYTES = 256 * 1024
# Room for the OHTTP header, key, tag, BHTTP framing and padding to the next bucket.
FRAMING_SLACK = ohttp.DEFAULT_BUCKETS[-1] + 4096
# Inner response fields that describe the outer HTTP connection, not the message.
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date"}


class ReplayGuard:
    """Encapsulated keys seen within the replay window; touched only on the event loop."""

    def __init__(
        self, window: float = REPLAY_WINDOW_SECONDS, capacity: int = REPLAY_CACHE_ENTRIES
    ) -> None:
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def admit(self, enc: bytes, sent_at: float, now: float) -> None:
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[oldest]
        if abs(now - sent_at) > self.window:
            raise _Inner(
                400,
                f"the request's date is {now - sent_at:+.0f} s from the server's clock, outside "
                f"the {self.window:.0f} s replay window: correct the clock (the server's date is "
                "in this answer) and send it again",
            )
        if enc in self._seen:
            raise _Inner(
                400,
                "this encapsulated request was already received once: a replay, refused",
            )
        if len(self._seen) >= self.capacity:
            raise _Inner(503, "the gateway's replay memory is full; retry in a few seconds")
        # Remembered until a copy of it could no longer pass the date check.
        self._seen[enc] = now + 2 * self.window


class _Inner(Exception):
    """An error answered inside the encapsulated response."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def body_limit(state: Any) -> int:
    limits: Limits = state.service.limits
    return max(limits.max_model_bytes, limits.max_request_bytes) + FRAMING_SLACK


async def gateway(request: Request) -> Response:
    state = request.app.state.blindfold
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != ohttp.REQUEST_MEDIA_TYPE:
        raise RequestRejected(
            415, f"send an Oblivious HTTP request with Content-Type: {ohttp.REQUEST_MEDIA_TYPE}"
        )
    # The inner request's authorization is inside the encryption, so the outer body is read
    # before it can be authorized; the global body budget still bounds what is held.
    message = await read_body(
        request,
        state.body_budget,
        body_limit(state),
        "encapsulated request",
        "--max-model-bytes / --max-request-bytes",
    )
    try:
        key_id = ohttp.request_key_id(message)
        private_key = state.identity.hpke.private_key(key_id)
        if len(message) > INLINE_BYTES:
            inner, context = await state.pools.codec.call(
                ohttp.decapsulate_request, private_key, message
            )
        else:
            inner, context = ohttp.decapsulate_request(private_key, message)
    except ohttp.UnknownKeyError as exc:
        return JSONResponse(
            {"type": ohttp.KEY_PROBLEM_TYPE, "title": "unknown key", "error": str(exc)},
            status_code=400,
            media_type="application/problem+json",
        )
    except ohttp.OhttpError as exc:
        raise RequestRejected(400, f"{exc} (send message/ohttp-req, RFC 9458)") from None
    del message
    try:
        status, headers, body = await _run_inner(request, state, inner, context.enc)
    except _Inner as exc:
        status, headers, body = _inner_error(exc.status, exc.message)
    response = ohttp.BinaryResponse(status, headers, body)
    encoded = ohttp.encode_response(response, ohttp.DEFAULT_BUCKETS)
    if len(encoded) > INLINE_BYTES:
        sealed = await state.pools.codec.call(ohttp.encapsulate_response, context, encoded)
    else:
        sealed = ohttp.encapsulate_response(context, encoded)
    return Response(sealed, media_type=ohttp.RESPONSE_MEDIA_TYPE)


def _inner_error(status: int, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = JSONResponse({"error": message}).body
    return (
        status,
        [("content-type", "application/json"), ("date", ohttp.format_http_date())],
        bytes(body),
    )


async def _run_inner(
    outer: Request, state: Any, data: bytes, enc: bytes
) -> tuple[int, list[tuple[str, str]], bytes]:
    try:
        inner = ohttp.decode_request(data)
    except ohttp.OhttpError as exc:
        raise _Inner(
            400, f"{exc} (the encapsulated message must be RFC 9292 binary HTTP)"
        ) from None
    del data
    sent = next((value for name, value in reversed(inner.headers) if name == "date"), None)
    sent_at = ohttp.parse_http_date(sent) if sent else None
    if sent_at is None:
        raise _Inner(
            400,
            "the encapsulated request needs a date field (an HTTP date, RFC 9110) so that "
            "the gateway can refuse replays",
        )
    state.ohttp_replays.admit(enc, sent_at, time.time())
    path, _, query = inner.path.partition("?")
    if not path.startswith("/") or path == PATH:
        raise _Inner(400, f"the encapsulated request's path {path[:100]!r} is not an API route")
    headers = [
        (raw, value.encode("latin-1"))
        for raw, value in ((name.encode("latin-1"), value) for name, value in inner.headers)
        if raw not in HOP_BY_HOP and raw != b"host"
    ]
    headers.append((b"content-length", str(len(inner.body)).encode()))
    headers.append((b"host", (outer.headers.get("host") or "blindfold").encode("latin-1")))
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": inner.method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode("ascii"),
        "query_string": query.encode("ascii"),
        "root_path": "",
        "headers": headers,
        "client": outer.scope.get("client"),
        "server": outer.scope.get("server"),
        # Its own request state: body reservations and flags are per request.
        "state": dict(outer.scope.get("state") or {}),
    }
    body = inner.body
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered, body
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        message = {"type": "http.request", "body": body, "more_body": False}
        body = b""
        return message

    status = 500
    response_headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", []):
                if name.lower() not in HOP_BY_HOP:
                    response_headers.append((name.decode("latin-1").lower(), value.decode()))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await outer.app(scope, receive, send)
    response_headers.append(("date", ohttp.format_http_date()))
    return status, response_headers, b"".join(chunks)
