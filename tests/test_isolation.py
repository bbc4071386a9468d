"""Uploaded models are untrusted code: each runs in a confined worker process with memory and
time limits, is restarted when it dies, and never takes the server (or other models) down.
Every test attacks a real `blindfold serve` process on loopback with real ONNX models."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from blindfold.errors import ServerError

from conftest import ServerProcess, start_server
from helpers import connect
from onnx_models import identity_model, matmul_model
from server_process import children_of, process_tree

MiB = 1 << 20


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose workers may take 512 MiB at run time and run for 2 s."""
    server = start_server(
        tmp_path_factory.mktemp("isolation"),
        "--open-upload",
        "--max-inference-memory",
        str(512 * MiB),
        "--inference-timeout",
        "2",
    )
    yield server
    server.stop()


# --- what the worker can reach ---


def worker_pids(server: ServerProcess) -> list[int]:
    """The model workers: children of the fork server the front started."""
    children = children_of()
    pids = []
    for child in children.get(server.process.pid, []):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"forkserver" in command:
            pids.extend(children.get(child, []))
    return pids


def resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), None)
        if line:
            total += int(line.split()[1]) * 1024
    return total


def test_models_run_in_confined_workers_not_in_the_front(limited: ServerProcess) -> None:
    with connect(limited) as client:
        model = client.upload_model(identity_model(TensorProto.FLOAT, [2]), name="confined")
        x = np.array([1.0, 2.0], np.float32)
        assert np.array_equal(client.run_model(model.name, x)["y"], x)
        workers = worker_pids(limited)
        assert workers, "no model worker process found below the server"
        for pid in workers:
            # Not a fork of the front: the fork server, a fresh interpreter, is its parent.
            status = Path(f"/proc/{pid}/status").read_text()
            ppid = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
            assert ppid != limited.process.pid
            # An empty root (chroot) or at least an empty working directory.
            root = os.readlink(f"/proc/{pid}/root")
            cwd = os.readlink(f"/proc/{pid}/cwd")
            worker_dir = "/tmp/blindfold-worker-"  # noqa: S108 (the name workers get)
            assert root != "/" or cwd.startswith(worker_dir), (root, cwd)
            assert os.listdir(f"/proc/{pid}/cwd") == []
            limits = Path(f"/proc/{pid}/limits").read_text()
            address_space = next(x for x in limits.splitlines() if "address space" in x)
            assert "unlimited" not in address_space
            core = next(x for x in limits.splitlines() if "core file" in x)
            assert core.split()[4:6] == ["0", "0"], core
        client.delete_model(model.name, token=model.owner_token)


def test_the_log_says_once_what_confinement_the_workers_got(limited: ServerProcess) -> None:
    """The host decides whether workers get chroot (a user namespace) or only an empty
    working directory; the operator reads which in the log, once, matching what they got."""
    with connect(limited) as client:
        models = [
            client.upload_model(identity_model(TensorProto.FLOAT, [n]), name=f"confinement-{n}")
            for n in (3, 4)
        ]
        roots = {os.readlink(f"/proc/{pid}/root") for pid in worker_pids(limited)}
        assert roots, "no model worker process found below the server"
        for model in models:
            client.delete_model(model.name, token=model.owner_token)
    lines = [line for line in limited.log().splitlines() if "model workers are confined" in line]
    assert len(lines) == 1, lines
    if roots - {"/"}:
        assert "chroot into an empty directory" in lines[0]
    else:
        assert "only to an empty working directory" in lines[0] and "WARNING" in lines[0]


# --- memory bombs ---


