"""Inference through the SDK and through hand-built OIP requests, against a real server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

import blindfold
from blindfold import tensors

from helpers import connect
from onnx_models import add_mul_model, identity_model, product_sum_model
from transports import send

# --- helpers ---


def metric(client: blindfold.Client, name: str) -> float:
    response = send(client, "GET", "/metrics")
    assert response.status == 200
    match = re.search(rf"^{re.escape(name)} (\S+)$", response.body.decode(), re.MULTILINE)
    assert match, f"metric {name} missing"
    return float(match.group(1))


def post_json(
    client: blindfold.Client, path: str, document: dict[str, Any]
) -> tuple[int, dict[str, Any], bytes | bytearray, dict[str, str]]:
    """POSTs a JSON (non-binary) OIP request; returns status, JSON header, binary tail,
    response headers."""
    body = json.dumps(document).encode()
    response = send(client, "POST", path, body, {"Content-Type": "application/json"})
    length = response.headers.get("inference-header-content-length")
    split = int(length) if length is not None else len(response.body)
    return (
        response.status,
        json.loads(response.body[:split]),
        response.body[split:],
        dict(response.headers),
    )


def split_binary(header: dict[str, Any], tail: bytes | bytearray) -> dict[str, np.ndarray]:
    """Decodes every output of a response, JSON `data` or binary, in the header's order."""
    offset = 0
    result: dict[str, np.ndarray] = {}
    for item in header["outputs"]:
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is None:
            result[item["name"]] = tensors.tensor_from_json(
                item["data"], item["datatype"], item["shape"]
            )
        else:
            result[item["name"]] = tensors.tensor_from_bytes(
                memoryview(tail)[offset : offset + size], item["datatype"], item["shape"]
            )
            offset += size
    assert offset == len(tail)
    return result


