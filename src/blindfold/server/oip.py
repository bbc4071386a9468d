"""Decoding Open Inference Protocol v2 infer requests and encoding their responses, with
Triton's binary tensor data extension. Pure functions: no I/O, no onnxruntime."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from blindfold import tensors
from blindfold.errors import InputError, RequestRejected
from blindfold.server.limits import Limits

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    # requested output name -> wants binary data; None when all outputs are requested
    outputs: dict[str, bool] | None = None
    binary_default: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _bad(message: str) -> RequestRejected:
    return RequestRejected(400, message)


_LONG_NUMBER = re.compile(rb"[0-9]{20}")  # 2**64 has 20 digits


def parse_json(data: bytes | bytearray | memoryview, error: str) -> Any:
    """The one JSON reader for request bodies: anything it cannot read (malformed, not UTF-8,
    nested deeper than the parser allows) is a 400 with `error`, never the parser's own
    message, which can quote the body. orjson reads it (several times faster, and its depth
    limit is a plain error); what orjson refuses or reads differently from `json` (lone
    surrogates in strings; integers beyond 64 bits, which it turns into floats) is read by
    `json`, so that such values reach the checks that name them."""
    if _LONG_NUMBER.search(data) is None:
        try:
            return orjson.loads(data)
        except ValueError:
            pass
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _bad(error) from None


def parse_infer_request(
    body: bytes | bytearray, header_length: str | None, limits: Limits
) -> InferRequest:
    view = memoryview(body)
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise _bad(
                f"Inference-Header-Content-Length {header_length!r} is not an integer"
            ) from None
        if not 0 < json_length <= len(view):
            raise _bad(
                f"Inference-Header-Content-Length is {json_length} but the body has "
                f"{len(view)} bytes"
            )
    else:
        json_length = len(view)
    if json_length > limits.max_json_bytes:
        raise json_too_large(limits)
    header = parse_json(
        view[:json_length],
        "the request's JSON header is malformed; send an OIP v2 infer request",
    )
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise _bad("the request must be a JSON object with an 'inputs' list")
    binary = view[json_length:]
    offset = 0
    total_elements = 0
    bytes_data = 0  # BYTES tensors' binary data: one Python object per element, like JSON
    inputs: dict[str, np.ndarray] = {}
    for index, item in enumerate(header["inputs"]):
        name, datatype, shape, parameters = _tensor_header(item, index)
        count = _element_count(shape, name)
        total_elements += count
        if total_elements > limits.max_tensor_elements:
            raise RequestRejected(
                413,
                f"the request's tensors hold more than the server's limit of "
                f"{limits.max_tensor_elements} elements (--max-tensor-elements)",
            )
        if name in inputs:
            raise _bad(f"input {name!r} appears twice")
        size = parameters.get("binary_data_size")
        try:
            if size is not None:
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer")
                if datatype == "BYTES":
                    bytes_data += size
                    if bytes_data > limits.max_json_bytes:
                        raise json_too_large(limits, "BYTES tensor data")
                if offset + size > len(binary):
                    raise _bad(
                        f"input {name!r} declares binary_data_size {size} but only "
                        f"{len(binary) - offset} bytes of binary data remain (truncated body?)"
                    )
                inputs[name] = tensors.tensor_from_bytes(
                    binary[offset : offset + size], datatype, shape
                )
                offset += size
            elif "data" in item:
                inputs[name] = tensors.tensor_from_json(item["data"], datatype, shape)
            else:
                raise _bad(f"input {name!r} has neither 'data' nor binary_data_size")
        except InputError as exc:
            raise _bad(f"input {name!r}: {exc}") from None
    if offset != len(binary):
        raise _bad(
            f"the body carries {len(binary) - offset} bytes of binary data that no input's "
            "binary_data_size accounts for"
        )
    parameters = _parameters(header)
    if not isinstance(parameters, dict):
        raise _bad("'parameters' must be an object")
    request = InferRequest(
        id=str(header["id"]) if "id" in header else None,
        inputs=inputs,
        parameters=parameters,
        binary_default=bool(parameters.get("binary_data_output", False)),
    )
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise _bad("'outputs' must be a list")
        request.outputs = {}
        for item in header["outputs"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _bad("each requested output needs a 'name'")
            output_parameters = _parameters(item)
            if not isinstance(output_parameters, dict):
                raise _bad(f"output {item['name']!r}: 'parameters' must be an object")
            wants = output_parameters.get("binary_data", request.binary_default)
            request.outputs[item["name"]] = bool(wants)
    return request


def json_too_large(limits: Limits, what: str = "JSON") -> RequestRejected:
    return RequestRejected(
        413,
        f"the request's {what} is larger than the server's limit of {limits.max_json_bytes} "
        "bytes for JSON and BYTES data (--max-json-bytes); send large tensors as binary "
        "tensor data (Inference-Header-Content-Length; the Blindfold SDK and tritonclient "
        "with binary_data=True do)",
    )


def _tensor_header(item: Any, index: int) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(item, dict):
        raise _bad(f"input #{index} must be an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str):
        raise _bad(f"input #{index} needs a string 'name'")
    if datatype not in tensors.SUPPORTED_DATATYPES:
        raise _bad(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of "
            f"{', '.join(tensors.SUPPORTED_DATATYPES)}"
        )
    if not isinstance(shape, list):
        raise _bad(f"input {name!r} needs a 'shape' list")
    parameters = _parameters(item)
    if not isinstance(parameters, dict):
        raise _bad(f"input {name!r}: 'parameters' must be an object")
    return name, datatype, shape, parameters


def _parameters(item: dict[str, Any]) -> Any:
    """The 'parameters' of an OIP object ({} when absent or null); the caller checks that it
    is an object, so [] or "" is refused rather than read as empty."""
    parameters = item.get("parameters")
    return {} if parameters is None else parameters


def _element_count(shape: list[Any], name: str) -> int:
    try:
        return tensors.element_count(shape)
    except InputError as exc:
        raise _bad(f"input {name!r}: {exc}") from None


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    parameters: dict[str, Any] | None = None,
) -> tuple[list[bytes | memoryview], int | None]:
    """Returns the body parts and the JSON header length (None when there is no binary part)."""
    header_outputs: list[dict[str, Any]] = []
    binary_parts: list[bytes | memoryview] = []
    for name, array in outputs.items():
        wants_binary = request.binary_default
        if request.outputs is not None:
            wants_binary = request.outputs[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": tensors.np_to_oip_dtype(array.dtype),
            "shape": list(array.shape),
        }
        if wants_binary:
            data = tensors.tensor_to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            binary_parts.append(data)
        else:
            try:
                entry["data"] = tensors.tensor_to_json_data(array)
            except InputError as exc:
                raise _bad(
                    f"output {name!r}: {exc} (ask for binary outputs with "
                    "'binary_data_output': true, or 'binary_data': true on the output)"
                ) from None
        header_outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": header_outputs,
    }
    if request.id is not None:
        document["id"] = request.id
    if parameters:
        document["parameters"] = parameters
    # tensor_to_json_data refused NaN and infinities, which orjson would write as null.
    header = orjson.dumps(document)
    if not binary_parts:
        return [header], None
    return [header, *binary_parts], len(header)
