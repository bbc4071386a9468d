"""The scheduler against a real server: dynamic batching (bit-identical to running alone,
grouping by shape, a failing member does not fail its neighbours), options at upload, the
fair queue across models, and per-model concurrency limits.

Batches are made deterministic without timing: the members' rows add up to exactly
`max_batch_size`, so the batch leaves when the last member arrives; `max_queue_delay_us` is
only a far-away fallback. Metrics (`blindfold_batches_total`) show what ran together.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_inference import metric

import blindfold
from blindfold.server.limits import Limits
from blindfold.server.refusals import InvalidRequest
from blindfold.server.runtime import InferenceRunner, Session
from blindfold.server.scheduler import Scheduler, SchedulingOptions

from helpers import connect
from onnx_models import add_mul_model, gather_model, identity_model, matmul_model
from server_process import ServerProcess, start_server
from transports import send

FAR = 8_000_000  # µs: a fallback delay no test waits for


def cnn_model(seed: int = 1) -> onnx.ModelProto:
    """x float32 [N, 3, 16, 16] -> Conv 3x3 (8 channels), Relu, global pool, Gemm -> [N, 5]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    g = rng.standard_normal((8, 5)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "g"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (g, "g"))]
    graph = helper.make_graph(nodes, "cnn", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def float64_matmul_model() -> onnx.ModelProto:
    weights = np.random.default_rng(3).standard_normal((32, 16))
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 32])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 16])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul64",
        [x],
        [y],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def slow_model(size: int = 1024, layers: int = 128) -> onnx.ModelProto:
    """x float32 [N, size] through `layers` MatMuls: a model that keeps a slot busy."""
    weights = (np.eye(size, dtype=np.float32) * 0.5).astype(np.float32)
    nodes, current = [], "x"
    for index in range(layers):
        nodes.append(helper.make_node("MatMul", [current, "W"], [f"h{index}"]))
        current = f"h{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", size])
    graph = helper.make_graph(
        nodes, "slow", [x], [y], initializer=[numpy_helper.from_array(weights, "W")]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_together(
    client: blindfold.Client, model: str, requests: list[Any]
) -> list[dict[str, np.ndarray] | Exception]:
    """Sends every request at once, each from its own thread; returns answers in order."""

    def one(inputs: Any) -> dict[str, np.ndarray] | Exception:
        try:
            return dict(client.run_model(model, inputs))
        except Exception as exc:  # the caller inspects failures
            return exc

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("batching"), "--open-upload")
    yield process
    process.stop()


@pytest.fixture
def client(batch_server: ServerProcess) -> Iterator[blindfold.Client]:
    with connect(batch_server) as connection:
        yield connection


def _rng_inputs(kind: str, rows: int, rng: np.random.Generator) -> Any:
    if kind == "matmul":
        return rng.standard_normal((rows, 64)).astype(np.float32)
    if kind == "cnn":
        return rng.standard_normal((rows, 3, 16, 16)).astype(np.float32)
    if kind == "float64":
        return rng.standard_normal((rows, 32))
    if kind == "int8":
        return rng.integers(-128, 127, (rows, 3), dtype=np.int8)
    if kind == "float16":
        return rng.standard_normal((rows, 3)).astype(np.float16)
    if kind == "two_inputs":
        return {
            "a": rng.standard_normal((rows, 4)).astype(np.float32),
            "b": rng.standard_normal((rows, 4)).astype(np.float32),
        }
    raise AssertionError(kind)


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "matmul": lambda: matmul_model(64, seed=5),
    "cnn": cnn_model,
    "float64": float64_matmul_model,
    "int8": lambda: identity_model(TensorProto.INT8, ["N", 3]),
    "float16": lambda: identity_model(TensorProto.FLOAT16, ["N", 3]),
    "two_inputs": add_mul_model,
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_batched_answers_are_bit_identical_to_running_alone(
    client: blindfold.Client, kind: str
) -> None:
    model = MODELS[kind]()
    batched = client.upload_model(
        model, f"batched-{kind}", max_batch_size=8, max_queue_delay_us=FAR
    )
    assert batched.scheduling is not None and batched.scheduling["max_batch_size"] == 8
    alone = client.upload_model(model, f"alone-{kind}")  # the same session, no batching
    rng = np.random.default_rng(11)
    requests = [_rng_inputs(kind, rows, rng) for rows in (1, 3, 2, 2)]  # 8 rows: one batch
    batches = metric(client, "blindfold_batches_total")
    members = metric(client, "blindfold_batched_requests_total")
    answers = run_together(client, batched.name, requests)
    assert metric(client, "blindfold_batches_total") == batches + 1
    assert metric(client, "blindfold_batched_requests_total") == members + 4
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for inputs, answer in zip(requests, answers, strict=True):
        assert not isinstance(answer, Exception), answer
        reference = client.run_model(alone.name, inputs)
        feeds = inputs if isinstance(inputs, dict) else {session.get_inputs()[0].name: inputs}
        local = session.run(None, feeds)
        for (name, got), want, direct in zip(
            answer.items(), reference.values(), local, strict=True
        ):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.tobytes() == want.tobytes(), f"{kind}: {name} differs from running alone"
            assert got.shape == direct.shape and np.allclose(got, direct, rtol=1e-5, atol=1e-6)


