"""Warm-up shapes chosen at upload (`warmup_shapes`, Triton's `model_warmup`): the server runs
the model once on zeros of the configured shapes before it answers the upload, reports the
outcome, refuses shapes that do not fit the model with a 400, and keeps them in the model's
options (metadata, store rows, replicas).

The observable that the configured warm-up ran, and ran with those shapes: a model that runs
only on one image size fails the worker's own warm-up (dynamic dimensions 1) and succeeds on
the configured size, and fails on any other configured size."""

from __future__ import annotations

import json
from typing import cast

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import blindfold
from blindfold.client.transport import HttpResponse
from blindfold.server.model_record import ModelRecord
from blindfold.server.refusals import InvalidRequest
from blindfold.server.runtime import Session, TensorSpec
from blindfold.server.scheduler import DEFAULT, SchedulingOptions

from conftest import ServerProcess
from server_process import kill_worker_of, model_workers
from transports import send


def image_model() -> onnx.ModelProto:
    """x float32 [1, 3, H, W] reshaped to [1, 48]: runs only when H * W == 16 (say 4x4), so
    the worker's warm-up on [1, 3, 1, 1] fails. m int64 [1, L] passes through (not named in
    the warm-up shapes: it gets its declared shape with L = 1)."""
    shape = numpy_helper.from_array(np.array([1, 48], np.int64), "shape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])
    m = helper.make_tensor_value_info("m", TensorProto.INT64, [1, "L"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])
    z = helper.make_tensor_value_info("z", TensorProto.INT64, [1, "L"])
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
            helper.make_node("Identity", ["m"], ["z"]),
        ],
        "image",
        [x, m],
        [y, z],
        initializer=[shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_configured_warm_up_runs_before_the_upload_answers(
    server: ServerProcess, client: blindfold.Client
) -> None:
    model = client.upload_model(image_model(), "warm-image", warmup_shapes={"x": [1, 3, 4, 4]})
    assert model.warmup == "ok"
    log = server.log()
    # The worker's own warm-up on dynamic dimensions 1 could not run this model ...
    assert f"model sha256:{model.sha256} was not warmed up (failed: run_failed" in log
    # ... the configured shapes could, before the answer.
    assert (
        f"model 'warm-image' (sha256:{model.sha256}) warmed up on its configured "
        "warmup_shapes 1x3x4x4 before ready" in log
    )
    assert model.scheduling is not None
    assert model.scheduling["warmup_shapes"] == {"x": [1, 3, 4, 4]}
    metadata = client.model_metadata("warm-image")
    assert metadata["scheduling"]["warmup_shapes"] == {"x": [1, 3, 4, 4]}
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    m = np.array([[7, 8]], np.int64)
    outputs = client.run_model("warm-image", {"x": x, "m": m})
    np.testing.assert_array_equal(outputs["y"], x.reshape(1, 48))
    client.delete_model("warm-image")


def test_a_worker_restarted_after_a_crash_runs_the_configured_warm_up(
    server: ServerProcess, client: blindfold.Client
) -> None:
    """The model's worker dies (SIGKILL, as a crashing runtime would); the next request
    restarts it, and the new worker runs the configured warm-up shapes before that request,
    not only its own warm-up on the declared shapes (which this model cannot run)."""
    before = model_workers(server.process.pid)
    model = client.upload_model(image_model(), "warm-restart", warmup_shapes={"x": [1, 3, 4, 4]})
    kill_worker_of(server, before)
    mark = len(server.log())
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    m = np.array([[7]], np.int64)
    np.testing.assert_array_equal(
        client.run_model("warm-restart", {"x": x, "m": m})["y"], x.reshape(1, 48)
    )
    assert (
        f"model sha256:{model.sha256}: its restarted worker ran the configured warm-up "
        "(warmup_shapes 1x3x4x4): ok" in server.log()[mark:]
    )
    client.delete_model("warm-restart")


def test_a_configured_warm_up_that_fails_is_reported_and_the_model_loads(
    server: ServerProcess, client: blindfold.Client
) -> None:
    model = client.upload_model(image_model(), "warm-wrong", warmup_shapes={"x": [1, 3, 2, 2]})
    assert model.warmup is not None and model.warmup.startswith("failed: ")
    assert "could not run the model on these inputs" in model.warmup
    assert (
        f"model 'warm-wrong' (sha256:{model.sha256}) failed its configured warm-up "
        "(warmup_shapes 1x3x2x2)" in server.log()
    )
    x = np.ones((1, 3, 4, 4), np.float32)
    outputs = client.run_model("warm-wrong", {"x": x, "m": np.zeros((1, 1), np.int64)})
    assert outputs["y"].shape == (1, 48)
    client.delete_model("warm-wrong")


def test_the_query_short_form_and_triton_load_parameters(client: blindfold.Client) -> None:
    import base64

    data = image_model().SerializeToString()
    response = send(
        client,
        "POST",
        "/v2/repository/models/warm-query/load?warmup_shapes=x:1x3x8x2,m:1x5",
        data,
        {"Content-Type": "application/octet-stream"},
    )
    assert response.status == 200, response.body
    answer = json.loads(response.body)
    assert answer["warmup"] == "ok"
    assert answer["scheduling"]["warmup_shapes"] == {"m": [1, 5], "x": [1, 3, 8, 2]}
    owners = {"warm-query": answer["owner_token"]}
    document = {
        "parameters": {
            "config": "{}",
            "file:1/model.onnx": base64.b64encode(data).decode(),
            "warmup_shapes": {"x": [1, 3, 16, 1]},
        }
    }
    response = send(
        client,
        "POST",
        "/v2/repository/models/warm-triton/load",
        json.dumps(document).encode(),
        {"Content-Type": "application/json"},
    )
    assert response.status == 200, response.body
    answer = json.loads(response.body)
    assert answer["warmup"] == "ok"
    owners["warm-triton"] = answer["owner_token"]
    for name, owner in owners.items():
        unloaded = send(client, "POST", f"/v2/repository/models/{name}/unload", b"{}", token=owner)
        assert unloaded.status == 200, unloaded.body


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("warmup_shapes=y:1x48", "warmup_shapes names 'y', not an input of the model"),
        ("warmup_shapes=x:1x3x4", "gives input 'x' the shape [1, 3, 4], but the model declares"),
        ("warmup_shapes=x:2x3x4x4", "the declared size for each fixed one"),
        ("warmup_shapes=x:1x3x65536x65536", "more than 256 MiB of zeros"),
    ],
)
def test_shapes_that_do_not_fit_the_model_are_refused(
    client: blindfold.Client, query: str, words: str
) -> None:
    response = _raw_upload(client, "warm-bad", query, image_model().SerializeToString())
    assert response.status == 400, response.body
    assert words in json.loads(response.body)["error"]
    assert "warm-bad" not in [row["name"] for row in client.list_models()]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("warmup_shapes=x:1x0x4x4", "whole numbers from 1"),
        ("warmup_shapes=x:1xax4", "whole numbers from 1"),
        ("warmup_shapes=x", "warmup_shapes must map input names to dimensions"),
        ("warmup_shapes=x:1,x:2", "names input 'x' twice"),
        ("warmup_shapes=%7Bbad", "the JSON given does not parse"),
        ("warmup_shapes=" + "%7B%22x%22:" + "%5B" * 5000, "the JSON given does not parse"),
        ("warmup_shapes=x:1x%C2%B2", "whole numbers from 1"),
        ("max_batch_size=%C2%B2", "max_batch_size must be a whole number"),
    ],
)
def test_malformed_shapes_are_refused_before_the_body(
    client: blindfold.Client, query: str, words: str
) -> None:
    response = _raw_upload(client, "warm-bad", query, b"not onnx: never read")
    assert response.status == 400, response.body
    assert words in json.loads(response.body)["error"]


