"""What a slow or idle client may hold: deadlines and size limits at the connection level,
which uvicorn's httptools protocol does not enforce by itself.

- a request's headers must be complete within `header_timeout` seconds of its first byte
  (for a connection's first request: of the connection's start) and within
  `max_header_bytes` (else 408 / 431, and the connection closes);
- a body must keep arriving: every `body_timeout`-second window must bring at least
  `min_body_rate` bytes per second, unless the server itself paused reading;
- idle keep-alive connections close after `keep_alive_timeout` (uvicorn's own timer);
- TLS handshakes must finish within `tls_handshake_timeout` (the event loop's timer);
- at most `max_connections` connections are served; when full, a new connection evicts the
  one that has been waiting longest without a request in progress (a slowloris socket or an
  idle keep-alive one) and is refused only when every connection is busy with a request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from blindfold.server.limits import ConnectionLimits

logger = logging.getLogger("blindfold.connections")


def _plain_answer(status: int, reason: str, message: str) -> bytes:
    body = message.encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and limits of the module docstring."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[GuardedProtocol]:
        return type("GuardedProtocol", (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_headers = True  # waiting for (the rest of) a request's headers
        self._request_started = False  # some byte of the current request arrived
        self._header_bytes = 0
        self._receiving_body = False
        self._body_bytes = 0
        self._window_start_bytes = 0
        self._waiting_since = time.monotonic()

    # --- connection lifecycle ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._evict_one():
            logger.warning(
                "refusing a connection: all %d connections are busy (--max-connections)",
                self.limits.max_connections,
            )
            transport.write(
                _plain_answer(503, "Service Unavailable", "too many connections; retry later")
            )
            transport.close()
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.transport is None:  # refused in connection_made
            return
        super().connection_lost(exc)

    def _evict_one(self) -> bool:
        """Closes the connection waiting longest without a request in progress."""
        candidates = [
            c for c in self.connections if isinstance(c, GuardedProtocol) and c._is_waiting()
        ]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda c: c._waiting_since)
        self.connections.discard(oldest)  # counted out now; closing completes later
        oldest._close(None)
        return True

    def _is_waiting(self) -> bool:
        return self._in_headers and (self.cycle is None or self.cycle.response_complete)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _close(self, answer: bytes | None) -> None:
        self._cancel_timers()
        if self.transport is None or self.transport.is_closing():
            return
        if answer is not None and (self.cycle is None or not self.cycle.response_started):
            self.transport.write(answer)
        self.transport.close()

    # --- headers: deadline and size ---

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.limits.header_timeout, self._header_deadline
            )

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not self._in_headers:
            return
        if self._request_started:
            self._close(
                _plain_answer(408, "Request Timeout", "the request headers did not arrive in time")
            )
        else:
            self._close(None)  # idle since the connection opened: nothing to answer

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            self._close(
                _plain_answer(
                    431,
                    "Request Header Fields Too Large",
                    f"request headers are limited to {self.limits.max_header_bytes} bytes",
                )
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._request_started = True
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        if self.parser is not None and self._expects_body():
            self._receiving_body = True
            self._body_bytes = self._window_start_bytes = 0
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_window)

    def _expects_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() not in (b"", b"0")
            if name == b"transfer-encoding":
                return True
        return False

    # --- body: minimum rate ---

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._receiving_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def _body_window(self) -> None:
        self._body_timer = None
        # Also after an early answer: the rest of the body is still read (and discarded).
        if not self._receiving_body:
            return
        arrived = self._body_bytes - self._window_start_bytes
        needed = self.limits.min_body_rate * self.limits.body_timeout
        # While the server itself paused reading (the application is behind), the client
        # is not to blame.
        if not self.flow.read_paused and arrived < needed:
            logger.info(
                "closing a connection whose request body arrives too slowly (%d bytes in "
                "%.0f s; --min-body-rate %d)",
                arrived,
                self.limits.body_timeout,
                self.limits.min_body_rate,
            )
            self._close(
                _plain_answer(408, "Request Timeout", "the request body arrived too slowly")
            )
            return
        self._window_start_bytes = self._body_bytes
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_window)

    # --- between requests ---

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_headers = True
        self._request_started = False
        self._header_bytes = 0
        self._waiting_since = time.monotonic()


class GuardedServer(uvicorn.Server):
    """uvicorn's server, with a deadline for TLS handshakes (uvicorn passes none to the
    event loop, whose default is a minute)."""

    def __init__(self, config: uvicorn.Config, tls_handshake_timeout: float) -> None:
        super().__init__(config)
        self._tls_handshake_timeout = tls_handshake_timeout

    async def startup(self, sockets: list[Any] | None = None) -> None:
        loop: Any = asyncio.get_running_loop()
        create_server = loop.create_server
        loop.create_server = functools.partial(
            create_server, ssl_handshake_timeout=self._tls_handshake_timeout
        )
        try:
            await super().startup(sockets=sockets)
        finally:
            del loop.create_server  # the loop's own method again