def test_requests_of_other_shapes_run_in_their_own_batches(client: blindfold.Client) -> None:
    """Same model, different non-batch dimensions: grouped by shape, never an error."""
    model = client.upload_model(
        identity_model(TensorProto.INT32, ["N", "M"]),
        "batched-shapes",
        max_batch_size=4,
        max_queue_delay_us=FAR,
    )
    requests = [
        np.arange(6, dtype=np.int32).reshape(2, 3),
        np.arange(5, dtype=np.int32).reshape(1, 5),
        np.arange(6, 12, dtype=np.int32).reshape(2, 3),
        np.arange(15, dtype=np.int32).reshape(3, 5),
    ]
    batches = metric(client, "blindfold_batches_total")
    answers = run_together(client, model.name, requests)
    assert metric(client, "blindfold_batches_total") == batches + 2  # [2,3]+[2,3], [1,5]+[3,5]
    for inputs, answer in zip(requests, answers, strict=True):
        assert not isinstance(answer, Exception), answer
        assert np.array_equal(answer["y"], inputs) and answer["y"].dtype == np.int32


def test_bytes_tensors_batch(client: blindfold.Client) -> None:
    model = client.upload_model(
        identity_model(TensorProto.STRING, ["N"]),
        "batched-text",
        max_batch_size=3,
        max_queue_delay_us=FAR,
    )
    requests = [["première", "b"], ["c"]]
    answers = run_together(client, model.name, [np.array(r, dtype=object) for r in requests])
    for words, answer in zip(requests, answers, strict=True):
        assert not isinstance(answer, Exception), answer
        assert [item.decode() for item in answer["y"]] == words


def test_a_request_designed_to_fail_does_not_fail_its_neighbours(
    client: blindfold.Client, batch_server: ServerProcess
) -> None:
    """The attacker's out-of-range index makes the batched Gather fail; every member then
    runs alone: the neighbours get their answers, only the attacker gets the error."""
    model = client.upload_model(
        gather_model(rows=5), "batched-gather", max_batch_size=8, max_queue_delay_us=FAR
    )
    neighbours = [np.array([0, 1]), np.array([4]), np.array([2, 3, 1])]
    attacker = np.array([999_999, 0])
    batches = metric(client, "blindfold_batches_total")
    answers = run_together(client, model.name, [*neighbours, attacker])
    assert metric(client, "blindfold_batches_total") == batches + 1  # they did run together
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    for indices, answer in zip(neighbours, answers[:-1], strict=True):
        assert not isinstance(answer, Exception), f"a neighbour failed: {answer}"
        assert np.array_equal(answer["y"], table[indices])
    failure = answers[-1]
    assert isinstance(failure, blindfold.errors.BlindfoldError)
    assert "400" in str(failure) or "could not run the model" in str(failure)
    assert "999999" not in batch_server.log()  # tensor values never reach the log
    assert np.array_equal(client.run_model(model.name, np.array([2]))["y"], table[[2]])


def test_a_request_larger_than_the_batch_runs_alone(client: blindfold.Client) -> None:
    model = client.upload_model(
        matmul_model(64, seed=2), "batched-big", max_batch_size=2, max_queue_delay_us=FAR
    )
    alone = client.upload_model(matmul_model(64, seed=2), "alone-big")
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    got = client.run_model(model.name, x)["y"]
    assert got.tobytes() == client.run_model(alone.name, x)["y"].tobytes()


# --- options at upload ---