# --- the option itself ---


def test_parse_forms_and_round_trip() -> None:
    short = SchedulingOptions.parse({"warmup_shapes": "input:0:1x3x640x640,mask:1x128"})
    assert short is not None
    assert short.warmup_shapes == (("input:0", (1, 3, 640, 640)), ("mask", (1, 128)))
    as_json = SchedulingOptions.parse(
        {"warmup_shapes": '{"mask": [1, 128], "input:0": [1, 3, 640, 640]}'}
    )
    document = SchedulingOptions.parse(
        {"warmup_shapes": {"input:0": [1, 3, 640, 640], "mask": ["1", 128]}}
    )
    assert short == as_json == document
    assert SchedulingOptions.parse(short.to_json()) == short  # store rows and replicas
    assert SchedulingOptions.parse({"warmup_shapes": ""}) == DEFAULT  # clears them
    for bad in (
        {"warmup_shapes": {"x": [1, True]}},
        {"warmup_shapes": {"x": [1.5]}},
        {"warmup_shapes": {"x": [1] * 65}},
        {"warmup_shapes": {"x": 3}},
        {"warmup_shapes": [["x", [1]]]},
        {"warmup_shapes": {"": [1]}},
        {"warmup_shapes": {f"i{n}": [1] for n in range(65)}},
    ):
        with pytest.raises(InvalidRequest):
            SchedulingOptions.parse(bad)


