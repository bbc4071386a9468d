"""How the SDK's requests reach the server: the transport contract (`BaseTransport`, in the
manner of httpx's: one `handle_request` method, one request in, one response out) and its
default implementation, HTTPS pinned to one attested public key.

A `Client` builds its transport after each attestation (the pin is what the evidence binds);
`Client(transport=...)` injects a factory that may wrap or replace that default, e.g. to
record every exchange. The Oblivious HTTP channel (`client.ohttp_channel`) is another
transport.

Pooled keep-alive connections, each one `ssl.SSLSocket` speaking HTTP/1.1 through
`client.http11` (measured: a third less client CPU per request than `http.client`, which was
itself several times cheaper than httpx; `benchmarks/client_cost.py`). The TLS context is
built from scratch: it trusts exactly the attested certificate and nothing from the
environment (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` are never read), and
after every handshake the peer's SubjectPublicKeyInfo hash is compared with the pin before a
byte is sent.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from blindfold.attestation.binding import spki_sha256
from blindfold.client import http11
from blindfold.errors import ConfigurationError, PinnedKeyMismatch


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme != "https":
            raise ConfigurationError(
                f"server URL {url!r} must use https:// (Blindfold only speaks attested TLS)"
            )
        if not parts.hostname:
            raise ConfigurationError(f"server URL {url!r} has no host name")
        return cls(parts.hostname, parts.port or 8443)


# A request body: bytes; a list of parts (written one by one, and sent again on a retry); or
# an iterable of chunks (written once, as they come). Parts and chunks need `content_length`.
Body = bytes | Sequence[bytes | memoryview] | Iterable[bytes] | None


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # with the query string, e.g. "/v2/models/m/infer"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Body = None
    content_length: int | None = None


@dataclass
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # names in lowercase
    body: bytes | bytearray  # bytearray: a large body, received in place


class BaseTransport(Protocol):
    """Sends one request to the attested server and returns its response. Raises
    `PinnedKeyMismatch` when the server no longer holds the attested key (before sending a
    byte), and ConnectionError (`http11.ProtocolError` among them) or ssl.SSLError when
    the connection fails."""

    def handle_request(self, request: HttpRequest) -> HttpResponse: ...

    def close(self) -> None: ...


def unverified_context() -> ssl.SSLContext:
    """For fetching attestation only: the evidence, not TLS, authenticates the server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def pinned_context(certificate_pem: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The pin replaces host-name checks: the attested key is stronger than any name.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=certificate_pem)
    return context


class PinnedConnection:
    """One keep-alive HTTP/1.1 connection over TLS (`client.http11` frames the exchanges).
    Its handshake checks the pin, when there is one, before a byte is sent."""

    def __init__(
        self, endpoint: Endpoint, context: ssl.SSLContext, pin: bytes | None, timeout: float
    ) -> None:
        self.host, self.port = endpoint.host, endpoint.port
        self._context = context
        self._pin = pin
        self._timeout = timeout
        name = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host  # IPv6
        self._host_header = name if endpoint.port == 443 else f"{name}:{endpoint.port}"
        self.sock: ssl.SSLSocket | None = None
        self._reader: http11.ResponseReader | None = None
        self.peer_certificate: bytes = b""

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self._timeout)
        try:
            # Requests are written whole: Nagle would only delay the last segment.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._context.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            if self._pin is None:
                raise  # a proxy's certificate (the ohttp channel), checked against a CA bundle
            raise PinnedKeyMismatch(
                f"the server at {self.host}:{self.port} presented a certificate other than the "
                f"attested one ({exc.verify_message}); it restarted or someone is in the "
                "middle. No data was sent."
            ) from None
        except BaseException:
            raw.close()
            raise
        self.peer_certificate = sock.getpeercert(binary_form=True) or b""
        if self._pin is not None and spki_sha256(self.peer_certificate) != self._pin:
            sock.close()
            raise PinnedKeyMismatch(
                f"the server at {self.host}:{self.port} presented public key "
                f"{spki_sha256(self.peer_certificate).hex()}, expected the attested "
                f"{self._pin.hex()}. No data was sent."
            )
        self.sock = sock
        self._reader = http11.ResponseReader(sock)

    def exchange(
        self, request: HttpRequest, max_body: int | None = None
    ) -> tuple[HttpResponse, bool]:
        """Sends `request` and reads the answer (its body bounded by `max_body`); returns it
        and whether this connection may carry another request."""
        if self.sock is None or self._reader is None:
            self.connect()
        sock, reader = self.sock, self._reader
        if sock is None or reader is None:  # connect() sets both or raises
            raise ConnectionError(f"no connection to {self.host}:{self.port}")
        body = request.body
        length = request.content_length
        if isinstance(body, bytes):
            length = len(body)
        elif body is None and request.method in ("POST", "PUT", "PATCH"):
            length = 0
        head = http11.encode_head(
            request.method, request.path, self._host_header, request.headers, length
        )
        http11.write_request(sock, head, body, length)
        status, headers, data, keep_alive = reader.read(request.method, max_body)
        # Bytes beyond the answer were not asked for: the connection's framing is lost.
        return HttpResponse(status, headers, data), keep_alive and not reader.pending

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self._reader = None


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has data or EOF waiting, without blocking. poll(), not select(): select
    cannot watch descriptors numbered 1024 or more, which busy processes hand out."""
    if not hasattr(select, "poll"):  # Windows: select has no descriptor-number limit there
        return bool(select.select([sock], [], [], 0)[0])
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class Transport:
    """The default transport: a small thread-safe pool of keep-alive connections sharing one
    TLS context, each checking the pin in its handshake."""

    def __init__(
        self, endpoint: Endpoint, context: ssl.SSLContext, pin: bytes | None, timeout: float = 300.0
    ) -> None:
        self.endpoint = endpoint
        self._context = context
        self._pin = pin
        self._timeout = timeout
        self._idle: queue.LifoQueue[PinnedConnection] = queue.LifoQueue()

    def request(
        self,
        method: str,
        path: str,
        body: Body = None,
        headers: Mapping[str, str] | None = None,
        content_length: int | None = None,
    ) -> HttpResponse:
        """`handle_request` spelled as arguments."""
        return self.handle_request(HttpRequest(method, path, headers or {}, body, content_length))

    def handle_request(self, request: HttpRequest) -> HttpResponse:
        connection = self._checkout()
        try:
            response, reusable = connection.exchange(request)
        except BaseException:
            connection.close()
            raise
        if reusable:
            self._idle.put(connection)
        else:
            connection.close()
        return response

    def connect_and_get_certificate(self) -> bytes:
        """Opens a connection (checking the pin, if any) and returns the peer certificate."""
        connection = self._checkout()
        if connection.sock is None:
            connection.connect()
        certificate = connection.peer_certificate
        self._idle.put(connection)
        return certificate

    def _checkout(self) -> PinnedConnection:
        while True:
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                return PinnedConnection(self.endpoint, self._context, self._pin, self._timeout)
            # An idle keep-alive socket that is readable was closed by the server (it may have
            # restarted with a new key): drop it, so the next handshake checks the pin again.
            if connection.sock is not None and _readable(connection.sock):
                connection.close()
                continue
            return connection

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