def test_batching_needs_a_dynamic_first_axis(client: blindfold.Client) -> None:
    with pytest.raises(blindfold.errors.BlindfoldError) as caught:
        client.upload_model(identity_model(TensorProto.FLOAT, [1, 3]), "fixed", max_batch_size=4)
    message = str(caught.value)
    assert "dynamic first axis" in message and "'x'" in message and "[1, 3]" in message
    names = [row["name"] for row in client.list_models()]
    assert "fixed" not in names
    # Without batching the same model loads, and a per-model limit needs no batch axis.
    loaded = client.upload_model(
        identity_model(TensorProto.FLOAT, [1, 3]), "fixed", max_concurrency=1
    )
    assert loaded.scheduling is not None and loaded.scheduling["max_concurrency"] == 1


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("max_batch_size=-1", "max_batch_size must be a whole number"),
        ("max_batch_size=abc", "max_batch_size must be a whole number"),
        ("max_batch_size=4&preferred_batch_sizes=2,8", "at most max_batch_size"),
        ("max_queue_delay_us=100", "give max_batch_size too"),
        ("max_batch_size=4&max_queue_delay_us=99999999999", "max_queue_delay_us must be"),
        ("max_concurrency=x", "max_concurrency must be"),
    ],
)
def test_bad_options_are_refused_before_the_body(
    client: blindfold.Client, query: str, words: str
) -> None:
    data = matmul_model(8).SerializeToString()
    response = send(
        client,
        "POST",
        f"/v2/repository/models/opt/load?{query}",
        data,
        {"Content-Type": "application/octet-stream"},
    )
    assert response.status == 400, response.body
    assert words in json.loads(response.body)["error"]
    assert send(client, "GET", "/v2/health/live").status == 200


def test_triton_load_parameters_and_metadata(client: blindfold.Client) -> None:
    import base64

    document = {
        "parameters": {
            "config": "{}",
            "file:1/model.onnx": base64.b64encode(matmul_model(8).SerializeToString()).decode(),
            "public": True,
            "max_batch_size": 16,
            "max_queue_delay_us": 200,
            "preferred_batch_sizes": [4, 8],
            "max_concurrency": 2,
        }
    }
    response = send(
        client,
        "POST",
        "/v2/repository/models/triton-batched/load",
        json.dumps(document).encode(),
        {"Content-Type": "application/json"},
    )
    assert response.status == 200, response.body
    expected = {
        "max_batch_size": 16,
        "max_queue_delay_us": 200,
        "preferred_batch_sizes": [4, 8],
        "max_concurrency": 2,
    }
    assert json.loads(response.body)["scheduling"] == expected
    assert client.model_metadata("triton-batched")["scheduling"] == expected
    x = np.ones((3, 8), np.float32)
    assert client.run_model("triton-batched", x)["y"].shape == (3, 8)


