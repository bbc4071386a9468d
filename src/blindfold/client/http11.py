"""The wire format of one HTTP/1.1 exchange on a connected (TLS) socket, client side: the
request written as its parts, the response read with `recv_into` into a reused buffer and
parsed strictly (status line, header fields, Content-Length or chunked framing).

Hand-written rather than `h11` or `http.client`, by measurement: framing a tiny-model request
and parsing its response cost h11 0.16.0 about 180 µs of CPU and this module about 17 µs
(the same canned response, in-process); `http.client` (email.parser for the header,
HTTPResponse, buffered small reads) was much of the SDK's per-request CPU, which this module
cut by about a third (`benchmarks/client_cost.py`).

Everything read here arrives before it is trusted (a hostile server or proxy may write it),
so it is bounded: the response head to `HEAD_LIMIT` bytes and `MAX_FIELDS` fields, the body to
the caller's `max_body`, and a body's declared length is checked before anything is allocated.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

# One TLS record carries at most 16 KiB; 64 KiB lets one call take several, and bounds the
# response head (http.client's limits were 64 KiB a line and 100 fields).
HEAD_LIMIT = 64 * 1024
MAX_FIELDS = 100
# Interim (1xx) answers skipped before the real one; endless ones would never end the read.
MAX_INTERIM = 8
# Below this, one joined write (one TLS record) costs less than a write per part.
JOIN_BELOW = 64 * 1024
# Responses that never have a body (RFC 9112 section 6.3).
_NO_BODY = frozenset({204, 304})


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 this client accepts. A ConnectionError, as a
    connection that breaks mid-answer is: an idempotent request is sent again on a new one."""


class ResponseTooLarge(ProtocolError):
    """The response body exceeds the caller's bound; nothing past the bound was read."""