def bytes_array(values: list[bytes]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def stranger(client: blindfold.Client) -> blindfold.Client:
    """Another Client of the same server: it holds none of the owner tokens `client` does."""
    return connect(client.url)


@contextlib.contextmanager
def uploaded_for_module(server: Any, models: dict[str, Any]) -> Iterator[None]:
    """Uploads `models` by name for a module and unloads them afterwards, so the shared
    server does not fill up to --max-models."""
    with connect(server) as connection:
        tokens = {
            name: connection.upload_model(model, name=name, public=True).owner_token
            for name, model in models.items()
        }
        try:
            yield
        finally:
            for name, token in tokens.items():
                connection.delete_model(name, token=token)


# --- every datatype at its extremes ---


def _float_extremes(dtype: type) -> np.ndarray:
    info = np.finfo(dtype)
    values = [
        info.min,
        info.max,
        info.tiny,
        info.smallest_subnormal,
        -info.smallest_subnormal,
        info.eps,
        0.0,
        -0.0,
        1.0,
        np.inf,
        -np.inf,
        np.nan,
    ]
    return np.array(values, dtype=dtype)


def _int_extremes(dtype: type) -> np.ndarray:
    info = np.iinfo(dtype)
    values = sorted({int(info.min), int(info.min) + 1, 0, 1, int(info.max) - 1, int(info.max)})
    return np.array(values, dtype=dtype)


EXTREMES: dict[str, tuple[int, np.ndarray]] = {
    "FP16": (TensorProto.FLOAT16, _float_extremes(np.float16)),
    "FP32": (TensorProto.FLOAT, _float_extremes(np.float32)),
    "FP64": (TensorProto.DOUBLE, _float_extremes(np.float64)),
    "INT8": (TensorProto.INT8, _int_extremes(np.int8)),
    "INT16": (TensorProto.INT16, _int_extremes(np.int16)),
    "INT32": (TensorProto.INT32, _int_extremes(np.int32)),
    "INT64": (TensorProto.INT64, _int_extremes(np.int64)),
    "UINT8": (TensorProto.UINT8, _int_extremes(np.uint8)),
    "UINT16": (TensorProto.UINT16, _int_extremes(np.uint16)),
    "UINT32": (TensorProto.UINT32, _int_extremes(np.uint32)),
    "UINT64": (TensorProto.UINT64, _int_extremes(np.uint64)),
    "BOOL": (TensorProto.BOOL, np.array([True, False, False, True])),
    "BYTES": (
        TensorProto.STRING,
        bytes_array(
            [
                b"",
                b"a",
                "h\u00e9llo w\u00f6rld \u2713 \U0001f600".encode(),
                b"x" * 5000,
                b" leading and trailing spaces ",
                b"line\nbreak\ttab",
                b"with\x00nul",
                b"trailing nul\x00",
            ]
        ),
    ),
}


@pytest.fixture(scope="module")
def identity_models(server: Any) -> Iterator[dict[str, str]]:
    """One Identity model (shape [N]) per datatype, uploaded once for the module."""
    names = {datatype: f"inf-identity-{datatype.lower()}" for datatype in EXTREMES}
    models = {
        names[datatype]: identity_model(elem_type, ["N"], name=names[datatype])
        for datatype, (elem_type, _) in EXTREMES.items()
    }
    with uploaded_for_module(server, models):
        yield names


@pytest.mark.parametrize("datatype", list(EXTREMES))
def test_round_trip_extremes(
    client: blindfold.Client, identity_models: dict[str, str], datatype: str
) -> None:
    _, values = EXTREMES[datatype]
    outputs = client.run_model(identity_models[datatype], values)
    assert list(outputs) == ["y"]
    y = outputs["y"]
    assert y.shape == values.shape
    if datatype == "BYTES":
        assert y.dtype == object
        assert list(y) == list(values)
        return
    assert y.dtype == values.dtype
    # Bit-exact: catches -0.0 vs 0.0, NaN payloads and any lossy conversion.
    assert y.tobytes() == values.tobytes()


def test_model_metadata_matches_declaration(
    client: blindfold.Client, identity_models: dict[str, str]
) -> None:
    for datatype, name in identity_models.items():
        metadata = client.model_metadata(name)
        assert metadata["name"] == name
        assert metadata["inputs"] == [{"name": "x", "datatype": datatype, "shape": [-1]}]
        assert metadata["outputs"] == [{"name": "y", "datatype": datatype, "shape": [-1]}]


def test_model_metadata_sha256_shape_dtype(client: blindfold.Client) -> None:
    model = identity_model(TensorProto.INT32, ["N", 5, 2], name="inf-meta")
    data = model.SerializeToString()
    uploaded = client.upload_model(data, name="inf-meta")
    assert uploaded.sha256 == hashlib.sha256(data).hexdigest()
    metadata = client.model_metadata("inf-meta")
    assert metadata["sha256"] == uploaded.sha256
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "INT32", "shape": [-1, 5, 2]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "INT32", "shape": [-1, 5, 2]}]
    by_hash = client.model_metadata(f"sha256:{uploaded.sha256}")
    assert by_hash["sha256"] == uploaded.sha256
    assert by_hash["inputs"] == metadata["inputs"]
    client.delete_model("inf-meta", token=uploaded.owner_token)


# --- shapes, inputs and outputs ---


def test_dynamic_batch(client: blindfold.Client) -> None:
    uploaded = client.upload_model(
        identity_model(TensorProto.FLOAT, name="inf-batch"), name="inf-batch"
    )
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        x = rng.standard_normal((batch, 3)).astype(np.float32)
        y = client.run_model("inf-batch", x)["y"]
        assert y.shape == (batch, 3)
        np.testing.assert_array_equal(y, x)
    client.delete_model("inf-batch", token=uploaded.owner_token)


@pytest.fixture(scope="module")
def two_output_models(server: Any) -> Iterator[None]:
    models = {"inf-add-mul": add_mul_model(), "inf-product-sum": product_sum_model()}
    with uploaded_for_module(server, models):
        yield


