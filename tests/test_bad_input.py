"""Bad input gets a clear 4xx and leaves the server serving; tensor contents never leak into
error messages or logs. Real servers on loopback, real onnxruntime, real ONNX models."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

import blindfold

from conftest import ServerProcess, start_server
from helpers import connect
from onnx_models import (
    add_mul_model,
    custom_domain_model,
    external_data_model,
    gather_model,
    identity_model,
    matmul_model,
)
from server_process import unverified_context
from transports import send

FLOAT_SENTINEL = 1234.5678
FLOAT_SENTINEL_TEXT = "1234.56"
BYTES_SENTINEL = "SECRET-TENSOR-abc"
MODEL_SENTINEL = "SECRET-MODEL-xyz"
INDEX_SENTINEL = 987654321


def raw(
    client: blindfold.Client,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, str]:
    """Sends a hand-made request over the pinned transport; returns (status, error message)."""
    response = send(client, method, path, body, headers or {})
    if response.status < 400:
        return response.status, ""
    document = json.loads(response.body)
    assert set(document) == {"error"}, document
    assert isinstance(document["error"], str) and document["error"]
    return response.status, document["error"]


def binary_request(
    inputs: list[dict[str, Any]], data: bytes, header_length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": inputs}).encode()
    length = len(header) if header_length is None else header_length
    return header + data, {"Inference-Header-Content-Length": str(length)}


def json_request(inputs: list[dict[str, Any]], **extra: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": inputs, **extra}).encode(), {"Content-Type": "application/json"}


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def assert_serving(client: blindfold.Client, name: str = "bad-healthy") -> None:
    x = np.random.default_rng().integers(-(2**31), 2**31 - 1, size=(4, 3), dtype=np.int32)
    np.testing.assert_array_equal(client.run_model(name, x)["y"], x)


# --- the shared server ---


@pytest.fixture(scope="module")
def bad(server: ServerProcess) -> Iterator[blindfold.Client]:
    """A client of the shared server holding the models this module attacks."""
    models = {
        "bad-healthy": identity_model(TensorProto.INT32, name="bad-h"),
        "bad-f32": identity_model(TensorProto.FLOAT, name="bad-f"),
        "bad-str": identity_model(TensorProto.STRING, ["N"], name="bad-s"),
        "bad-add-mul": add_mul_model(),
        "bad-gather": gather_model(),
    }
    with connect(server) as connection:
        tokens = {
            name: connection.upload_model(model, name=name, public=True).owner_token
            for name, model in models.items()
        }
        yield connection
        for name, token in tokens.items():
            connection.delete_model(name, token=token)


F32 = "/v2/models/bad-f32/infer"
STR = "/v2/models/bad-str/infer"
SIX_FLOATS = np.arange(6, dtype=np.float32).tobytes()


def _f32_input(shape: list[Any], size: int | None = None, datatype: str = "FP32") -> dict[str, Any]:
    item: dict[str, Any] = {"name": "x", "datatype": datatype, "shape": shape}
    if size is not None:
        item["parameters"] = {"binary_data_size": size}
    return item


INFER_CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("malformed-json", F32, b'{"inputs": [', {}, 400, "JSON header is malformed"),
    ("empty-body", F32, b"", {}, 400, "malformed"),
    ("json-not-object", F32, b"[1, 2, 3]", {}, 400, "'inputs' list"),
    ("inputs-not-list", F32, b'{"inputs": {"x": 1}}', {}, 400, "'inputs' list"),
    (
        "header-length-larger-than-body",
        F32,
        *binary_request([_f32_input([2, 3], 24)], SIX_FLOATS, header_length=10_000),
        400,
        "Inference-Header-Content-Length is 10000 but the body has",
    ),
    (
        "header-length-not-integer",
        F32,
        b'{"inputs": []}',
        {"Inference-Header-Content-Length": "12abc"},
        400,
        "is not an integer",
    ),
    (
        "header-length-zero",
        F32,
        b'{"inputs": []}',
        {"Inference-Header-Content-Length": "0"},
        400,
        "Inference-Header-Content-Length is 0",
    ),
    (
        "wrong-dtype",
        F32,
        *binary_request([_f32_input([2, 3], 48, "FP64")], np.zeros(6).tobytes()),
        400,
        "datatype FP64, the model expects FP32",
    ),
    (
        "wrong-dtype-json",
        F32,
        *json_request([{"name": "x", "datatype": "INT32", "shape": [1, 3], "data": [1, 2, 3]}]),
        400,
        "datatype INT32, the model expects FP32",
    ),
    (
        "wrong-shape",
        F32,
        *binary_request([_f32_input([3, 2], 24)], SIX_FLOATS),
        400,
        "shape [3, 2], the model expects [-1, 3]",
    ),
    (
        "wrong-rank",
        F32,
        *binary_request([_f32_input([6], 24)], SIX_FLOATS),
        400,
        "shape [6], the model expects [-1, 3]",
    ),
    (
        "wrong-rank-3d",
        F32,
        *binary_request([_f32_input([1, 2, 3], 24)], SIX_FLOATS),
        400,
        "the model expects [-1, 3]",
    ),
    (
        "truncated-binary",
        F32,
        *binary_request([_f32_input([2, 3], 24)], SIX_FLOATS[:20]),
        400,
        "only 20 bytes of binary data remain",
    ),
    (
        "binary-size-larger-than-data",
        F32,
        *binary_request([_f32_input([2, 3], 28)], SIX_FLOATS),
        400,
        "declares binary_data_size 28 but only 24",
    ),
    (
        "binary-size-smaller-than-data",
        F32,
        *binary_request([_f32_input([2, 3], 20)], SIX_FLOATS),
        400,
        "needs 24 bytes, got 20",
    ),
    (
        "binary-size-matches-neither",
        F32,
        *binary_request([_f32_input([2, 3], 20)], SIX_FLOATS[:20]),
        400,
        "needs 24 bytes, got 20",
    ),
    (
        "extra-trailing-bytes",
        F32,
        *binary_request([_f32_input([2, 3], 24)], SIX_FLOATS + b"\x00" * 8),
        400,
        "8 bytes of binary data that no input's binary_data_size accounts for",
    ),
    (
        "binary-size-negative",
        F32,
        *binary_request([_f32_input([2, 3], -24)], SIX_FLOATS),
        400,
        "binary_data_size must be a non-negative integer",
    ),
    (
        "no-data-at-all",
        F32,
        *json_request([_f32_input([2, 3])]),
        400,
        "neither 'data' nor binary_data_size",
    ),
    (
        "json-data-count-mismatch",
        F32,
        *json_request([{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1.0] * 5}]),
        400,
        "needs 6 elements, got 5",
    ),
    (
        "unknown-datatype",
        F32,
        *binary_request([_f32_input([2, 3], 24, "FP8")], SIX_FLOATS),
        400,
        "unknown datatype 'FP8'",
    ),
    (
        "negative-dims",
        F32,
        *binary_request([_f32_input([-2, 3], 24)], SIX_FLOATS),
        400,
        "dimensions must be integers >= 0",
    ),
    (
        "non-integer-dims",
        F32,
        *json_request([{"name": "x", "datatype": "FP32", "shape": [2.5, 3], "data": []}]),
        400,
        "dimensions must be integers >= 0",
    ),
    (
        "shape-not-list",
        F32,
        *json_request([{"name": "x", "datatype": "FP32", "shape": "2x3", "data": []}]),
        400,
        "needs a 'shape' list",
    ),
    (
        "duplicate-input",
        F32,
        *binary_request([_f32_input([1, 3], 12), _f32_input([1, 3], 12)], SIX_FLOATS),
        400,
        "appears twice",
    ),
    (
        "unknown-input-name",
        F32,
        *binary_request(
            [{**_f32_input([2, 3], 24), "name": "x"}, {**_f32_input([1, 3], 12), "name": "z"}],
            SIX_FLOATS + SIX_FLOATS[:12],
        ),
        400,
        "unknown input 'z'",
    ),
    (
        "unknown-output",
        F32,
        *json_request(
            [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
            outputs=[{"name": "nope"}],
        ),
        400,
        "unknown outputs ['nope']",
    ),
    (
        "missing-inputs",
        "/v2/models/bad-add-mul/infer",
        *json_request([{"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]),
        400,
        "missing model inputs ['b']",
    ),
    (
        "bytes-lying-length-prefix",
        STR,
        *binary_request(
            [
                {
                    "name": "x",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": 15},
                }
            ],
            serialize_bytes([b"ok"]) + struct.pack("<I", 1000) + b"abcde",
        ),
        400,
        "element 1 declares 1000 bytes but only 5 remain",
    ),
    (
        "bytes-too-few-elements",
        STR,
        *binary_request(
            [
                {
                    "name": "x",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": 6},
                }
            ],
            serialize_bytes([b"ok"]),
        ),
        400,
        "ends after 1 of 3 elements",
    ),
    (
        "bytes-extra-bytes",
        STR,
        *binary_request(
            [
                {
                    "name": "x",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 9},
                }
            ],
            serialize_bytes([b"ok"]) + b"zzz",
        ),
        400,
        "3 bytes after its 1 elements",
    ),
    (
        "bytes-not-utf8",
        STR,
        *binary_request(
            [
                {
                    "name": "x",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 6},
                }
            ],
            serialize_bytes([b"\xff\xfe"]),
        ),
        400,
        "must be UTF-8",
    ),
    (
        "unknown-model",
        "/v2/models/bad-no-such-model/infer",
        *json_request([]),
        404,
        "unknown model 'bad-no-such-model'",
    ),
    (
        "unknown-hash",
        "/v2/models/sha256:" + "ab" * 32 + "/infer",
        *json_request([]),
        404,
        "unknown model 'sha256:",
    ),
    (
        "unknown-version",
        "/v2/models/bad-f32/versions/7/infer",
        *json_request([]),
        404,
        "has no version '7'; it serves version 1",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [case[1:] for case in INFER_CASES],
    ids=[case[0] for case in INFER_CASES],
)
def test_bad_infer_request(
    bad: blindfold.Client,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    got_status, error = raw(bad, path, body, headers)
    assert got_status == status, error
    assert message in error
    assert_serving(bad)


def test_bad_binary_infer_through_sdk_keeps_connection_usable(bad: blindfold.Client) -> None:
    """After a 400 the same keep-alive connection and client still work."""
    with pytest.raises(blindfold.ServerError) as info:
        bad.run_model("bad-f32", np.zeros((2, 4), dtype=np.float32))
    assert info.value.status == 400
    assert "shape [2, 4]" in info.value.message
    assert_serving(bad)
    x = np.ones((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(bad.run_model("bad-f32", x)["y"], x)


# --- uploads ---


def _upload_error(client: blindfold.Client, data: Any, name: str) -> blindfold.ServerError:
    with pytest.raises(blindfold.ServerError) as info:
        client.upload_model(data, name=name)
    return info.value


UPLOAD_CASES = [
    ("not-onnx", b"\x53\x54this is not an ONNX model", 400, "not an ONNX model"),
    ("empty", b"", 400, "not an ONNX model"),
    ("json", b'{"graph": "nope"}', 400, "not an ONNX model"),
    ("external-data", external_data_model(), 400, "references external data"),
    ("custom-domain", custom_domain_model("com.evil"), 400, "'com.evil'"),
    ("huge-static-shape", identity_model(TensorProto.FLOAT, [100_000, 100_000]), 400, "elements"),
]


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [case[1:] for case in UPLOAD_CASES],
    ids=[case[0] for case in UPLOAD_CASES],
)
def test_bad_upload(bad: blindfold.Client, data: Any, status: int, message: str) -> None:
    name = "bad-upload-target"
    error = _upload_error(bad, data, name)
    assert error.status == status, error.message
    assert message in error.message
    assert name not in [m["name"] for m in bad.list_models()]
    assert_serving(bad)


def test_external_data_is_refused_before_any_file_is_read(bad: blindfold.Client) -> None:
    error = _upload_error(bad, external_data_model("../../etc/passwd"), "bad-external")
    assert error.status == 400
    assert "root:" not in error.message
    assert "save_as_external_data=False" in error.message
    for location in ("/etc/shadow", "weights.bin"):
        assert _upload_error(bad, external_data_model(location), "bad-external").status == 400
    assert_serving(bad)


def test_custom_op_domain_refused_even_without_opset_import(bad: blindfold.Client) -> None:
    model = custom_domain_model("com.evil")
    del model.opset_import[1:]
    error = _upload_error(bad, model, "bad-custom")
    assert error.status == 400
    assert "com.evil::Pwn" in error.message
    assert_serving(bad)


@pytest.mark.parametrize("name", ["bad name!", "-leading-dash", "x" * 129, ".hidden"])
def test_invalid_model_name(bad: blindfold.Client, name: str) -> None:
    error = _upload_error(bad, identity_model(TensorProto.FLOAT), name)
    assert error.status == 400
    assert "invalid model name" in error.message
    assert_serving(bad)


def test_bad_triton_load_requests(bad: blindfold.Client) -> None:
    path = "/v2/repository/models/bad-triton/load"
    headers = {"Content-Type": "application/json"}
    cases = [
        (b"{not json", "not valid JSON"),
        (b"{}", "'parameters' object"),
        (json.dumps({"parameters": {}}).encode(), "exactly one 'file:' parameter"),
        (json.dumps({"parameters": {"file:1/model.onnx": "***"}}).encode(), "not valid base64"),
        (json.dumps({"parameters": {"file:1/model.txt": ""}}).encode(), "must name an .onnx"),
    ]
    for body, message in cases:
        status, error = raw(bad, path, body, headers)
        assert status == 400, error
        assert message in error
    assert_serving(bad)


def test_unknown_model_metadata_and_delete(bad: blindfold.Client) -> None:
    with pytest.raises(blindfold.NotFoundError, match="unknown model 'bad-missing'"):
        bad.model_metadata("bad-missing")
    with pytest.raises(blindfold.NotFoundError, match="unknown model 'bad-missing'"):
        bad.delete_model("bad-missing", token="bfo_x")
    with pytest.raises(blindfold.NotFoundError, match="no version '9'"):
        bad.model_metadata("bad-f32", version="9")
    assert_serving(bad)


def test_out_of_range_gather_index_is_not_echoed(
    bad: blindfold.Client, server: ServerProcess
) -> None:
    indices = np.array([0, INDEX_SENTINEL, 1], dtype=np.int64)
    with pytest.raises(blindfold.ServerError) as info:
        bad.run_model("bad-gather", indices)
    assert info.value.status == 400
    assert "onnxruntime could not run the model" in info.value.message
    assert str(INDEX_SENTINEL) not in info.value.message
    assert str(INDEX_SENTINEL) not in str(info.value)
    negative = np.array([-INDEX_SENTINEL], dtype=np.int64)
    with pytest.raises(blindfold.ServerError) as info:
        bad.run_model("bad-gather", negative)
    assert info.value.status == 400
    assert str(INDEX_SENTINEL) not in info.value.message
    # In-range indices still work on the same model.
    y = bad.run_model("bad-gather", np.array([4, 0], dtype=np.int64))["y"]
    np.testing.assert_array_equal(y, [[8.0, 9.0], [0.0, 1.0]])
    assert str(INDEX_SENTINEL) not in server.log()
    assert_serving(bad)


def test_tensor_contents_never_appear_in_errors_or_logs(
    bad: blindfold.Client, server: ServerProcess
) -> None:
    floats = [FLOAT_SENTINEL] * 6
    secret = BYTES_SENTINEL.encode()
    requests: list[tuple[str, bytes, dict[str, str]]] = [
        # JSON tensors of the wrong shape, count, dtype.
        (F32, *json_request([{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": floats}])),
        (F32, *json_request([{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": floats}])),
        (F32, *json_request([{"name": "x", "datatype": "FP64", "shape": [2, 3], "data": floats}])),
        (
            F32,
            *json_request(
                [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [BYTES_SENTINEL]}]
            ),
        ),
        (
            F32,
            *json_request(
                [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [BYTES_SENTINEL]}]
            ),
        ),
        (
            STR,
            *json_request(
                [{"name": "x", "datatype": "BYTES", "shape": [2], "data": [BYTES_SENTINEL]}]
            ),
        ),
        (
            STR,
            *json_request(
                [{"name": "x", "datatype": "BYTES", "shape": [1, 1], "data": [BYTES_SENTINEL]}]
            ),
        ),
        # Malformed JSON that quotes the sentinels.
        (F32, f'{{"inputs": [{{"data": [{FLOAT_SENTINEL}, "{BYTES_SENTINEL}"'.encode(), {}),
        (F32, f'{{"inputs": "{BYTES_SENTINEL}"}}'.encode(), {}),
        # Binary BYTES: lying prefix, trailing garbage, not UTF-8.
        (
            STR,
            *binary_request(
                [
                    {
                        "name": "x",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4 + len(secret)},
                    }
                ],
                struct.pack("<I", 999) + secret,
            ),
        ),
        (
            STR,
            *binary_request(
                [
                    {
                        "name": "x",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 8 + 2 * len(secret)},
                    }
                ],
                serialize_bytes([secret, secret]),
            ),
        ),
        (
            STR,
            *binary_request(
                [
                    {
                        "name": "x",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 5 + len(secret)},
                    }
                ],
                serialize_bytes([secret + b"\xff"]),
            ),
        ),
        # Binary floats with a bad size.
        (
            F32,
            *binary_request(
                [_f32_input([2, 3], 20)], np.full(6, FLOAT_SENTINEL, np.float32).tobytes()
            ),
        ),
    ]
    for path, body, headers in requests:
        status, error = raw(bad, path, body, headers)
        assert 400 <= status < 500, error
        assert BYTES_SENTINEL not in error
        assert FLOAT_SENTINEL_TEXT not in error
    # Model bytes are not echoed either.
    refused = _upload_error(bad, f"\x53{MODEL_SENTINEL}".encode() * 3, "bad-leak")
    assert refused.status == 400 and MODEL_SENTINEL not in refused.message
    assert_serving(bad)
    log = server.log()
    for sentinel in (BYTES_SENTINEL, FLOAT_SENTINEL_TEXT, MODEL_SENTINEL):
        assert sentinel not in log
    metrics = send(bad, "GET", "/metrics").body.decode()
    assert BYTES_SENTINEL not in metrics and FLOAT_SENTINEL_TEXT not in metrics


def test_rejections_are_counted(bad: blindfold.Client) -> None:
    def rejected() -> int:
        from prometheus_client.parser import text_string_to_metric_families

        text = send(bad, "GET", "/metrics").body.decode()
        return sum(
            int(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "blindfold_requests_total" and sample.labels["code"].startswith("4")
        )

    before = rejected()
    raw(bad, F32, b"{", {})
    assert rejected() == before + 1


# --- a dedicated server with small limits ---


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("limited"),
        "--open-upload",
        "--max-model-bytes",
        "2000",
        "--max-request-bytes",
        "4096",
        "--max-tensor-elements",
        "1000",
        "--max-models",
        "2",
    )
    yield process
    process.stop()


@pytest.fixture
def small(limited: ServerProcess) -> Iterator[blindfold.Client]:
    with connect(limited) as connection:
        if "bad-healthy" not in [m["name"] for m in connection.list_models()]:
            connection.upload_model(
                identity_model(TensorProto.INT32), name="bad-healthy", public=True
            )
        yield connection


def test_limits_allow_what_fits(small: blindfold.Client) -> None:
    x = np.arange(900, dtype=np.int32).reshape(300, 3)  # 900 elements, about 3.7 KB
    np.testing.assert_array_equal(small.run_model("bad-healthy", x)["y"], x)


def test_element_count_over_limit(small: blindfold.Client) -> None:
    body, headers = json_request([{"name": "x", "datatype": "INT32", "shape": [334, 3]}])
    status, error = raw(small, "/v2/models/bad-healthy/infer", body, headers)
    assert status == 413, error
    assert "limit of 1000 elements (--max-tensor-elements)" in error
    # A declared shape whose product is astronomically large is refused the same way,
    # before anything is allocated.
    body, headers = json_request(
        [{"name": "x", "datatype": "INT32", "shape": [2**40, 2**40], "data": []}]
    )
    status, error = raw(small, "/v2/models/bad-healthy/infer", body, headers)
    assert status == 413, error
    assert "--max-tensor-elements" in error
    # Elements count across all inputs of a request.
    two = [
        {"name": "a", "datatype": "INT32", "shape": [1, 600], "data": [0] * 600},
        {"name": "b", "datatype": "INT32", "shape": [1, 600], "data": [0] * 600},
    ]
    status, error = raw(small, "/v2/models/bad-healthy/infer", *json_request(two))
    assert status == 413, error
    assert_serving(small)


def test_oversize_request(small: blindfold.Client) -> None:
    status, error = raw(small, "/v2/models/bad-healthy/infer", b"{" + b" " * 5000 + b"}", {})
    assert status == 413, error
    assert "limit of 4096 bytes (--max-request-bytes)" in error
    with pytest.raises(blindfold.ServerError) as info:
        small.run_model("bad-healthy", np.zeros((350, 3), dtype=np.int32))  # 4200 data bytes
    assert info.value.status == 413
    assert_serving(small)


def test_oversize_model(small: blindfold.Client) -> None:
    big = matmul_model(32)  # 4 KiB of weights
    assert len(big.SerializeToString()) > 2000
    error = _upload_error(small, big, "bad-big")
    assert error.status == 413
    assert "--max-model-bytes" in error.message and "2000" in error.message
    # Triton's JSON load of the same model is refused too (base64 makes it larger still).
    import base64

    document = {
        "parameters": {"file:1/model.onnx": base64.b64encode(big.SerializeToString()).decode()}
    }
    status, error_message = raw(
        small,
        "/v2/repository/models/bad-big/load",
        json.dumps(document).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 413, error_message
    assert "--max-model-bytes" in error_message
    assert "bad-big" not in [m["name"] for m in small.list_models()]
    assert_serving(small)


def test_huge_declared_shape_against_small_limit(small: blindfold.Client) -> None:
    error = _upload_error(small, identity_model(TensorProto.FLOAT, [40, 40]), "bad-shape")
    assert error.status == 400
    assert "declares 1600 elements" in error.message
    assert "--max-tensor-elements" in error.message
    assert_serving(small)


def test_too_many_models(small: blindfold.Client) -> None:
    extra = small.upload_model(identity_model(TensorProto.FLOAT, name="e1"), name="bad-extra")
    try:
        error = _upload_error(small, identity_model(TensorProto.FLOAT, name="e2"), "bad-third")
        assert error.status == 409
        assert "maximum of 2 models (--max-models)" in error.message
        # Identical bytes under a new name count against the limit as well.
        error = _upload_error(small, identity_model(TensorProto.FLOAT, name="e1"), "bad-third")
        assert error.status == 409
        # Replacing an existing name at capacity is allowed.
        replaced = small.upload_model(
            identity_model(TensorProto.FLOAT, name="e3"), name="bad-extra", token=extra.owner_token
        )
        assert replaced.version == "2"
        assert_serving(small)
    finally:
        small.delete_model("bad-extra", token=extra.owner_token)
    # Unloading frees the slot.
    third = small.upload_model(identity_model(TensorProto.FLOAT, name="e4"), name="bad-third")
    small.delete_model("bad-third", token=third.owner_token)
    assert_serving(small)


def test_limited_server_log_is_clean(limited: ServerProcess, small: blindfold.Client) -> None:
    assert_serving(small)
    assert limited.alive()
    assert "Traceback" not in limited.log()


# --- inputs that used to reach a 500 (issue 7) ---

# Deeper than Python's (and orjson's) parser allows, yet within the 64 KiB limit of the small
# JSON routes.
DEEP_JSON = b"[" * 20_000 + b"]" * 20_000


def test_json_nested_deeper_than_the_parser_allows(
    bad: blindfold.Client, server: ServerProcess
) -> None:
    """Every route that reads JSON answers 400, not 500, when the parser gives up."""
    routes = [
        F32,
        "/v2/repository/models/bad-deep/load",
        "/v2/repository/models/bad-deep/load-encrypted",
        "/v2/repository/models/bad-f32/access",
    ]
    for path in routes:
        for body in (DEEP_JSON, b'{"inputs": ' + DEEP_JSON + b"}"):
            headers = {"Content-Type": "application/json"}
            status, error = raw(bad, path, body, headers)
            assert status == 400, (path, status, error)
    # The binary extension's JSON header too.
    header = b'{"inputs": ' + DEEP_JSON + b"}"
    status, error = raw(bad, F32, header, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400, error
    assert_serving(bad)
    assert "internal error" not in server.log()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([0, 2**63], "too large"),
        ([0, 2**64 + 5], "too large"),
        ([0, 2**62, 2**62], "too large"),
        ([0] + [1] * 64, "65 dimensions; at most 64"),
        ([1] * 100, "100 dimensions; at most 64"),
    ],
    ids=["zero-size-2**63", "zero-size-2**64", "zero-size-span", "65-dims", "100-dims"],
)
def test_extreme_shapes_are_refused(
    bad: blindfold.Client, server: ServerProcess, shape: list[int], message: str
) -> None:
    for body, headers in (
        binary_request([_f32_input(shape, 0)], b""),
        json_request([{"name": "x", "datatype": "FP32", "shape": shape, "data": []}]),
    ):
        status, error = raw(bad, F32, body, headers)
        assert status == 400, error
        assert message in error
    assert_serving(bad)
    assert "internal error" not in server.log()


def test_output_parameters_must_be_an_object(bad: blindfold.Client) -> None:
    for parameters in ([], "binary", 3, [["binary_data", True]]):
        body, headers = json_request(
            [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
            outputs=[{"name": "y", "parameters": parameters}],
        )
        status, error = raw(bad, F32, body, headers)
        assert status == 400, error
        assert "output 'y': 'parameters' must be an object" in error
    assert_serving(bad)


@pytest.mark.parametrize(
    "nonce",
    ["0b8e3f0c-6b52-4c43-9d8f-5f7f0a1e2d3c", "ABCDEF", "abc", "zz", "\ud800", 7, "a" * 130],
    ids=["uuid", "uppercase", "odd-length", "not-hex", "lone-surrogate", "number", "too-long"],
)
def test_receipt_nonce_that_is_not_hex(bad: blindfold.Client, nonce: Any) -> None:
    body, headers = json_request(
        [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
        parameters={"receipt": True, "receipt_nonce": nonce},
    )
    status, error = raw(bad, F32, body, headers)
    assert status == 400, error
    assert "receipt_nonce must be lowercase hex" in error
    assert_serving(bad)


def _graph_output_model(output: Any, node: Any) -> Any:
    from onnx import helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([node], "io", [x], [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _unsupported_io_models() -> list[tuple[str, Any, str]]:
    from onnx import helper

    sequence = helper.make_tensor_sequence_value_info("y", TensorProto.FLOAT, [2])
    cases = [
        (
            "sequence",
            _graph_output_model(sequence, helper.make_node("SequenceConstruct", ["x"], ["y"])),
            "output 'y' is a sequence",
        )
    ]
    for element in ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E5M2", "INT4", "UINT4"):
        to = getattr(TensorProto, element)
        y = helper.make_tensor_value_info("y", to, [2])
        model = _graph_output_model(y, helper.make_node("Cast", ["x"], ["y"], to=to))
        cases.append((element, model, f"element type {element}, which the server does not"))
    return cases


@pytest.mark.parametrize(
    ("model", "message"),
    [case[1:] for case in _unsupported_io_models()],
    ids=[case[0] for case in _unsupported_io_models()],
)
def test_outputs_the_protocol_cannot_carry_are_refused_at_upload(
    bad: blindfold.Client, model: Any, message: str
) -> None:
    """Sequences and maps have no OIP form; bfloat16/int4 used to fail at inference with a
    misleading message, and FLOAT8 outputs came back labelled UINT8."""
    error = _upload_error(bad, model, "bad-io")
    assert error.status == 400, error.message
    assert message in error.message
    assert "bad-io" not in [m["name"] for m in bad.list_models()]
    assert_serving(bad)


def test_map_input_is_refused_at_upload(bad: blindfold.Client) -> None:
    from onnx import helper

    map_type = helper.make_map_type_proto(
        TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
    )
    x = helper.make_value_info("x", map_type)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Constant", [], ["y"], value_floats=[1.0, 2.0])
    graph = helper.make_graph([node], "map", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    error = _upload_error(bad, model, "bad-map")
    assert error.status == 400, error.message
    assert "input 'x' is a map" in error.message
    assert_serving(bad)


def test_symbolic_dimension_names_that_are_not_utf8(
    bad: blindfold.Client, server: ServerProcess
) -> None:
    data = identity_model(TensorProto.FLOAT, ["BATCHDIM", 3]).SerializeToString()
    assert data.count(b"BATCHDIM") == 2
    error = _upload_error(bad, data.replace(b"BATCHDIM", b"BAT\xff\xfeDIM"), "bad-utf8")
    assert error.status == 400, error.message
    # Whether protobuf's own parse already refuses it depends on the protobuf and onnx
    # builds installed beside the server; either way it is a 400 that says why.
    assert "not valid UTF-8" in error.message or "protobuf parse failed" in error.message
    # Some invalid sequences already fail protobuf's own parse: a 400 as well.
    error = _upload_error(bad, data.replace(b"BATCHDIM", b"\xc3(ATCHDIM"), "bad-utf8")
    assert error.status == 400, error.message
    assert_serving(bad)
    assert "internal error" not in server.log()


def test_json_outputs_never_carry_bare_nan_or_infinity(bad: blindfold.Client) -> None:
    data = [float("nan"), float("inf"), float("-inf")]
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": data}]}
    ).encode()
    status, error = raw(bad, F32, body, {})
    assert status == 400, "the server answered with JSON holding bare NaN/Infinity"
    assert "NaN or infinite values" in error and "binary_data" in error
    # The binary path carries them exactly.
    x = np.array([data], dtype=np.float32)
    np.testing.assert_array_equal(bad.run_model("bad-f32", x)["y"], x)
    assert_serving(bad)


def _planted(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "planted.enc"
    path.write_bytes(data)
    return path


def _load_encrypted(client: blindfold.Client, path: Any) -> tuple[int, str]:
    from blindfold.sealing import ModelKey

    key = ModelKey(key=bytes(32), sha256="0" * 64).to_json()
    body = json.dumps({"path": path, "key": key}).encode()
    return raw(client, "/v2/repository/models/bad-enc/load-encrypted", body)


def test_load_encrypted_never_echoes_the_file(bad: blindfold.Client, tmp_path: Path) -> None:
    """A plaintext model, or any host file, given to load-encrypted: the error must not quote
    its first bytes (the shared server reads encrypted models from pytest's base temp dir)."""
    canary = b"SECRET-FILE-" + b"q" * 64
    for data in (canary, b"BFS" + canary, MODEL_SENTINEL.encode() * 4):
        status, error = _load_encrypted(bad, str(_planted(tmp_path, data)))
        assert status == 400, error
        assert "not in the Blindfold sealed format" in error
        assert "SECRET" not in error and "qqqq" not in error
    assert_serving(bad)


@pytest.mark.parametrize(
    ("path", "message"),
    [("model\x00.enc", "NUL"), ("model\ud800.enc", "not valid UTF-8"), ("\udcff", "UTF-8")],
    ids=["nul", "lone-surrogate", "surrogate-escape"],
)
def test_load_encrypted_path_that_no_file_can_have(
    bad: blindfold.Client, server: ServerProcess, path: str, message: str
) -> None:
    status, error = _load_encrypted(bad, path)
    assert status == 400, error
    assert message in error
    assert_serving(bad)
    assert "internal error" not in server.log()


def test_client_disconnecting_mid_body_is_not_an_error(
    bad: blindfold.Client, server: ServerProcess
) -> None:
    context = unverified_context()
    before = server.log().count("client disconnected")
    for path in (F32, "/v2/repository/models/bad-cut/load"):
        with (
            socket.create_connection(("127.0.0.1", server.port)) as plain,
            context.wrap_socket(plain) as tls,
        ):
            tls.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                "Content-Type: application/octet-stream\r\n\r\n".encode()
                + b"{" * 1000
            )
        assert_serving(bad)
    deadline = time.monotonic() + 10
    while server.log().count("client disconnected") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log()
    assert log.count("client disconnected") >= before + 2
    assert "internal error" not in log
    assert "ClientDisconnect" not in log


