"""Admitting request bodies: the global budget of body bytes in flight, and reading a body
into one buffer (or streaming it into a sink) while it is counted, size-checked and
(optionally) hashed.

Routes authorize a request from its headers first and only then call `read_body` or
`stream_body`: a body the server would refuse is never read. A body that does not fit the
budget is refused with 503 and Retry-After before its first byte is read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from blindfold.errors import RequestRejected

RETRY_AFTER_SECONDS = 2


class BodyBudget:
    """Bytes of request bodies the server holds or is receiving, over all requests. Every
    access happens on the event loop thread, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise RequestRejected(
                503,
                f"the server is receiving other requests' bodies and has no room for "
                f"{size} more bytes now (--max-inflight-body-bytes {self.limit}); "
                f"retry in {RETRY_AFTER_SECONDS} s",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size


class _Reservation:
    """What one request took from the budget; returned when its handler ends."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def grow(self, size: int) -> None:
        self.budget.take(size)
        self.size += size

    def release(self) -> None:
        self.budget.give_back(self.size)
        self.size = 0


def declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise RequestRejected(400, "Content-Length is not an integer") from None
    if length < 0:
        raise RequestRejected(400, "Content-Length is negative")
    return length


def has_body(request: Request) -> bool:
    return bool(declared_length(request)) or "transfer-encoding" in request.headers


def refuse_if_larger(request: Request, limit: int, what: str, flag: str) -> None:
    """Refuses from the headers alone a body that declares more than `limit` bytes."""
    length = declared_length(request)
    if length is not None and length > limit:
        raise _too_large(what, limit, flag)


def _too_large(what: str, limit: int, flag: str) -> RequestRejected:
    return RequestRejected(
        413, f"the {what} is larger than the server's limit of {limit} bytes ({flag})"
    )


async def read_body(
    request: Request,
    budget: BodyBudget,
    limit: int,
    what: str,
    flag: str,
    hasher: Any = None,
) -> bytearray:
    """The whole body in one buffer (never a second copy), under `stream_body`'s rules;
    `hasher` (e.g. a hashlib object) sees each chunk as it arrives."""
    length = declared_length(request)
    buffer = bytearray()
    view: memoryview | None = None
    size = 0

    def keep(chunk: bytes) -> None:
        nonlocal buffer, view, size
        if hasher is not None:
            hasher.update(chunk)
        if length is None:
            buffer.extend(chunk)
            return
        if view is None:  # allocated only once the budget has admitted the declared length
            buffer = bytearray(length)
            view = memoryview(buffer)
        view[size : size + len(chunk)] = chunk
        size += len(chunk)

    try:
        await stream_body(request, budget, limit, what, flag, keep)
    finally:
        if view is not None:
            view.release()
    return buffer


async def stream_body(
    request: Request,
    budget: BodyBudget,
    limit: int,
    what: str,
    flag: str,
    sink: Callable[[bytes], None],
) -> int:
    """Passes the body to `sink` chunk by chunk (nothing is buffered here) under the same
    rules as `read_body`: refused from its headers when it declares more than `limit` or
    does not fit the budget, and chunk by chunk when it grows past either. The bytes the
    sink holds stay counted in the budget until the request ends. Returns the body's size."""
    refuse_if_larger(request, limit, what, flag)
    length = declared_length(request)
    reservation = _Reservation(budget)
    request.state.body_started = True
    request.state.reservations = [*getattr(request.state, "reservations", []), reservation]
    if length is not None:
        reservation.grow(length)
    size = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        end = size + len(chunk)
        if end > limit:
            raise _too_large(what, limit, flag)
        if length is None:
            reservation.grow(len(chunk))
        elif end > length:
            raise RequestRejected(400, "the body is longer than its Content-Length")
        sink(chunk)
        size = end
    if length is not None and size != length:
        raise RequestRejected(400, f"the body ended after {size} of {length} bytes")
    request.state.body_read = True
    return size


def release(request: Request) -> None:
    """Returns what the request took from the body budget (its handler has ended)."""
    for reservation in getattr(request.state, "reservations", []):
        reservation.release()


DRAIN_LIMIT = 64 * 1024


async def must_close(request: Request) -> bool:
    """After the handler: True when the request's body was left unread and the answer must
    close the connection, so that the client stops sending instead of the server reading
    and discarding the rest. A small untouched body is drained instead, so the connection
    stays usable (an SDK call that carries `{}` to a route that ignores it)."""
    if not has_body(request) or getattr(request.state, "body_read", False):
        return False
    length = declared_length(request)
    if getattr(request.state, "body_started", False) or length is None or length > DRAIN_LIMIT:
        return True
    while True:
        message = await request.receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return False