def _ab(batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((batch, 4)).astype(np.float32)
    b = rng.standard_normal((batch, 4)).astype(np.float32)
    return a, b


def test_multiple_inputs_and_outputs_in_declared_order(
    client: blindfold.Client, two_output_models: None
) -> None:
    a, b = _ab()
    outputs = client.run_model("inf-add-mul", {"a": a, "b": b})
    assert list(outputs) == ["sum", "product"]
    np.testing.assert_array_equal(outputs["sum"], a + b)
    np.testing.assert_array_equal(outputs["product"], a * b)
    reversed_outputs = client.run_model("inf-product-sum", {"a": a, "b": b})
    assert list(reversed_outputs) == ["product", "sum"]
    np.testing.assert_array_equal(reversed_outputs["sum"], a + b)
    np.testing.assert_array_equal(reversed_outputs["product"], a * b)


def test_requested_outputs_subset(client: blindfold.Client, two_output_models: None) -> None:
    a, b = _ab()
    outputs = client.run_model("inf-add-mul", {"a": a, "b": b}, outputs=["product"])
    assert list(outputs) == ["product"]
    np.testing.assert_array_equal(outputs["product"], a * b)
    both = client.run_model("inf-product-sum", {"a": a, "b": b}, outputs=["sum", "product"])
    assert list(both) == ["product", "sum"]
    with pytest.raises(blindfold.ServerError) as info:
        client.run_model("inf-add-mul", {"a": a, "b": b}, outputs=["quotient"])
    assert info.value.status == 400
    assert "quotient" in info.value.message


def test_input_forms(client: blindfold.Client, two_output_models: None) -> None:
    a, b = _ab(2)
    expected = a + b
    as_dict = client.run_model("inf-add-mul", {"b": b, "a": a})
    as_list = client.run_model("inf-add-mul", [a, b])
    as_tuple = client.run_model("inf-add-mul", (a, b))
    as_nested = client.run_model("inf-add-mul", {"a": a.tolist(), "b": b.tolist()})
    as_nested_dtype = client.run_model(
        "inf-add-mul", {"a": a.astype(np.float64).tolist(), "b": b.tolist()}, dtype=np.float32
    )
    for outputs in (as_dict, as_list, as_tuple, as_nested, as_nested_dtype):
        np.testing.assert_array_equal(outputs["sum"], expected)
    # A single-input model takes a bare array or a bare nested list.
    uploaded = client.upload_model(
        identity_model(TensorProto.INT64, name="inf-forms-int"), name="inf-forms-int"
    )
    y = client.run_model("inf-forms-int", [[1, 2, 3], [4, 5, 6]])["y"]
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [[1, 2, 3], [4, 5, 6]])
    y = client.run_model("inf-forms-int", [[1.0, 2.0, 3.0]], dtype="int64")["y"]
    np.testing.assert_array_equal(y, [[1, 2, 3]])
    client.delete_model("inf-forms-int", token=uploaded.owner_token)


def test_torch_inputs(client: blindfold.Client, two_output_models: None) -> None:
    torch = pytest.importorskip("torch")
    a, b = _ab()
    outputs = client.run_model("inf-add-mul", [torch.from_numpy(a), torch.from_numpy(b)])
    np.testing.assert_array_equal(outputs["product"], a * b)
    outputs = client.run_model("inf-add-mul", {"a": torch.from_numpy(a), "b": torch.from_numpy(b)})
    np.testing.assert_array_equal(outputs["sum"], a + b)


def test_client_side_input_errors(client: blindfold.Client, two_output_models: None) -> None:
    a, b = _ab()
    with pytest.raises(blindfold.InputError, match=r"float64.*FP32"):
        client.run_model("inf-add-mul", {"a": a.astype(np.float64), "b": b})
    with pytest.raises(blindfold.InputError, match="int32"):
        client.run_model("inf-add-mul", [a, b.astype(np.int32)])
    with pytest.raises(blindfold.InputError, match=r"unknown inputs.*'c'"):
        client.run_model("inf-add-mul", {"a": a, "b": b, "c": a})
    with pytest.raises(blindfold.InputError, match=r"missing inputs.*'b'"):
        client.run_model("inf-add-mul", {"a": a})
    with pytest.raises(blindfold.InputError, match="1 positional inputs"):
        client.run_model("inf-add-mul", [a])
    with pytest.raises(blindfold.InputError, match="cannot be converted"):
        client.run_model("inf-add-mul", {"a": [["x"] * 4], "b": b[:1]})
    with pytest.raises(blindfold.InputError, match="dict"):
        client.run_model("inf-add-mul", {"a", "b"})
    # InputError is also a ValueError, for callers that catch the standard type.
    assert issubclass(blindfold.InputError, ValueError)


