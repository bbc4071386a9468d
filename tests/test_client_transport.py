"""The Client's injectable transport, against a real server: the factory wraps the pinned
default, sees every request the Client sends, and a response altered on its way back (as a
broken proxy or a hostile transport would) is refused with a clear error that quotes no
tensor data."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from onnx import TensorProto

import blindfold
from blindfold import oip
from blindfold.client.transport import BaseTransport, HttpRequest, HttpResponse, Transport

from conftest import ServerProcess
from onnx_models import identity_model
from transports import Recording, send

SECRET = 1234.5678


def connect(server: ServerProcess, **kwargs: object) -> blindfold.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindfold.SimulationWarning)
        return blindfold.connect(server.url, allow_simulation=True, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model(server: ServerProcess) -> Iterator[str]:
    with connect(server) as client:
        uploaded = client.upload_model(
            identity_model(TensorProto.FLOAT), name="transport-identity", public=True
        )
        yield uploaded.sha256


def test_factory_wraps_the_pinned_default_and_sees_every_request(
    server: ServerProcess, model: str
) -> None:
    defaults: list[BaseTransport] = []
    recording = Recording()

    def factory(attested: blindfold.AttestedServer, default: BaseTransport) -> BaseTransport:
        defaults.append(default)
        return recording(attested, default)

    x = np.full((2, 3), SECRET, np.float32)
    with connect(server, transport=factory) as client:
        assert len(defaults) == 1 and isinstance(defaults[0], Transport)
        assert recording.attested == [client.attestation]
        outputs = client.run_model(model, x)
        np.testing.assert_array_equal(outputs["y"], x)
        # A hand-made request goes through the same (recording) transport.
        assert send(client, "GET", "/v2/health/live").status == 200
    paths = [request.path for request in recording.requests()]
    assert paths == [
        f"/v2/models/sha256:{model}",
        f"/v2/models/sha256:{model}/infer",
        "/v2/health/live",
    ]
    infer, answer = recording.exchanges[1]
    # What went over the wire is the OIP message of x, and what came back is x again.
    sent = oip.decode_infer_request(b"".join(_parts(infer)), infer.headers[oip.HEADER_LENGTH])
    np.testing.assert_array_equal(sent.inputs["x"], x)
    assert answer is not None
    received = oip.decode_infer_response(answer.body, answer.headers[oip.HEADER_LENGTH])
    np.testing.assert_array_equal(received.outputs["y"], x)


def _parts(request: HttpRequest) -> list[bytes | memoryview]:
    body = request.body
    assert body is not None
    return [body] if isinstance(body, bytes) else list(body)


class _Tamper:
    """Passes requests through and alters each infer response with `change`."""

    def __init__(self, change: Callable[[HttpResponse], HttpResponse]) -> None:
        self.change = change

    def __call__(self, _: blindfold.AttestedServer, default: BaseTransport) -> BaseTransport:
        self.inner = default
        return self

    def handle_request(self, request: HttpRequest) -> HttpResponse:
        response = self.inner.handle_request(request)
        return self.change(response) if request.path.endswith("/infer") else response

    def close(self) -> None:
        self.inner.close()


def _truncate(response: HttpResponse) -> HttpResponse:
    return HttpResponse(response.status, response.headers, response.body[:-4])


def _extra_bytes(response: HttpResponse) -> HttpResponse:
    return HttpResponse(response.status, response.headers, response.body + b"\0" * 8)


def _bad_length(response: HttpResponse) -> HttpResponse:
    headers = {**response.headers, oip.HEADER_LENGTH: "12abc"}
    return HttpResponse(response.status, headers, response.body)


def _not_json(response: HttpResponse) -> HttpResponse:
    length = int(response.headers[oip.HEADER_LENGTH])
    return HttpResponse(response.status, response.headers, b"x" * length + response.body[length:])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_truncate, "truncated body?"),
        (_extra_bytes, "8 bytes of binary data that no output's"),
        (_bad_length, "'12abc' is not an integer"),
        (_not_json, "JSON header is malformed"),
    ],
    ids=["truncated", "trailing-bytes", "bad-header-length", "not-json"],
)
def test_altered_responses_are_refused_clearly(
    server: ServerProcess, model: str, change: Callable[[HttpResponse], HttpResponse], expected: str
) -> None:
    x = np.full((2, 3), SECRET, np.float32)
    with (
        connect(server, transport=_Tamper(change)) as client,
        pytest.raises(blindfold.BlindfoldError) as refused,
    ):
        client.run_model(model, x)
    message = str(refused.value)
    assert "infer response is malformed" in message and expected in message
    assert "1234.5" not in message