def encode_head(
    method: str, path: str, host: str, headers: Mapping[str, str], content_length: int | None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains a line break; refusing to send it")
        # Host and the framing are the transport's: a caller's copy would contradict them.
        if name.lower() not in ("host", "content-length", "transfer-encoding"):
            lines.append(f"{name}: {value}\r\n")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def write_request(
    sock: socket.socket,
    head: bytes,
    body: bytes | Sequence[bytes | memoryview] | Iterable[bytes] | None,
    content_length: int | None,
) -> None:
    """Writes the head and the body; small bodies go in the head's write, large parts each
    in their own `sendall` (never joined into one copy)."""
    if body is None:
        sock.sendall(head)
    elif isinstance(body, (bytes, bytearray, memoryview)):
        if len(body) < JOIN_BELOW:
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            sock.sendall(body)
    elif isinstance(body, Sequence):
        parts = cast(Sequence[bytes | memoryview], body)  # bytes were handled above
        if content_length is not None and content_length < JOIN_BELOW:
            sock.sendall(b"".join([head, *parts]))
        else:
            sock.sendall(head)
            for part in parts:
                sock.sendall(part)
    else:  # an iterable of chunks: written once, as they come
        sock.sendall(head)
        sent = 0
        for chunk in body:
            sock.sendall(chunk)
            sent += len(chunk)
        if sent != content_length:
            raise ValueError(
                f"the request body was {sent} bytes but declared {content_length}; "
                "the connection is closed"
            )


class ResponseReader:
    """Reads responses from one socket through one reused buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(HEAD_LIMIT)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0

    @property
    def pending(self) -> int:
        """Bytes received beyond the last response (a well-behaved server sends none)."""
        return self._end - self._start

    def read(
        self, method: str, max_body: int | None
    ) -> tuple[int, dict[str, str], bytes | bytearray, bool]:
        """One response: status, header fields (names lowercase), body, and whether the
        connection may carry another request."""
        for _ in range(MAX_INTERIM + 1):
            version, status, headers = self._read_head()
            if not 100 <= status < 200:
                break  # interim 1xx answers precede the real one
        else:
            raise ProtocolError(f"the server sent more than {MAX_INTERIM} interim 1xx answers")
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method == "HEAD" or status in _NO_BODY:
            return status, headers, b"", keep_alive
        encoding = headers.get("transfer-encoding")
        if encoding is not None:
            if encoding.lower() != "chunked" or "content-length" in headers:
                raise ProtocolError(
                    f"the server answered with Transfer-Encoding {encoding!r}"
                    + (" and a Content-Length" if "content-length" in headers else "")
                    + "; only chunked without a length is accepted. Is something other than a "
                    "Blindfold server (or a proxy that rewrites responses) on the path?"
                )
            return status, headers, self._read_chunked(max_body), keep_alive
        declared = headers.get("content-length")
        if declared is None or not declared.isdigit():
            raise ProtocolError(
                f"the server's {status} answer has no valid Content-Length ({declared!r}) and "
                "is not chunked; a Blindfold server always declares the length"
            )
        length = int(declared)
        if max_body is not None and length > max_body:
            raise ResponseTooLarge(f"the response declares {length} bytes (limit {max_body})")
        return status, headers, self._read_exact(length), keep_alive

    def _read_head(self) -> tuple[str, int, dict[str, str]]:
        block = self._read_until(b"\r\n\r\n", "response head")
        lines = block.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, _reason = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise ProtocolError(f"the server's status line is not HTTP/1.1: {lines[0][:80]!r}")
        if len(lines) - 1 > MAX_FIELDS:
            raise ProtocolError(f"the server sent more than {MAX_FIELDS} header fields")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or " " in name or "\t" in name:
                raise ProtocolError(f"malformed header field from the server: {line[:80]!r}")
            key = name.lower()
            value = value.strip(" \t")
            if key in headers:
                if key == "content-length" and headers[key] != value:
                    raise ProtocolError("the server sent two different Content-Length fields")
                if key != "content-length":
                    headers[key] = f"{headers[key]}, {value}"
                continue
            headers[key] = value
        return version, int(code), headers

    def _read_until(self, terminator: bytes, what: str) -> bytes:
        """The bytes before `terminator` (which is consumed), reading more as needed."""
        searched = self._start
        while True:
            found = self._buffer.find(terminator, searched, self._end)
            if found >= 0:
                block = bytes(self._view[self._start : found])
                self._start = found + len(terminator)
                return block
            searched = max(self._start, self._end - len(terminator) + 1)
            if self._start == 0 and self._end == len(self._buffer):
                raise ProtocolError(f"the server's {what} exceeds {HEAD_LIMIT} bytes")
            searched -= self._compact()
            self._fill()

    def _compact(self) -> int:
        """Moves the unread bytes to the buffer's start; returns how far they moved."""
        moved = self._start
        if moved:
            count = self._end - moved
            self._view[:count] = self._view[moved : self._end]
            self._start, self._end = 0, count
        return moved

    def _fill(self) -> None:
        received = self._sock.recv_into(self._view[self._end :])
        if not received:
            raise ProtocolError(
                "the server closed the connection before its answer was complete"
                if self._end or self._start
                else "the server closed the connection without answering"
            )
        self._end += received

    def _read_exact(self, length: int) -> bytes | bytearray:
        buffered = self._end - self._start
        if length <= buffered:
            body = bytes(self._view[self._start : self._start + length])
            self._start += length
            if self._start == self._end:
                self._start = self._end = 0
            return body
        # Large: received straight into the body's own buffer, no copy through ours.
        target = bytearray(length)
        view = memoryview(target)
        view[:buffered] = self._view[self._start : self._end]
        self._start = self._end = 0
        got = buffered
        while got < length:
            received = self._sock.recv_into(view[got:])
            if not received:
                raise ProtocolError(
                    f"the server closed the connection after {got} of {length} body bytes"
                )
            got += received
        return target

    def _read_chunked(self, max_body: int | None) -> bytes:
        parts: list[bytes | bytearray] = []
        total = 0
        while True:
            size_line = self._read_until(b"\r\n", "chunk size line")
            size_text = size_line.split(b";", 1)[0].strip()
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF") or len(size_text) > 16:
                raise ProtocolError(f"malformed chunk size from the server: {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                while self._read_until(b"\r\n", "trailer"):
                    pass  # trailer fields are ignored, as http.client ignored them
                return b"".join(parts)
            total += size
            if max_body is not None and total > max_body:
                raise ResponseTooLarge(f"the chunked response exceeds {max_body} bytes")
            parts.append(self._read_exact(size))
            if self._read_until(b"\r\n", "chunk end"):
                raise ProtocolError("a chunk from the server is longer than its declared size")