# --- identity by hash, deletion, dedup, versions ---


def test_run_by_hash(client: blindfold.Client) -> None:
    model = identity_model(TensorProto.FLOAT, name="inf-hash")
    uploaded = client.upload_model(model, name="inf-hash")
    x = np.ones((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(client.run_model(f"sha256:{uploaded.sha256}", x)["y"], x)
    np.testing.assert_array_equal(client.run_model(uploaded.sha256, x)["y"], x)
    np.testing.assert_array_equal(client.run_model(uploaded.sha256.upper(), x)["y"], x)
    with pytest.raises(blindfold.NotFoundError):
        client.run_model("sha256:" + "0" * 64, x)
    with pytest.raises(blindfold.NotFoundError):
        client.run_model("f" * 64, x)
    client.delete_model("inf-hash", token=uploaded.owner_token)


def test_hash_survives_replacement_only_while_some_entry_holds_the_bytes(
    client: blindfold.Client,
) -> None:
    old = identity_model(TensorProto.FLOAT, name="inf-replace-old")
    new = identity_model(TensorProto.FLOAT, name="inf-replace-new")
    first = client.upload_model(old, name="inf-replace-a")
    second = client.upload_model(old, name="inf-replace-b")
    assert first.sha256 == second.sha256
    x = np.full((1, 3), 5.0, dtype=np.float32)

    replaced = client.upload_model(new, name="inf-replace-a", token=first.owner_token)
    assert replaced.sha256 != first.sha256
    assert replaced.owner_token is None  # the owner keeps the token they had
    # inf-replace-b still holds the old bytes, so their hash still runs.
    np.testing.assert_array_equal(client.run_model(f"sha256:{first.sha256}", x)["y"], x)
    np.testing.assert_array_equal(client.run_model(f"sha256:{replaced.sha256}", x)["y"], x)
    assert client.model_metadata("inf-replace-a", version="2")["sha256"] == replaced.sha256

    client.upload_model(new, name="inf-replace-b", token=second.owner_token)
    with pytest.raises(blindfold.NotFoundError):
        client.run_model(f"sha256:{first.sha256}", x)
    with pytest.raises(blindfold.NotFoundError):
        client.run_model(first.sha256, x)
    np.testing.assert_array_equal(client.run_model(replaced.sha256, x)["y"], x)
    client.delete_model("inf-replace-a", token=first.owner_token)
    client.delete_model("inf-replace-b", token=second.owner_token)


def test_delete_then_run_fails(client: blindfold.Client) -> None:
    model = identity_model(TensorProto.FLOAT, name="inf-delete")
    uploaded = client.upload_model(model, name="inf-delete")
    x = np.zeros((1, 3), dtype=np.float32)
    client.run_model("inf-delete", x)
    with stranger(client) as other, pytest.raises(blindfold.AuthenticationError) as info:
        other.delete_model("inf-delete")
    assert info.value.status == 401
    with pytest.raises(blindfold.AuthenticationError) as info:
        client.delete_model("inf-delete", token="bfo_not-the-owner")
    assert info.value.status == 403
    client.delete_model("inf-delete", token=uploaded.owner_token)
    with pytest.raises(blindfold.NotFoundError):
        client.run_model("inf-delete", x)
    with pytest.raises(blindfold.NotFoundError):
        client.run_model(uploaded.sha256, x)
    with pytest.raises(blindfold.NotFoundError):
        client.model_metadata("inf-delete")
    assert "inf-delete" not in [m["name"] for m in client.list_models()]


def test_identical_bytes_share_one_session(client: blindfold.Client) -> None:
    data = identity_model(TensorProto.UINT16, name="inf-dedup").SerializeToString()
    before = metric(client, "blindfold_sessions")
    models_before = metric(client, "blindfold_models")
    first = client.upload_model(data, name="inf-dedup-1")
    assert metric(client, "blindfold_sessions") == before + 1
    second = client.upload_model(data, name="inf-dedup-2")
    assert second.sha256 == first.sha256
    assert metric(client, "blindfold_sessions") == before + 1
    assert metric(client, "blindfold_models") == models_before + 2
    x = np.array([[1, 2, 3]], dtype=np.uint16)
    np.testing.assert_array_equal(client.run_model("inf-dedup-2", x)["y"], x)
    # The session lives while any name holds the bytes.
    client.delete_model("inf-dedup-1", token=first.owner_token)
    assert metric(client, "blindfold_sessions") == before + 1
    np.testing.assert_array_equal(client.run_model("inf-dedup-2", x)["y"], x)
    client.delete_model("inf-dedup-2", token=second.owner_token)
    assert metric(client, "blindfold_sessions") == before


def test_versions_increment_on_replace(client: blindfold.Client) -> None:
    v1 = client.upload_model(identity_model(TensorProto.FLOAT, name="inf-v1"), name="inf-ver")
    assert v1.version == "1" and v1.owner_token
    with stranger(client) as other, pytest.raises(blindfold.AuthenticationError) as info:
        other.upload_model(identity_model(TensorProto.FLOAT, name="inf-v2"), name="inf-ver")
    assert info.value.status == 401
    with pytest.raises(blindfold.AuthenticationError) as info:
        client.upload_model(
            identity_model(TensorProto.FLOAT, name="inf-v2"), name="inf-ver", token="bfo_wrong"
        )
    assert info.value.status == 403
    v2 = client.upload_model(
        identity_model(TensorProto.FLOAT, name="inf-v2"), name="inf-ver", token=v1.owner_token
    )
    assert v2.version == "2"
    v3 = client.upload_model(
        identity_model(TensorProto.DOUBLE, name="inf-v3"), name="inf-ver", token=v1.owner_token
    )
    assert v3.version == "3"
    metadata = client.model_metadata("inf-ver")
    assert metadata["versions"] == ["3"]
    assert metadata["sha256"] == v3.sha256
    assert metadata["inputs"][0]["datatype"] == "FP64"
    x = np.ones((1, 3), dtype=np.float64)
    np.testing.assert_array_equal(client.run_model("inf-ver", x, version="3")["y"], x)
    with pytest.raises(blindfold.NotFoundError, match="version"):
        client.run_model("inf-ver", x, version="1")
    listed = {m["name"]: m for m in client.list_models()}
    assert listed["inf-ver"]["version"] == "3"
    assert listed["inf-ver"]["sha256"] == v3.sha256
    client.delete_model("inf-ver", token=v1.owner_token)


# --- JSON (non-binary) OIP requests by hand ---


@pytest.fixture(scope="module")
def json_models(server: Any) -> Iterator[None]:
    models = {
        f"inf-json-{label}": identity_model(elem_type, [2, 2], name=f"inf-json-{label}")
        for label, elem_type in (
            ("fp32", TensorProto.FLOAT),
            ("int64", TensorProto.INT64),
            ("bool", TensorProto.BOOL),
            ("bytes", TensorProto.STRING),
        )
    }
    models["inf-json-add-mul"] = add_mul_model()
    with uploaded_for_module(server, models):
        yield


JSON_CASES = [
    ("fp32", "FP32", [1.5, -2.25, 3.4028234663852886e38, 0.0]),
    ("int64", "INT64", [-(2**63), 2**63 - 1, 0, -1]),
    ("bool", "BOOL", [True, False, False, True]),
    ("bytes", "BYTES", ["", "plain", "h\u00e9llo \u2713", "x" * 300]),
]


@pytest.mark.parametrize(("label", "datatype", "data"), JSON_CASES)
def test_json_infer(
    client: blindfold.Client, json_models: None, label: str, datatype: str, data: list[Any]
) -> None:
    path = f"/v2/models/inf-json-{label}/infer"
    request: dict[str, Any] = {
        "id": "req-42",
        "inputs": [{"name": "x", "datatype": datatype, "shape": [2, 2], "data": data}],
    }
    status, header, tail, headers = post_json(client, path, request)
    assert status == 200, header
    assert "inference-header-content-length" not in headers
    assert tail == b""
    assert header["id"] == "req-42"
    assert header["model_name"] == f"inf-json-{label}"
    assert header["model_version"] == "1"
    (output,) = header["outputs"]
    assert output["name"] == "y"
    assert output["datatype"] == datatype
    assert output["shape"] == [2, 2]
    assert output["data"] == data

    # Nested JSON data (row-major) is accepted too.
    nested = {**request, "inputs": [{**request["inputs"][0], "data": [data[:2], data[2:]]}]}
    status, header, _, _ = post_json(client, path, nested)
    assert status == 200, header
    assert header["outputs"][0]["data"] == data

    # binary_data_output: every output comes back as binary after the JSON header.
    binary_all = {**request, "parameters": {"binary_data_output": True}}
    status, header, tail, headers = post_json(client, path, binary_all)
    assert status == 200, header
    assert int(headers["inference-header-content-length"]) > 0
    (output,) = header["outputs"]
    assert "data" not in output
    assert output["parameters"]["binary_data_size"] == len(tail)
    decoded = split_binary(header, tail)["y"]
    expected = tensors.tensor_from_json(data, datatype, [2, 2])
    if datatype == "BYTES":
        assert decoded.tolist() == expected.tolist()
    else:
        assert decoded.dtype == expected.dtype
        np.testing.assert_array_equal(decoded, expected)

    # A per-output binary_data=false overrides binary_data_output.
    override = {
        **binary_all,
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
    }
    status, header, tail, headers = post_json(client, path, override)
    assert status == 200, header
    assert tail == b"" and "inference-header-content-length" not in headers
    assert header["outputs"][0]["data"] == data


def test_json_infer_per_output_binary_choice(client: blindfold.Client, json_models: None) -> None:
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.5, 0.5, 2.0, -1.0]
    inputs = [
        {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": a},
        {"name": "b", "datatype": "FP32", "shape": [1, 4], "data": b},
    ]
    request: dict[str, Any] = {
        "inputs": inputs,
        "outputs": [
            {"name": "product", "parameters": {"binary_data": True}},
            {"name": "sum"},
        ],
    }
    status, header, tail, headers = post_json(client, "/v2/models/inf-json-add-mul/infer", request)
    assert status == 200, header
    # Outputs come in the model's declared order, whatever order they were requested in.
    assert [o["name"] for o in header["outputs"]] == ["sum", "product"]
    sum_out, product_out = header["outputs"]
    assert sum_out["data"] == [1.5, 2.5, 5.0, 3.0]
    assert "data" not in product_out
    assert product_out["parameters"]["binary_data_size"] == 16 == len(tail)
    assert int(headers["inference-header-content-length"]) > 0
    decoded = split_binary(header, tail)
    np.testing.assert_array_equal(decoded["product"], [[0.5, 1.0, 6.0, -4.0]])

    # Only the requested outputs are computed and returned.
    only = {"inputs": inputs, "outputs": [{"name": "sum"}]}
    status, header, tail, _ = post_json(client, "/v2/models/inf-json-add-mul/infer", only)
    assert status == 200
    assert [o["name"] for o in header["outputs"]] == ["sum"]


def test_json_and_binary_inputs_mix(client: blindfold.Client, json_models: None) -> None:
    """One input as JSON data, the other as binary data in the same request."""
    b = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    document = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]},
            {
                "name": "b",
                "datatype": "FP32",
                "shape": [1, 4],
                "parameters": {"binary_data_size": b.nbytes},
            },
        ]
    }
    header = json.dumps(document).encode()
    response = send(
        client,
        "POST",
        "/v2/models/inf-json-add-mul/infer",
        header + b.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status == 200, response.body
    result = json.loads(response.body)
    assert result["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
    assert (
        result["parameters"]["model_sha256"] == client.model_metadata("inf-json-add-mul")["sha256"]
    )