def test_rows_without_warm_up_shapes_keep_their_canonical_form() -> None:
    """Stored rows MAC `ModelRecord.canonical`: an option that is not set adds nothing, so
    rows written before it existed still authenticate."""
    batching = SchedulingOptions(4, 100, (2,), 0)
    assert "warmup_shapes" not in batching.to_json()
    record = ModelRecord("m", 1, "0" * 64, 1, "", True, created=1.0, scheduling=batching)
    assert b"warmup_shapes" not in record.canonical()
    warmed = SchedulingOptions(4, 100, (2,), 0, (("x", (1, 3)),))
    assert ModelRecord("m", 1, "0" * 64, 1, "", True, created=1.0, scheduling=warmed).canonical()
    assert json.loads(
        ModelRecord("m", 1, "0" * 64, 1, "", True, created=1.0, scheduling=warmed).canonical()
    )["scheduling"]["warmup_shapes"] == {"x": [1, 3]}


class _Specs:
    def __init__(self, inputs: list[TensorSpec]) -> None:
        self.inputs = inputs
        self.outputs: list[TensorSpec] = []


def specs(*inputs: TensorSpec) -> Session:
    """What the options read of a session: its input specs."""
    return cast(Session, _Specs(list(inputs)))


def test_feeds_are_zeros_of_the_configured_shapes() -> None:
    session = specs(
        TensorSpec("x", "FP16", (1, -1)),
        TensorSpec("t", "BYTES", (-1,)),
        TensorSpec("k", "INT32", (2, -1, 3)),
    )
    options = SchedulingOptions(warmup_shapes=(("x", (1, 7)), ("t", (2,))))
    feeds = options.warmup_feeds(session)
    assert feeds is not None
    assert feeds["x"].dtype == np.float16 and feeds["x"].shape == (1, 7) and not feeds["x"].any()
    assert feeds["t"].dtype == object and feeds["t"].tolist() == [b"", b""]
    assert feeds["k"].dtype == np.int32 and feeds["k"].shape == (2, 1, 3)
    assert DEFAULT.warmup_feeds(session) is None
    sequence = specs(TensorSpec("s", "seq(tensor(float))", ()))
    with pytest.raises(InvalidRequest, match="not a tensor"):
        SchedulingOptions(warmup_shapes=(("s", (1,)),)).check_model(sequence)


def test_cli_parses_warmup_shapes() -> None:
    from blindfold.cli import _warmup_shapes

    assert _warmup_shapes("images:1x3x640x640,in:0:1x8") == {
        "images": [1, 3, 640, 640],
        "in:0": [1, 8],
    }


def _raw_upload(client: blindfold.Client, name: str, query: str, body: bytes) -> HttpResponse:
    """A raw upload with `query` as its options, answered as sent (no SDK checks)."""
    return send(
        client,
        "POST",
        f"/v2/repository/models/{name}/load?{query}",
        body,
        {"Content-Type": "application/octet-stream"},
    )
