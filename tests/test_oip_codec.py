"""The one Open Inference Protocol codec (`blindfold.oip`): every datatype round-trips through
requests and responses in both directions, and malformed messages are refused with an error
naming what was wrong, never quoting tensor contents. Pure functions: no server needed."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from blindfold import oip, tensors

SECRET = 1234.5678
SECRET_TEXT = "1234.56"
BYTES_SECRET = b"SECRET-TENSOR-abc"


def _body(encoded: oip.Encoded) -> bytes:
    return b"".join(encoded.parts)


def _header_length(encoded: oip.Encoded) -> str | None:
    return None if encoded.header_length is None else str(encoded.header_length)


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        items = [f"é{i}".encode() * (i % 3) for i in range(count)]  # empty and non-ASCII
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = tensors.oip_to_np_dtype(datatype)
    if datatype == "BOOL":
        flags: np.ndarray = np.arange(count) % 3 == 0
        return flags.reshape(shape)
    if dtype.kind == "f":
        floats: np.ndarray = np.arange(count, dtype=dtype) * dtype.type(0.5) - 1
        return floats.reshape(shape)
    info = np.iinfo(dtype)
    values = np.array([info.min, info.max, 0, 1, 7], dtype=dtype)
    return np.resize(values, count).reshape(shape)


def _equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert tensors.np_to_oip_dtype(a.dtype) == tensors.np_to_oip_dtype(b.dtype)
    if a.dtype == object or b.dtype == object:
        assert list(a.reshape(-1)) == list(b.reshape(-1))
    else:
        np.testing.assert_array_equal(a, b)


SHAPES = [(2, 3), (), (0,), (3, 0, 2)]


@pytest.mark.parametrize("datatype", tensors.SUPPORTED_DATATYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_request_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    array = _sample(datatype, shape)
    encoded = oip.encode_infer_request({"x": array}, ["y"], {"receipt": True})
    request = oip.decode_infer_request(_body(encoded), _header_length(encoded))
    _equal(request.inputs["x"], array)
    assert request.outputs == {"y": True}
    assert request.parameters["receipt"] is True
    assert request.wants_binary("y")


@pytest.mark.parametrize("datatype", tensors.SUPPORTED_DATATYPES)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_response_round_trip(datatype: str, binary: bool, shape: tuple[int, ...]) -> None:
    array = _sample(datatype, shape)
    encoded = oip.encode_infer_response(
        "m", "1", {"y": array, "z": array[..., None]}, lambda _: binary, request_id="r1"
    )
    assert (encoded.header_length is None) == (not binary)
    response = oip.decode_infer_response(_body(encoded), _header_length(encoded))
    assert list(response.outputs) == ["y", "z"]  # the order the encoder was given
    _equal(response.outputs["y"], array)
    _equal(response.outputs["z"], array[..., None])
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "r1")


def test_fp16_and_bool_keep_their_wire_types() -> None:
    half = np.array([[1.5, -2.0, 65504.0]], dtype=np.float16)
    flags = np.array([True, False, True])
    encoded = oip.encode_infer_request({"h": half, "b": flags})
    header = json.loads(bytes(encoded.parts[0]))
    assert [(i["datatype"], i["parameters"]["binary_data_size"]) for i in header["inputs"]] == [
        ("FP16", 6),
        ("BOOL", 3),
    ]
    request = oip.decode_infer_request(_body(encoded), _header_length(encoded))
    assert request.inputs["h"].dtype == np.float16 and request.inputs["b"].dtype == np.bool_
    _equal(request.inputs["h"], half)
    _equal(request.inputs["b"], flags)


def test_non_contiguous_and_big_endian_arrays_are_sent_as_their_values() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = base[::2, ::3]  # non-contiguous view
    transposed = base.T
    big_endian = np.arange(5, dtype=">i4")
    assert not strided.flags.c_contiguous and not transposed.flags.c_contiguous
    encoded = oip.encode_infer_request({"s": strided, "t": transposed, "be": big_endian})
    request = oip.decode_infer_request(_body(encoded), _header_length(encoded))
    _equal(request.inputs["s"], strided)
    _equal(request.inputs["t"], transposed)
    np.testing.assert_array_equal(request.inputs["be"], big_endian)
    assert request.inputs["be"].dtype == np.dtype("<i4")


def test_contiguous_tensors_are_views_in_both_directions() -> None:
    """The performance contract: encoding a contiguous little-endian array hands out its
    memory (no copy), and decoding gives an array over the received body (no copy)."""
    array = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    encoded = oip.encode_infer_request({"x": array})
    part = encoded.parts[1]
    assert isinstance(part, memoryview) and np.shares_memory(np.frombuffer(part, np.uint8), array)
    body = bytearray(_body(encoded))
    request = oip.decode_infer_request(body, _header_length(encoded))
    received = request.inputs["x"]
    assert np.shares_memory(received, np.frombuffer(body, np.uint8))
    assert encoded.total == len(body)


def test_headers_use_the_one_header_name() -> None:
    encoded = oip.encode_infer_request({"x": np.zeros(2, np.float32)})
    assert encoded.headers()[oip.HEADER_LENGTH] == str(encoded.header_length)
    as_json = oip.encode_infer_response("m", "1", {"y": np.zeros(2)}, lambda _: False)
    assert oip.HEADER_LENGTH not in as_json.headers()


def test_bytes_tensors_are_length_prefixed() -> None:
    array = np.array([b"ab", b"", "ç"], dtype=object)
    encoded = oip.encode_infer_request({"s": array})
    assert encoded.parts[1] == b"\x02\x00\x00\x00ab" + b"\x00" * 4 + b"\x02\x00\x00\x00\xc3\xa7"
    request = oip.decode_infer_request(_body(encoded), _header_length(encoded))
    assert list(request.inputs["s"]) == [b"ab", b"", "ç".encode()]


# --- malformed messages ---


def _request(inputs: list[Any], binary: bytes = b"", **extra: Any) -> tuple[bytes, str]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + binary, str(len(header))


def _f32(shape: Any, size: Any = None, datatype: str = "FP32") -> dict[str, Any]:
    parameters = {} if size is None else {"binary_data_size": size}
    return {"name": "x", "datatype": datatype, "shape": shape, "parameters": parameters}


SECRET_FLOATS = np.full(6, SECRET, np.float32).tobytes()
SECRET_BYTES = struct.pack("<I", len(BYTES_SECRET)) + BYTES_SECRET

MALFORMED_REQUESTS = [
    ("length-not-int", b"{}", "12abc", "'12abc' is not an integer"),
    ("length-zero", b"{}", "0", "Inference-Header-Content-Length is 0"),
    ("length-too-long", b"{}", "99", "is 99 but the body has 2 bytes"),
    ("not-json", b'{"inputs": [', None, "JSON header is malformed"),
    ("not-utf8", b'{"inputs": ["\xff"]}', None, "JSON header is malformed"),
    ("deep-json", b"[" * 100_000 + b"]" * 100_000, None, "JSON header is malformed"),
    ("no-inputs", b'{"outputs": []}', None, "an 'inputs' list"),
    ("not-object", *_request(["x"]), "input #0 must be an object"),
    ("no-name", *_request([{"datatype": "FP32", "shape": [1]}]), "input #0 needs a string 'name'"),
    ("unknown-datatype", *_request([_f32([6], 24, "FP8")], SECRET_FLOATS), "unknown datatype"),
    ("shape-not-list", *_request([_f32("2x3", 24)], SECRET_FLOATS), "needs a 'shape' list"),
    ("negative-dim", *_request([_f32([-2, 3], 24)], SECRET_FLOATS), "dimensions must be integers"),
    ("float-dim", *_request([_f32([2.5, 3], 24)], SECRET_FLOATS), "dimensions must be integers"),
    ("too-many-dims", *_request([_f32([1] * 65, 4)], SECRET_FLOATS[:4]), "65 dimensions"),
    ("size-mismatch", *_request([_f32([2, 3], 20)], SECRET_FLOATS[:20]), "needs 24 bytes, got 20"),
    ("truncated", *_request([_f32([2, 3], 24)], SECRET_FLOATS[:20]), "truncated body?"),
    ("trailing", *_request([_f32([2, 3], 24)], SECRET_FLOATS + b"\0" * 8), "8 bytes of binary"),
    ("negative-size", *_request([_f32([2, 3], -24)], SECRET_FLOATS), "non-negative integer"),
    ("bool-size", *_request([_f32([1], True)], SECRET_FLOATS[:4]), "non-negative integer"),
    ("no-data", *_request([_f32([2, 3])]), "neither 'data' nor binary_data_size"),
    ("json-count", *_request([{**_f32([2, 3]), "data": [SECRET] * 5}]), "needs 6 elements, got 5"),
    ("json-type", *_request([{**_f32([1]), "data": ["SECRET-TENSOR-abc"]}]), "cannot be read"),
    ("duplicate", *_request([_f32([1], 4), _f32([1], 4)], SECRET_FLOATS[:8]), "appears twice"),
    ("bad-params", *_request([{**_f32([1], 4), "parameters": []}]), "'parameters' must be"),
    ("top-params", *_request([], parameters=[1]), "'parameters' must be an object"),
    ("outputs-not-list", *_request([], outputs={}), "'outputs' must be a list"),
    ("output-no-name", *_request([], outputs=[{}]), "each requested output needs a 'name'"),
    (
        "bytes-count",
        *_request([{**_f32([2], len(SECRET_BYTES), "BYTES")}], SECRET_BYTES),
        "ends after 1 of 2 elements",
    ),
    (
        "bytes-overrun",
        *_request([{**_f32([1], 4 + 3, "BYTES")}], SECRET_BYTES[:7]),
        "declares 17 bytes but only 3 remain",
    ),
    (
        "bytes-trailing",
        *_request([{**_f32([1], len(SECRET_BYTES) + 1, "BYTES")}], SECRET_BYTES + b"!"),
        "1 bytes after its 1 elements",
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "expected"),
    [case[1:] for case in MALFORMED_REQUESTS],
    ids=[case[0] for case in MALFORMED_REQUESTS],
)
def test_malformed_request_is_refused_clearly(
    body: bytes, header_length: str | None, expected: str
) -> None:
    with pytest.raises(oip.MalformedMessage) as caught:
        oip.decode_infer_request(body, header_length)
    message = str(caught.value)
    assert expected in message
    assert SECRET_TEXT not in message and "SECRET" not in message


def _response(size: int, binary: bytes) -> tuple[bytes, str]:
    item = {"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": size}}
    header = json.dumps({"outputs": [item]}).encode()
    return header + binary, str(len(header))


@pytest.mark.parametrize(
    ("body", "header_length", "expected"),
    [
        (b'{"inputs": []}', None, "an 'outputs' list"),
        (b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [2]}]}', None, "neither"),
        (*_response(8, SECRET_FLOATS[:4]), "only 4 bytes of binary data remain"),
        (b'{"outputs": [], "parameters": 5}', None, "'parameters' must be an object"),
    ],
    ids=["no-outputs", "no-data", "truncated", "bad-params"],
)
def test_malformed_response_is_refused_clearly(
    body: bytes, header_length: str | None, expected: str
) -> None:
    with pytest.raises(oip.MalformedMessage) as caught:
        oip.decode_infer_response(body, header_length)
    assert expected in str(caught.value)
    assert "output" in str(caught.value) or "response" in str(caught.value)
    assert SECRET_TEXT not in str(caught.value)


class _Limits:
    max_json_bytes = 150
    max_tensor_elements = 10


@pytest.mark.parametrize(
    ("body", "header_length", "limit", "what"),
    [
        (
            *_request([_f32([11], 44)], np.zeros(11, np.float32).tobytes()),
            "max_tensor_elements",
            "tensors",
        ),
        (json.dumps({"inputs": [], "pad": "x" * 200}).encode(), None, "max_json_bytes", "JSON"),
        (
            *_request([{**_f32([1], 204, "BYTES")}], struct.pack("<I", 200) + b"s" * 200),
            "max_json_bytes",
            "BYTES tensor data",
        ),
    ],
    ids=["elements", "json", "bytes-data"],
)
def test_limits_are_refused_before_decoding(
    body: bytes, header_length: str | None, limit: str, what: str
) -> None:
    with pytest.raises(oip.LimitExceeded) as caught:
        oip.decode_infer_request(body, header_length, _Limits())
    assert (caught.value.limit, caught.value.what) == (limit, what)


@pytest.mark.parametrize(
    "array",
    [np.array([np.nan], np.float32), np.array([b"\xff\xfe"], dtype=object)],
    ids=["nan", "not-utf8"],
)
def test_outputs_json_cannot_carry_are_refused_when_encoding(array: np.ndarray) -> None:
    with pytest.raises(oip.MalformedMessage, match="output 'y'"):
        oip.encode_infer_response("m", "1", {"y": array}, lambda _: False)
    # as binary data they travel fine
    encoded = oip.encode_infer_response("m", "1", {"y": array}, lambda _: True)
    decoded = oip.decode_infer_response(_body(encoded), _header_length(encoded)).outputs["y"]
    assert decoded.shape == (1,)


def test_unsupported_numpy_dtype_is_refused_when_encoding() -> None:
    with pytest.raises(oip.MalformedMessage, match=r"input 'x': numpy dtype complex64"):
        oip.encode_infer_request({"x": np.zeros(2, np.complex64)})