def test_model_load_errors_do_not_quote_model_contents(
    bad: blindfold.Client, server: ServerProcess
) -> None:
    """onnxruntime's load errors are passed on (they name operators and types), so check
    that the ones a model's constants can trigger name no constant's contents."""
    from onnx import helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    # onnx's annotation omits bytes, which STRING tensors take.
    text = helper.make_tensor("k", TensorProto.STRING, [1], [MODEL_SENTINEL.encode()])  # type: ignore[list-item]
    numbers = helper.make_tensor("s", TensorProto.INT64, [3], [INDEX_SENTINEL, 1, 1])
    graphs = [
        helper.make_graph(
            [
                helper.make_node("Constant", [], ["k"], value=text),
                helper.make_node("Add", ["x", "k"], ["y"]),
            ],
            "typed",
            [x],
            [y],
        ),
        helper.make_graph(
            [helper.make_node("Pad", ["x", "s"], ["y"])], "pads", [x], [y], initializer=[numbers]
        ),
        helper.make_graph(
            [helper.make_node("ConstantOfShape", ["negative"], ["y"])],
            "negative",
            [x],
            [y],
            initializer=[helper.make_tensor("negative", TensorProto.INT64, [1], [-INDEX_SENTINEL])],
        ),
    ]
    for graph in graphs:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        error = _upload_error(bad, model, "bad-quote")
        assert error.status == 400, error.message
        assert MODEL_SENTINEL not in error.message
        assert str(INDEX_SENTINEL) not in error.message
    assert_serving(bad)
    log = server.log()
    assert MODEL_SENTINEL not in log and str(INDEX_SENTINEL) not in log


def test_bytes_element_with_a_lone_surrogate(bad: blindfold.Client, server: ServerProcess) -> None:
    body, headers = json_request(
        [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["ok", "\ud800"]}]
    )
    status, error = raw(bad, STR, body, headers)
    assert status == 400, error
    assert "valid Unicode text" in error
    assert_serving(bad)
    assert "internal error" not in server.log()
