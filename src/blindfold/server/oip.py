"""The server's side of the Open Inference Protocol codec (`blindfold.oip`): decoding infer
requests under the server's limits and encoding their responses, with the codec's errors
turned into HTTP refusals (400 for malformed messages, 413 naming the flag that raises a
limit). Pure functions: no I/O, no onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np

from blindfold import oip
from blindfold.errors import RequestRejected
from blindfold.oip import HEADER_LENGTH, InferRequest
from blindfold.server.limits import Limits

__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "encode_infer_response",
    "json_too_large",
    "parse_infer_request",
    "parse_json",
]


def parse_json(data: bytes | bytearray | memoryview, error: str) -> Any:
    """The one JSON reader for request bodies (`oip.read_json`): anything it cannot read is a
    400 with `error`, never the parser's own message, which can quote the body."""
    try:
        return oip.read_json(data, error)
    except oip.MalformedMessage as exc:
        raise RequestRejected(400, str(exc)) from None


def parse_infer_request(
    body: bytes | bytearray, header_length: str | None, limits: Limits
) -> InferRequest:
    try:
        return oip.decode_infer_request(body, header_length, limits)
    except oip.LimitExceeded as exc:
        raise _limit_refusal(exc, limits) from None
    except oip.MalformedMessage as exc:
        raise RequestRejected(400, str(exc)) from None


def _limit_refusal(exc: oip.LimitExceeded, limits: Limits) -> RequestRejected:
    if exc.limit == "max_tensor_elements":
        return RequestRejected(
            413,
            f"the request's tensors hold more than the server's limit of "
            f"{limits.max_tensor_elements} elements (--max-tensor-elements)",
        )
    return json_too_large(limits, exc.what)


def json_too_large(limits: Limits, what: str = "JSON") -> RequestRejected:
    return RequestRejected(
        413,
        f"the request's {what} is larger than the server's limit of {limits.max_json_bytes} "
        "bytes for JSON and BYTES data (--max-json-bytes); send large tensors as binary "
        "tensor data (Inference-Header-Content-Length; the Blindfold SDK and tritonclient "
        "with binary_data=True do)",
    )


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    parameters: dict[str, Any] | None = None,
) -> tuple[list[bytes | memoryview], int | None]:
    """Returns the body parts and the JSON header length (None when there is no binary part)."""
    try:
        encoded = oip.encode_infer_response(
            model_name,
            model_version,
            outputs,
            request.wants_binary,
            request_id=request.id,
            parameters=parameters,
        )
    except oip.MalformedMessage as exc:
        raise RequestRejected(
            400,
            f"{exc} (ask for binary outputs with 'binary_data_output': true, or "
            "'binary_data': true on the output)",
        ) from None
    return encoded.parts, encoded.header_length
