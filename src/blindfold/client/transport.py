"""How the SDK's requests reach the server: the transport contract (`BaseTransport`, in the
manner of httpx's: one `handle_request` method, one request in, one response out) and its
default implementation, HTTPS pinned to one attested public key.

A `Client` builds its transport after each attestation (the pin is what the evidence binds);
`Client(transport=...)` injects a factory that may wrap or replace that default, e.g. to
record every exchange. The Oblivious HTTP channel (`client.ohttp_channel`) is another
transport.

Uses the standard library's `http.client` with keep-alive (measured several times cheaper
per request than httpx on this workload). The TLS context is built from scratch: it trusts
exactly the attested certificate and nothing from the environment (`SSL_CERT_FILE`,
`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` are never read), and after every handshake the
peer's SubjectPublicKeyInfo hash is compared with the pin before a byte is sent.
"""

from __future__ import annotations

import http.client
import queue
import select
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from blindfold.attestation.binding import spki_sha256
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
    body: bytes


class BaseTransport(Protocol):
    """Sends one request to the attested server and returns its response. Raises
    `PinnedKeyMismatch` when the server no longer holds the attested key (before sending a
    byte), and ConnectionError, http.client.HTTPException or ssl.SSLError when the
    connection fails."""

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


class PinnedConnection(http.client.HTTPSConnection):
    def __init__(
        self, endpoint: Endpoint, context: ssl.SSLContext, pin: bytes | None, timeout: float
    ) -> None:
        super().__init__(endpoint.host, endpoint.port, context=context, timeout=timeout)
        self._pin = pin
        self.peer_certificate: bytes = b""

    def connect(self) -> None:
        try:
            super().connect()
        except ssl.SSLCertVerificationError as exc:
            if self._pin is None:
                raise  # a proxy's certificate (the ohttp channel), checked against a CA bundle
            raise PinnedKeyMismatch(
                f"the server at {self.host}:{self.port} presented a certificate other than the "
                f"attested one ({exc.verify_message}); it restarted or someone is in the "
                "middle. No data was sent."
            ) from None
        if not isinstance(self.sock, ssl.SSLSocket):
            raise PinnedKeyMismatch(
                f"the connection to {self.host}:{self.port} is not TLS, so its key cannot be "
                "checked against the attested one. No data was sent."
            )
        self.peer_certificate = self.sock.getpeercert(binary_form=True) or b""
        if self._pin is not None and spki_sha256(self.peer_certificate) != self._pin:
            self.sock.close()
            raise PinnedKeyMismatch(
                f"the server at {self.host}:{self.port} presented public key "
                f"{spki_sha256(self.peer_certificate).hex()}, expected the attested "
                f"{self._pin.hex()}. No data was sent."
            )


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
        body = request.body
        try:
            send_headers = dict(request.headers)
            if body is not None and not isinstance(body, bytes):
                send_headers["Content-Length"] = str(request.content_length)
            connection.request(request.method, request.path, body=body, headers=send_headers)
            response = connection.getresponse()
            data = response.read()
        except Exception:
            connection.close()
            raise
        if response.will_close:
            connection.close()
        else:
            self._idle.put(connection)
        return HttpResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, data)

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
