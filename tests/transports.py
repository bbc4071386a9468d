"""Tests' use of the Client's public transport: hand-made requests over its attested channel,
and a recording transport (injected with `connect(..., transport=Recording())`) that wraps
the real pinned transport and keeps every exchange."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import blindfold
from blindfold.client.transport import BaseTransport, HttpRequest, HttpResponse


def send(
    client: blindfold.Client,
    method: str,
    path: str,
    body: bytes | list[bytes | memoryview] | None = None,
    headers: dict[str, str] | None = None,
    *,
    token: str | None = None,
) -> HttpResponse:
    """Sends a hand-made request through the client's transport (no retries, no error
    mapping); `token` goes as the Bearer token."""
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    length = None if body is None or isinstance(body, bytes) else sum(len(p) for p in body)
    return client.transport.handle_request(HttpRequest(method, path, sent, body, length))


@dataclass
class Recording:
    """A transport factory for `connect(transport=...)`: each attestation's default
    transport is wrapped, and every request with its response (or None when it raised)
    is kept in `exchanges`, in order."""

    exchanges: list[tuple[HttpRequest, HttpResponse | None]] = field(default_factory=list)
    attested: list[blindfold.AttestedServer] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, attested: blindfold.AttestedServer, default: BaseTransport) -> BaseTransport:
        self.attested.append(attested)
        return _Recorder(self, default)

    def requests(self) -> list[HttpRequest]:
        with self._lock:
            return [request for request, _ in self.exchanges]


@dataclass
class _Recorder:
    recording: Recording
    inner: BaseTransport

    def handle_request(self, request: HttpRequest) -> HttpResponse:
        response: HttpResponse | None = None
        try:
            response = self.inner.handle_request(request)
            return response
        finally:
            with self.recording._lock:
                self.recording.exchanges.append((request, response))

    def close(self) -> None:
        self.inner.close()