def constant_of_shape_bomb() -> onnx.ModelProto:
    """Output shape taken from the input: asks for as much memory as the caller names."""
    node = helper.make_node(
        "ConstantOfShape",
        ["shape"],
        ["y"],
        value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
    )
    graph = helper.make_graph(
        [node],
        "bomb",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def expand_bomb() -> onnx.ModelProto:
    node = helper.make_node("Expand", ["x", "shape"], ["y"])
    graph = helper.make_graph(
        [node],
        "bomb",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def range_bomb() -> onnx.ModelProto:
    node = helper.make_node("Range", ["start", "limit", "delta"], ["y"])
    graph = helper.make_graph(
        [node],
        "bomb",
        [
            helper.make_tensor_value_info("start", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("limit", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("delta", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tile_bomb() -> onnx.ModelProto:
    node = helper.make_node("Tile", ["x", "repeats"], ["y"])
    graph = helper.make_graph(
        [node],
        "bomb",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("repeats", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def loop_scan_bomb() -> onnx.ModelProto:
    """A Loop that stacks a 1 MiB tensor per iteration as a scan output."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node(
                "ConstantOfShape",
                ["block_shape"],
                ["block"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
            ),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("block", TensorProto.FLOAT, [1 << 18]),
        ],
        [onnx.numpy_helper.from_array(np.array([1 << 18], np.int64), "block_shape")],
    )
    loop = helper.make_node("Loop", ["trips", "cond"], ["y"], body=body)
    graph = helper.make_graph(
        [loop],
        "bomb",
        [
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


GIB_FLOATS = 1 << 28  # 1 GiB of float32


@pytest.mark.parametrize(
    ("model", "feeds"),
    [
        (constant_of_shape_bomb, {"shape": np.array([4 * GIB_FLOATS], np.int64)}),
        (expand_bomb, {"x": np.ones(1, np.float32), "shape": np.array([4 * GIB_FLOATS], np.int64)}),
        (
            range_bomb,
            {
                "start": np.array(0, np.float32),
                "limit": np.array(4 * GIB_FLOATS, np.float32),
                "delta": np.array(1, np.float32),
            },
        ),
        (tile_bomb, {"x": np.ones(1, np.float32), "repeats": np.array([4 * GIB_FLOATS], np.int64)}),
        (loop_scan_bomb, {"trips": np.array(4096, np.int64), "cond": np.array(True)}),
    ],
    ids=["ConstantOfShape", "Expand", "Range", "Tile", "Loop"],
)
def test_a_model_asking_for_gigabytes_gets_an_error_and_memory_stays_bounded(
    limited: ServerProcess, model: object, feeds: dict[str, np.ndarray]
) -> None:
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            pids = [limited.process.pid, *process_tree(limited.process.pid)[1:]]
            peak = max(peak, resident_bytes(pids))
            time.sleep(0.02)

    with connect(limited) as client:
        uploaded = client.upload_model(model(), name="bomb")  # type: ignore[operator]
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with pytest.raises(ServerError) as caught:
                client.run_model(uploaded.name, feeds)
        finally:
            done.set()
            watcher.join()
        # Refused for memory (507), stopped at the time limit (504), or its worker killed (503).
        assert caught.value.status in (503, 504, 507), caught.value
        # 4 GiB were asked for; the worker may take 512 MiB beyond its model. The tree also
        # holds the front, the fork server and the other bombs' workers (2068 MiB was seen
        # once in CI with 2 GiB as the bound; see the session note): well under 4 GiB.
        assert peak < 2560 * MiB, f"server tree peaked at {peak >> 20} MiB"
        # The server and the model keep serving.
        # Each bomb with its numbers made small works.
        small = {name: np.full_like(value, 3) for name, value in feeds.items()}
        small.update({name: np.zeros_like(feeds[name]) for name in ("start",) if name in feeds})
        small.update({name: np.ones_like(feeds[name]) for name in ("x", "delta") if name in feeds})
        if "cond" in small:
            small["cond"] = np.array(True)
        assert client.run_model(uploaded.name, small)["y"].size in (3, 3 << 18)
        client.delete_model(uploaded.name, token=uploaded.owner_token)


# --- time limits ---


def slow_loop_model() -> onnx.ModelProto:
    """A Loop whose trip count the caller chooses; each iteration multiplies a matrix."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["acc_in", "acc_in"], ["product"]),
            helper.make_node("Tanh", ["product"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [64, 64]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [64, 64]),
        ],
    )
    loop = helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)
    graph = helper.make_graph(
        [loop],
        "slow",
        [
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def loop_feeds(trips: int) -> dict[str, np.ndarray]:
    return {
        "trips": np.array(trips, np.int64),
        "cond": np.array(True),
        "x": np.full((64, 64), 0.01, np.float32),
    }


def test_a_run_past_the_time_limit_is_stopped_and_others_keep_running(
    limited: ServerProcess,
) -> None:
    with connect(limited) as client:
        slow = client.upload_model(slow_loop_model(), name="slow", public=True)
        fast = client.upload_model(identity_model(TensorProto.FLOAT, [2]), name="fast")
        outcome: dict[str, object] = {}

        def endless() -> None:
            try:
                client_b = connect(limited)
                with client_b:
                    client_b.run_model(slow.name, loop_feeds(1 << 40))
            except ServerError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=endless)
        thread.start()
        time.sleep(0.5)
        # Meanwhile another model answers.
        x = np.array([5.0, 6.0], np.float32)
        assert np.array_equal(client.run_model(fast.name, x)["y"], x)
        thread.join(timeout=60)
        assert not thread.is_alive()
        error = outcome["error"]
        assert isinstance(error, ServerError) and error.status == 504, error
        assert "--inference-timeout" in str(error)
        # The model itself still serves short runs.
        assert client.run_model(slow.name, loop_feeds(2))["y"].shape == (64, 64)
        for model in (slow, fast):
            client.delete_model(model.name, token=model.owner_token)


# --- worker death ---


def test_a_worker_that_dies_fails_only_its_request_and_is_restarted(
    limited: ServerProcess,
) -> None:
    with connect(limited) as client:
        slow = client.upload_model(slow_loop_model(), name="victim", public=True)
        other = client.upload_model(matmul_model(8), name="bystander")
        before = set(worker_pids(limited))
        outcome: dict[str, object] = {}

        def long_run() -> None:
            try:
                with connect(limited) as client_b:
                    client_b.run_model(slow.name, loop_feeds(1 << 40))
            except ServerError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=long_run)
        thread.start()
        time.sleep(0.8)
        # The busy worker is the one burning CPU: kill it as a crashing runtime would die.
        busiest = max(
            before, key=lambda pid: int(Path(f"/proc/{pid}/stat").read_text().split()[13])
        )
        os.kill(busiest, signal.SIGKILL)
        thread.join(timeout=30)
        error = outcome["error"]
        assert isinstance(error, ServerError) and error.status == 503, error
        assert "SIGKILL" in str(error) and "keeps serving" in str(error)
        # The other model was not affected, and the dead one comes back.
        x = np.ones((1, 8), np.float32)
        assert client.run_model(other.name, x)
        assert client.run_model(slow.name, loop_feeds(1))["y"].shape == (64, 64)
        assert limited.alive()
        for model in (slow, other):
            client.delete_model(model.name, token=model.owner_token)


# --- model memory admission and sharing ---


def big_model(megabytes: int, seed: int) -> onnx.ModelProto:
    """A model whose weights take `megabytes` MiB (distinct bytes per seed)."""
    count = megabytes * MiB // 4
    weights = np.random.default_rng(seed).random(count, dtype=np.float32)
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])],
        [onnx.numpy_helper.from_array(weights, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_uploads_beyond_the_model_memory_budget_are_refused_with_507(tmp_path: Path) -> None:
    # Each 16 MiB model costs about 3 x 16 + 64 = 112 MiB: two fit in 300 MiB, three do not.
    server = start_server(tmp_path, "--open-upload", "--max-model-memory", str(300 * MiB))
    try:
        with connect(server) as client:
            first = client.upload_model(big_model(16, 1), name="m1")
            client.upload_model(big_model(16, 2), name="m2")
            with pytest.raises(ServerError) as caught:
                client.upload_model(big_model(16, 3), name="m3")
            assert caught.value.status == 507
            assert "--max-model-memory" in str(caught.value)
            client.delete_model(first.name, token=first.owner_token)
            client.upload_model(big_model(16, 3), name="m3")
            assert server.alive()
    finally:
        server.stop()


def test_identical_bytes_uploaded_concurrently_share_one_worker(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--open-upload")
    try:
        data = big_model(4, 7).SerializeToString()
        errors: list[Exception] = []

        def upload(name: str) -> None:
            try:
                with connect(server) as client:
                    client.upload_model(data, name=name)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=upload, args=(f"same{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert len(worker_pids(server)) == 1
    finally:
        server.stop()


def test_many_concurrent_runs_queue_for_a_busy_worker(limited: ServerProcess) -> None:
    """More runs than the worker has threads, with inputs that fill the socket to it: each
    waits its turn and succeeds (the sender must wait for room, not fail)."""
    with connect(limited) as client:
        model = client.upload_model(
            identity_model(TensorProto.FLOAT, ["N"]), name="queued", public=True
        )
        errors: list[Exception] = []

        def run(seed: int) -> None:
            try:
                with connect(limited) as own:
                    for round_ in range(5):
                        x = np.full(40_000, seed * 10 + round_, np.float32)  # ~156 KiB inline
                        assert np.array_equal(own.run_model(model.name, x)["y"], x)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        client.delete_model(model.name)


# --- the shared buffers tensors cross in ---


def test_concurrent_runs_of_every_size_each_get_their_own_outputs(
    limited: ServerProcess,
) -> None:
    """More clients than the worker has slots, with sizes that are inline, fit a slot,
    make it grow, and exceed every slot: each gets exactly its own tensor back."""
    with connect(limited) as client:
        model = client.upload_model(
            identity_model(TensorProto.FLOAT, ["N"]), name="sizes", public=True
        )
        sizes = [1_000, 40_000, 300_000, 1_000_000, 5_000_000, 200, 2_500_000]
        errors: list[Exception] = []

        def run(seed: int) -> None:
            try:
                with connect(limited) as own:
                    for round_, size in enumerate(sizes[seed % 3 :] + sizes[: seed % 3]):
                        x = np.full(size, seed * 100 + round_, np.float32)
                        x[-1] = -seed  # a different last element: no two runs look alike
                        assert np.array_equal(own.run_model(model.name, x)["y"], x)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        client.delete_model(model.name)


def test_a_run_whose_waiter_gave_up_keeps_its_buffers_until_it_answers() -> None:
    """A waiter that is cancelled (its request went away) must not hand its slot to the
    next run while the worker still computes: the late answer would land in the buffer that
    run reads its outputs from."""
    import asyncio

    from blindfold.server.limits import Limits
    from blindfold.server.runtime import InferenceRunner, IsolatedSession

    async def scenario() -> None:
        runner = InferenceRunner(Limits())
        slow = await asyncio.to_thread(
            runner.new_session, slow_loop_model().SerializeToString(), "slow"
        )
        assert isinstance(slow, IsolatedSession)  # models run in worker processes by default
        try:
            worker = slow._worker
            assert worker is not None
            started = time.monotonic()
            await slow.run(["y"], loop_feeds(30_000))
            duration = time.monotonic() - started
            late = asyncio.create_task(slow.run(["y"], loop_feeds(30_000)))
            await asyncio.sleep(0.2)  # the worker is computing now
            late.cancel()
            for trips in (1, 2, 3):
                feeds = loop_feeds(trips)
                feeds["x"] = np.full((64, 64), 0.001 * trips, np.float32)
                want = feeds["x"]
                for _ in range(trips):
                    want = np.tanh(want @ want)
                (got,) = await slow.run(["y"], feeds)
                np.testing.assert_allclose(got, want, rtol=1e-5)
            await asyncio.sleep(2 * duration + 0.5)  # the late answer has come by now
            # Its answer was expected, not taken for a worker answering runs never sent.
            assert worker.alive and slow._worker is worker
            (got,) = await slow.run(["y"], loop_feeds(1))
        finally:
            slow.close()
            runner.shutdown()

    asyncio.run(scenario())