def test_cli_upload_takes_the_options(batch_server: ServerProcess, tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "m.onnx"
    path.write_bytes(matmul_model(8).SerializeToString())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "blindfold",
            "upload",
            batch_server.url,
            str(path),
            "--name",
            "cli-batched",
            "--allow-simulation",
            "--max-batch-size",
            "8",
            "--max-queue-delay-us",
            "100",
            "--preferred-batch-sizes",
            "2,4",
            "--warmup-shapes",
            "x:2x8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["scheduling"]["preferred_batch_sizes"] == [2, 4]
    assert answer["scheduling"]["warmup_shapes"] == {"x": [2, 8]} and answer["warmup"] == "ok"


# --- the fair queue and per-model limits ---


def test_a_flooded_model_does_not_starve_another(tmp_path: Path) -> None:
    """One slot; at least 16 requests to model A wait in the queue; model B's request, sent after
    them, runs in B's next turn: before all but a few of A's, not after all of them (as a
    first-come first-served queue would)."""
    server = start_server(tmp_path, "--open-upload", "--max-concurrent-inferences", "1")
    try:
        with connect(server) as client:
            slow = client.upload_model(slow_model(), "flooded")
            fast = client.upload_model(matmul_model(8), "quiet")
            # 64 rows: each of A's runs takes tens of ms, longer than B's trip from the
            # client to the queue on a loaded machine (with one row, 4 ms runs let several
            # of A's finish while B was on its way, and the order said nothing).
            x = np.ones((64, 1024), np.float32)
            finished: list[str] = []
            lock = threading.Lock()

            def call(model: str, inputs: np.ndarray, label: str) -> None:
                client.run_model(model, inputs)
                with lock:
                    finished.append(label)

            with ThreadPoolExecutor(32) as pool:
                flood = [pool.submit(call, slow.name, x, "A") for _ in range(30)]
                deadline = time.monotonic() + 120  # a bound on waiting, not a measurement
                while metric(client, "blindfold_queued_inferences") < 16:
                    assert time.monotonic() < deadline, "model A's requests never queued up"
                    time.sleep(0.01)
                with lock:
                    before = len(finished)
                pool.submit(call, fast.name, np.ones((1, 8), np.float32), "B").result()
                for future in flood:
                    future.result()
            after_b = finished.index("B")
            # Between B's arrival and B's answer only A's runs already started (one slot,
            # round robin) may finish; a FIFO queue would finish all ~16 waiting first.
            assert after_b - before <= 3, finished
    finally:
        server.stop()


class ObservedSession(Session):
    """A real in-process onnxruntime session that records how many runs overlap."""

    def __init__(self, inner: Session) -> None:
        self.inner = inner
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.running = 0
        self.peak = 0

    async def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            return await self.inner.run(output_names, feeds)
        finally:
            self.running -= 1


def test_per_model_concurrency_limit() -> None:
    """max_concurrency=1 holds one model to one run at a time while another model uses the
    remaining slots."""
    runner = InferenceRunner(Limits(isolation=False, max_concurrent_inferences=4))
    try:
        data = slow_model(256, 8).SerializeToString()
        limited = ObservedSession(runner.new_session(data, "a" * 64))
        free = ObservedSession(runner.new_session(data, "b" * 64))
        one = SchedulingOptions(max_concurrency=1)
        x = {"x": np.ones((1, 256), np.float32)}

        async def main() -> None:
            await asyncio.gather(
                *(runner.run(limited, ["y"], x, one) for _ in range(12)),
                *(runner.run(free, ["y"], x) for _ in range(12)),
            )

        asyncio.run(main())
        assert limited.peak == 1
        assert free.peak > 1
    finally:
        runner.shutdown()


def test_preferred_sizes_and_queue_delay_in_the_scheduler() -> None:
    """With a preferred size of 2, four queued single-row requests leave as two batches of
    two; a lone request leaves once its delay has passed."""
    runner = InferenceRunner(Limits(isolation=False, max_concurrent_inferences=1))
    try:
        session = runner.new_session(matmul_model(16).SerializeToString(), "c" * 64)
        options = SchedulingOptions(8, 50_000, (2,), 0)
        scheduler: Scheduler = runner.scheduler
        rows = [np.full((1, 16), i, np.float32) for i in range(4)]

        async def main() -> list[list[np.ndarray]]:
            return await asyncio.gather(
                *(scheduler.run(session, ["y"], {"x": r}, options) for r in rows)
            )

        answers = asyncio.run(main())
        assert scheduler.batches == 2 and scheduler.batched_requests == 4
        for r, answer in zip(rows, answers, strict=True):
            alone = asyncio.run(session.run(["y"], {"x": r}))
            assert answer[0].tobytes() == alone[0].tobytes()
        lone = asyncio.run(scheduler.run(session, ["y"], {"x": rows[0]}, options))
        assert lone[0].shape == (1, 16) and scheduler.batches == 2
    finally:
        runner.shutdown()


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    runner = InferenceRunner(Limits(isolation=False, max_concurrent_inferences=1))
    try:
        session = runner.new_session(slow_model(256, 8).SerializeToString(), "d" * 64)
        x = {"x": np.ones((1, 256), np.float32)}

        async def main() -> None:
            first = asyncio.ensure_future(runner.run(session, ["y"], x))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(runner.run(session, ["y"], x))
            await asyncio.sleep(0)
            assert runner.scheduler.queued == 1
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            assert runner.scheduler.queued == 0
            await first
            assert (await runner.run(session, ["y"], x))[0].shape == (1, 256)

        asyncio.run(main())
    finally:
        runner.shutdown()


def test_options_parse_rejects_nonsense() -> None:
    assert SchedulingOptions.parse({}) is None
    parsed = SchedulingOptions.parse({"max_batch_size": "8", "preferred_batch_sizes": "4,2,4"})
    assert parsed == SchedulingOptions(8, 0, (2, 4), 0)
    for bad in ({"max_batch_size": True}, {"max_batch_size": 1.5}, {"max_concurrency": -2}):
        with pytest.raises(InvalidRequest):
            SchedulingOptions.parse(bad)
