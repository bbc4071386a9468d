"""The SDK's Oblivious HTTP channel (`connect(..., channel="ohttp")`): every API request is
sent as a Binary HTTP message encrypted to the HPKE key that the server's evidence binds,
posted to the gateway route over ordinary TLS to whatever terminates it (a load balancer
or proxy with a public certificate, checked against the system's or a given CA bundle).

Only the attested TEE can read a request or write a response: the proxy sees the gateway
path, the timing, and sizes padded to buckets (`pad_buckets`). A request carries its date,
which the gateway uses to refuse replays; when the gateway says the client's clock is off,
the channel corrects its offset from the (encrypted, so authentic) answer and retries once.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Mapping
from pathlib import Path

from blindfold import ohttp
from blindfold.client.transport import Endpoint, HttpRequest, HttpResponse, Transport
from blindfold.errors import ConfigurationError, PinnedKeyMismatch, ServerError

GATEWAY_PATH = "/v2/ohttp"

# What `verify=` accepts for the TLS to the proxy: True (the system's CA bundle), a path to
# a CA bundle, or a ready SSLContext.
VerifyTls = bool | str | Path | ssl.SSLContext


def outer_tls_context(verify: VerifyTls) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        raise ConfigurationError(
            "verify=False is not offered: the payload stays encrypted to the TEE, but an "
            "unchecked proxy could still read timing and sizes of all traffic. Pass a CA "
            "bundle path instead"
        )
    if verify is True:
        return ssl.create_default_context()
    path = Path(verify)
    if not path.is_file():
        raise ConfigurationError(f"verify={str(verify)!r}: no CA bundle file there")
    return ssl.create_default_context(cafile=str(path))


class KeyConfigurationStale(PinnedKeyMismatch):
    """The gateway no longer holds the HPKE key this client encrypted to (rotated, or the
    request reached another server): attest again. Raised before the gateway read anything."""


class OhttpTransport:
    """A `BaseTransport`: each request as an OHTTP message through the gateway route."""

    def __init__(
        self,
        endpoint: Endpoint,
        context: ssl.SSLContext,
        key_config: ohttp.KeyConfig,
        pad_buckets: tuple[int, ...] = ohttp.DEFAULT_BUCKETS,
        timeout: float = 300.0,
    ) -> None:
        self.endpoint = endpoint
        self.key_config = key_config
        self.pad_buckets = pad_buckets
        self.clock_offset = 0.0
        self._outer = Transport(endpoint, context, None, timeout)

    def handle_request(self, request: HttpRequest) -> HttpResponse:
        body = request.body
        if body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        else:
            data = b"".join(body)
        method, path, headers = request.method, request.path, request.headers
        response = self._exchange(method, path, data, headers)
        if response.status == 400 and "date" in response.headers and _clock_refusal(response):
            server_time = ohttp.parse_http_date(response.headers["date"])
            if server_time is not None:
                self.clock_offset = server_time - time.time()
                response = self._exchange(method, path, data, headers)
        return response

    def _exchange(
        self, method: str, path: str, data: bytes, headers: Mapping[str, str] | None
    ) -> HttpResponse:
        fields = [
            (name.lower(), value)
            for name, value in (headers or {}).items()
            if name.lower() not in ("content-length", "host", "date")
        ]
        fields.append(("date", ohttp.format_http_date(time.time() + self.clock_offset)))
        request = ohttp.BinaryRequest(method, path, fields, data)
        encoded = ohttp.encode_request(request, self.pad_buckets)
        message, context = ohttp.encapsulate_request(self.key_config, encoded)
        del encoded
        outer = self._outer.request(
            "POST", GATEWAY_PATH, message, {"Content-Type": ohttp.REQUEST_MEDIA_TYPE}
        )
        content_type = outer.headers.get("content-type", "").split(";")[0].strip()
        if outer.status != 200 or content_type != ohttp.RESPONSE_MEDIA_TYPE:
            raise _outer_error(outer, self.endpoint)
        inner = ohttp.decode_response(ohttp.decapsulate_response(context, outer.body))
        return HttpResponse(inner.status, dict(inner.headers), inner.body)

    def connect_and_get_certificate(self) -> bytes:
        return self._outer.connect_and_get_certificate()

    def close(self) -> None:
        self._outer.close()


def _clock_refusal(response: HttpResponse) -> bool:
    try:
        return "replay window" in json.loads(response.body)["error"]
    except (ValueError, KeyError, TypeError):
        return False


def _outer_error(outer: HttpResponse, endpoint: Endpoint) -> Exception:
    """An answer that is not an encapsulated response: from the gateway about the outer
    message, or from whatever sits in front of it."""
    try:
        document = json.loads(outer.body)
    except ValueError:
        document = None
    if isinstance(document, dict) and document.get("type") == ohttp.KEY_PROBLEM_TYPE:
        return KeyConfigurationStale(str(document.get("error")))
    message = (
        document.get("error")
        if isinstance(document, dict) and "error" in document
        else outer.body[:300].decode(errors="replace")
    )
    return ServerError(
        outer.status,
        f"the gateway at {endpoint.host}:{endpoint.port}{GATEWAY_PATH} answered "
        f"{outer.status} instead of an encapsulated response: {message}",
    )
