"""The Open Inference Protocol v2 infer messages, in both directions, for the SDK and the server.

This module owns the wire format of `POST .../infer` requests and responses: the JSON header
and Triton's binary tensor data extension (the `Inference-Header-Content-Length` header, the
`binary_data_size`, `binary_data` and `binary_data_output` parameters). Tensors themselves are
converted by `blindfold.tensors` (the one datatype table and the one BYTES codec), as
tritonclient's `utils` serves both its HTTP and gRPC clients. Pure functions: no I/O, no HTTP
statuses; callers map `MalformedMessage` and `LimitExceeded` to their own errors.

Performance: an encoded message is a list of parts (the JSON header, then each tensor's bytes,
views of the arrays' memory where possible), never joined here; decoded fixed-size tensors are
`np.frombuffer` views of the received body, not copies; headers are read with orjson.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import orjson

from blindfold import tensors
from blindfold.errors import InputError

# The one spelling of the binary extension's header (HTTP field names are case-insensitive;
# lowercase is what Binary HTTP, used by the OHTTP channel, requires).
HEADER_LENGTH = "inference-header-content-length"

Part = bytes | memoryview
Role = Literal["input", "output"]


class MalformedMessage(InputError):
    """An infer message that does not follow the protocol. The message says what was wrong
    and never quotes tensor contents."""


class LimitExceeded(MalformedMessage):
    """A message larger than the decoder's limits: `limit` names which one
    ("max_json_bytes" or "max_tensor_elements"), `what` the part of the message."""

    def __init__(self, limit: str, what: str) -> None:
        self.limit = limit
        self.what = what
        super().__init__(f"the message's {what} exceeds {limit}")


class DecodeLimits(Protocol):
    """What a decoder refuses before allocating (the server's `Limits` is one)."""

    @property
    def max_json_bytes(self) -> int: ...

    @property
    def max_tensor_elements(self) -> int: ...


@dataclass(frozen=True)
class NoLimits:
    """For messages from a peer the caller already trusts (the SDK reading the attested
    server's answers)."""

    max_json_bytes: int = 2**63
    max_tensor_elements: int = 2**63


@dataclass(frozen=True)
class Encoded:
    """An encoded message: its body as parts, the JSON header's length for the
    `Inference-Header-Content-Length` header (None: the body is all JSON), and the total."""

    parts: list[Part]
    header_length: int | None
    total: int

    def headers(self) -> dict[str, str]:
        if self.header_length is None:
            return {"Content-Type": "application/json"}
        return {
            HEADER_LENGTH: str(self.header_length),
            "Content-Type": "application/octet-stream",
        }


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    # requested output name -> wants binary data; None when all outputs are requested
    outputs: dict[str, bool] | None = None
    binary_default: bool = False

    def wants_binary(self, output: str) -> bool:
        if self.outputs is None:
            return self.binary_default
        return self.outputs[output]


@dataclass
class InferResponse:
    model_name: str | None
    model_version: str | None
    id: str | None
    outputs: dict[str, np.ndarray]  # in the order the message lists them
    parameters: dict[str, Any] = field(default_factory=dict)


# --- JSON ---

_LONG_NUMBER = re.compile(rb"[0-9]{20}")  # 2**64 has 20 digits


def read_json(data: bytes | bytearray | memoryview, error: str) -> Any:
    """The one JSON reader for message headers: anything it cannot read (malformed, not UTF-8,
    nested deeper than the parser allows) raises MalformedMessage(`error`), never the parser's
    own message, which can quote the body. orjson reads it (several times faster, and its
    depth limit is a plain error); what orjson refuses or reads differently from `json` (lone
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
        raise MalformedMessage(error) from None


# --- encoding ---


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    outputs: list[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    *,
    request_id: str | None = None,
) -> Encoded:
    """Every input as binary data, and binary outputs asked for (`outputs`: their names, or
    None for all of them)."""
    entries, parts = _encode_tensors(inputs, lambda _: True, "input")
    document: dict[str, Any] = {
        "inputs": entries,
        "parameters": {"binary_data_output": True, **(parameters or {})},
    }
    if request_id is not None:
        document["id"] = request_id
    if outputs is not None:
        document["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    return _message(document, parts)


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    wants_binary: Callable[[str], bool],
    *,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> Encoded:
    """The outputs in the given order, each as binary data or JSON `data` as
    `wants_binary(name)` says; a body without binary data is plain JSON."""
    entries, parts = _encode_tensors(outputs, wants_binary, "output")
    document: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": entries,
    }
    if request_id is not None:
        document["id"] = request_id
    if parameters:
        document["parameters"] = dict(parameters)
    return _message(document, parts)


def _encode_tensors(
    arrays: Mapping[str, np.ndarray], wants_binary: Callable[[str], bool], role: Role
) -> tuple[list[dict[str, Any]], list[Part]]:
    entries: list[dict[str, Any]] = []
    parts: list[Part] = []
    for name, array in arrays.items():
        try:
            entry: dict[str, Any] = {
                "name": name,
                "datatype": tensors.np_to_oip_dtype(array.dtype),
                "shape": list(array.shape),
            }
            if wants_binary(name):
                data = tensors.tensor_to_bytes(array)
                entry["parameters"] = {"binary_data_size": len(data)}
                parts.append(data)
            else:
                entry["data"] = tensors.tensor_to_json_data(array)
        except InputError as exc:
            raise MalformedMessage(f"{role} {name!r}: {exc}") from None
        entries.append(entry)
    return entries, parts


def _message(document: dict[str, Any], parts: list[Part]) -> Encoded:
    # tensor_to_json_data refused NaN and infinities, which orjson would write as null.
    header = orjson.dumps(document)
    if not parts:
        return Encoded([header], None, len(header))
    return Encoded([header, *parts], len(header), len(header) + sum(len(p) for p in parts))


# --- decoding ---


def decode_infer_request(
    body: bytes | bytearray | memoryview,
    header_length: str | None,
    limits: DecodeLimits | None = None,
) -> InferRequest:
    """Decodes a request; `header_length` is its `Inference-Header-Content-Length` (None when
    the body is all JSON). Refuses, before allocating, what exceeds `limits`."""
    header, binary = _split(body, header_length, limits or NoLimits(), "request")
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise MalformedMessage("the request must be a JSON object with an 'inputs' list")
    inputs = _decode_tensors(header["inputs"], binary, limits or NoLimits(), "input")
    parameters = _parameters(header, "'parameters' must be an object")
    request = InferRequest(
        id=str(header["id"]) if "id" in header else None,
        inputs=inputs,
        parameters=parameters,
        binary_default=bool(parameters.get("binary_data_output", False)),
    )
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise MalformedMessage("'outputs' must be a list")
        request.outputs = {}
        for item in header["outputs"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise MalformedMessage("each requested output needs a 'name'")
            output_parameters = _parameters(
                item, f"output {item['name']!r}: 'parameters' must be an object"
            )
            wants = output_parameters.get("binary_data", request.binary_default)
            request.outputs[item["name"]] = bool(wants)
    return request


def decode_infer_response(
    body: bytes | bytearray | memoryview,
    header_length: str | None,
    limits: DecodeLimits | None = None,
) -> InferResponse:
    """Decodes a response, with the same checks as a request; the outputs keep the
    response's order (the model's declared order, from a Blindfold server)."""
    header, binary = _split(body, header_length, limits or NoLimits(), "response")
    if not isinstance(header, dict) or not isinstance(header.get("outputs"), list):
        raise MalformedMessage("the response must be a JSON object with an 'outputs' list")
    outputs = _decode_tensors(header["outputs"], binary, limits or NoLimits(), "output")
    model_name, model_version = header.get("model_name"), header.get("model_version")
    return InferResponse(
        model_name=model_name if isinstance(model_name, str) else None,
        model_version=str(model_version) if model_version is not None else None,
        id=str(header["id"]) if "id" in header else None,
        outputs=outputs,
        parameters=_parameters(header, "the response's 'parameters' must be an object"),
    )


def _split(
    body: bytes | bytearray | memoryview,
    header_length: str | None,
    limits: DecodeLimits,
    kind: str,
) -> tuple[Any, memoryview]:
    """The parsed JSON header and a view of the binary data after it."""
    view = memoryview(body)
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise MalformedMessage(
                f"Inference-Header-Content-Length {header_length[:40]!r} is not an integer"
            ) from None
        if not 0 < json_length <= len(view):
            raise MalformedMessage(
                f"Inference-Header-Content-Length is {json_length} but the body has "
                f"{len(view)} bytes"
            )
    else:
        json_length = len(view)
    if json_length > limits.max_json_bytes:
        raise LimitExceeded("max_json_bytes", "JSON")
    header = read_json(
        view[:json_length], f"the {kind}'s JSON header is malformed; send an OIP v2 infer {kind}"
    )
    return header, view[json_length:]


def _decode_tensors(
    items: list[Any], binary: memoryview, limits: DecodeLimits, role: Role
) -> dict[str, np.ndarray]:
    offset = 0
    total_elements = 0
    bytes_data = 0  # BYTES tensors' binary data: one Python object per element, like JSON
    result: dict[str, np.ndarray] = {}
    for index, item in enumerate(items):
        name, datatype, shape, parameters = _tensor_header(item, index, role)
        try:
            total_elements += tensors.element_count(shape)
        except InputError as exc:
            raise MalformedMessage(f"{role} {name!r}: {exc}") from None
        if total_elements > limits.max_tensor_elements:
            raise LimitExceeded("max_tensor_elements", "tensors")
        if name in result:
            raise MalformedMessage(f"{role} {name!r} appears twice")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise MalformedMessage(
                    f"{role} {name!r}: binary_data_size must be a non-negative integer"
                )
            if datatype == "BYTES":
                bytes_data += size
                if bytes_data > limits.max_json_bytes:
                    raise LimitExceeded("max_json_bytes", "BYTES tensor data")
            if offset + size > len(binary):
                raise MalformedMessage(
                    f"{role} {name!r} declares binary_data_size {size} but only "
                    f"{len(binary) - offset} bytes of binary data remain (truncated body?)"
                )
            chunk: memoryview | None = binary[offset : offset + size]
            offset += size
        elif "data" in item:
            chunk = None
        else:
            raise MalformedMessage(f"{role} {name!r} has neither 'data' nor binary_data_size")
        try:
            if chunk is not None:
                result[name] = tensors.tensor_from_bytes(chunk, datatype, shape)
            else:
                result[name] = tensors.tensor_from_json(item["data"], datatype, shape)
        except InputError as exc:
            raise MalformedMessage(f"{role} {name!r}: {exc}") from None
    if offset != len(binary):
        raise MalformedMessage(
            f"the body carries {len(binary) - offset} bytes of binary data that no {role}'s "
            "binary_data_size accounts for"
        )
    return result


def _tensor_header(item: Any, index: int, role: Role) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(item, dict):
        raise MalformedMessage(f"{role} #{index} must be an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str):
        raise MalformedMessage(f"{role} #{index} needs a string 'name'")
    if datatype not in tensors.SUPPORTED_DATATYPES:
        raise MalformedMessage(
            f"{role} {name!r}: unknown datatype {datatype!r}; expected one of "
            f"{', '.join(tensors.SUPPORTED_DATATYPES)}"
        )
    if not isinstance(shape, list):
        raise MalformedMessage(f"{role} {name!r} needs a 'shape' list")
    parameters = _parameters(item, f"{role} {name!r}: 'parameters' must be an object")
    return name, datatype, shape, parameters


def _parameters(item: dict[str, Any], error: str) -> dict[str, Any]:
    """The 'parameters' of an OIP object ({} when absent or null); [] or "" is refused rather
    than read as empty."""
    parameters = item.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise MalformedMessage(error)
    return parameters
