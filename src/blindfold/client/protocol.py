"""The client half of the Open Inference Protocol: building binary infer requests and
reading responses. Every tensor travels as binary data; JSON carries only headers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from blindfold import tensors
from blindfold.errors import BlindfoldError


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    outputs: list[str] | None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[list[bytes | memoryview], int, int]:
    """Returns (body parts, JSON header length, total length)."""
    header_inputs = []
    parts: list[bytes | memoryview] = []
    for name, array in inputs.items():
        data = tensors.tensor_to_bytes(array)
        header_inputs.append(
            {
                "name": name,
                "datatype": tensors.np_to_oip_dtype(array.dtype),
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(data)},
            }
        )
        parts.append(data)
    document: dict[str, Any] = {
        "inputs": header_inputs,
        "parameters": {"binary_data_output": True, **(parameters or {})},
    }
    if outputs is not None:
        document["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    header = json.dumps(document, separators=(",", ":")).encode()
    total = len(header) + sum(len(p) for p in parts)
    return [header, *parts], len(header), total


def decode_infer_response(
    body: bytes, header_length: str | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Returns the outputs in the server's (the model's declared) order, and the header."""
    view = memoryview(body)
    length = int(header_length) if header_length is not None else len(view)
    try:
        header = json.loads(bytes(view[:length]))
        offset = length
        outputs: dict[str, np.ndarray] = {}
        for item in header["outputs"]:
            size = (item.get("parameters") or {}).get("binary_data_size")
            if size is None:
                outputs[item["name"]] = tensors.tensor_from_json(
                    item["data"], item["datatype"], item["shape"]
                )
                continue
            outputs[item["name"]] = tensors.tensor_from_bytes(
                view[offset : offset + size], item["datatype"], item["shape"]
            )
            offset += size
    except (ValueError, KeyError, TypeError) as exc:
        raise BlindfoldError(
            f"the server's infer response is malformed ({exc}); is it a Blindfold server?"
        ) from None
    return outputs, header
