"""Memory: a loaded model costs one copy of it (onnxruntime opens it by path, not from
bytes it would keep), uploads stream into one sealed memfd, and a model is warmed up before it
is reported ready. Real `blindfold serve` processes, real onnxruntime, memory read from
/proc; no wall-clock assertions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ServerProcess, start_server
from helpers import connect
from onnx_models import external_data_model, identity_model, weights_model
from server_process import model_workers, proc_field, tree_memory

MiB = 1 << 20


def reshape_model() -> onnx.ModelProto:
    """Reshapes x (any length) to [2, 3]: runs only on inputs of exactly 6 elements, so its
    warm-up on a zero input of length 1 fails."""
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [x],
        [y],
        initializer=[shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("memory"),
        "--open-upload",
        "--encrypted-models-dir",
        str(tmp_path_factory.getbasetemp()),
    )
    yield process
    process.stop()


def workers(server: ServerProcess) -> set[int]:
    return model_workers(server.process.pid)


def test_a_loaded_model_costs_one_copy_of_it_not_two(server: ServerProcess) -> None:
    """onnxruntime keeps the bytes a session was built from for the session's life; opened
    by path, the worker holds only the session. Measured against a tiny model's worker in
    the same server (interpreter, libraries, arenas)."""
    size = 96
    with connect(server) as client:
        before = workers(server)
        tiny = client.upload_model(identity_model(TensorProto.FLOAT, [4]), name="mem-tiny")
        (tiny_worker,) = workers(server) - before
        before = workers(server)
        big = client.upload_model(weights_model(size), name="mem-big")
        (big_worker,) = workers(server) - before
        overhead = tree_memory(tiny_worker)
        session = tree_memory(big_worker) - overhead
        assert session < 1.3 * size * MiB, (session / MiB, overhead / MiB)
        x = np.ones((1, 1024), np.float32)
        assert client.run_model(big.name, x)["y"].shape == (1, size * 256)
        client.delete_model(big.name)
        client.delete_model(tiny.name)


def test_a_model_is_warmed_up_before_it_is_reported_ready(server: ServerProcess) -> None:
    with connect(server) as client:
        model = client.upload_model(identity_model(TensorProto.FLOAT, [5]), name="mem-warm")
        assert f"model sha256:{model.sha256} warmed up" in server.log()
        client.delete_model(model.name)


def test_a_model_whose_warm_up_fails_still_loads_and_runs(server: ServerProcess) -> None:
    with connect(server) as client:
        model = client.upload_model(reshape_model(), name="mem-reshape")
        log = server.log()
        assert f"model sha256:{model.sha256} was not warmed up (failed: run_failed" in log
        x = np.arange(6, dtype=np.float32)
        np.testing.assert_array_equal(client.run_model(model.name, x)["y"], x.reshape(2, 3))
        client.delete_model(model.name)


@pytest.mark.parametrize("location", ["0", "1", "2", "model.onnx", "../../etc/passwd", "SECRET"])
def test_a_path_loaded_model_cannot_read_any_file_as_external_data(
    location: str, tmp_path: Path
) -> None:
    """Past the front's check (the attacker's model reaches the worker as is): the worker
    opens the model by a path to its memfd, next to its own descriptors while it loads;
    external data naming them (its stdout, the server's log), its own model, an absolute path
    or `..` is refused and nothing is read."""
    from blindfold.server.limits import Limits
    from blindfold.server.refusals import InvalidModel
    from blindfold.server.runtime import InferenceRunner

    secret = tmp_path / "secret"
    secret.write_bytes(b"\x00\x00\x80\x3f" * 3)  # 1.0f x 3: a readable "weight"
    if location == "SECRET":
        location = str(secret)
    runner = InferenceRunner(Limits())
    try:
        with pytest.raises(InvalidModel) as refused:  # a 400 (server.http_errors)
            runner.new_session(external_data_model(location).SerializeToString(), "external")
        assert "external" in str(refused.value).lower()
    finally:
        runner.shutdown()


def test_an_upload_streams_into_one_copy_in_the_front(server: ServerProcess) -> None:
    """The front holds an upload once: streamed into a sealed memfd that the checker reads
    in place (its parse is the one other copy, freed before the worker loads). Buffering the
    body, copying it to bytes and again into a memfd held it three times over, plus the
    parse. The worker's own load peak beyond its loaded session (onnxruntime reading the
    file, and prepacking MatMul weights) stays well under one more copy of the model and a
    half."""
    size = 96
    with connect(server) as client:
        warm = client.upload_model(identity_model(TensorProto.FLOAT, [6]), name="mem-peak-warm")
        front = server.process.pid
        before = proc_field(front, "status", "VmHWM")
        known = workers(server)
        model = client.upload_model(weights_model(size, seed=1), name="mem-peak")
        (worker,) = workers(server) - known
        front_growth = proc_field(front, "status", "VmHWM") - before
        load_transient = proc_field(worker, "status", "VmHWM") - proc_field(
            worker, "status", "VmRSS"
        )
        figures = (front_growth / MiB, load_transient / MiB)
        assert front_growth < 2.3 * size * MiB, figures
        assert load_transient < 1.6 * size * MiB, figures
        client.delete_model(model.name)
        client.delete_model(warm.name)


def test_an_encrypted_model_decrypts_into_one_copy_in_the_front(
    server: ServerProcess, tmp_path: Path
) -> None:
    """load-encrypted decrypts chunk by chunk into the sealed memfd the model's worker opens:
    the front's peak is that copy plus the checker's transient one (as a streamed upload).
    Decrypting into bytes (the chunks, then their join) and copying those into a memfd
    peaked at three copies."""
    from blindfold.sealing import encrypt_model_file

    size = 96
    plain = tmp_path / "model.onnx"
    plain.write_bytes(weights_model(size, seed=2).SerializeToString())
    key = encrypt_model_file(plain, tmp_path / "model.enc")
    plain.unlink()
    with connect(server) as client:
        warm = client.upload_model(identity_model(TensorProto.FLOAT, [7]), name="mem-enc-warm")
        front = server.process.pid
        before = proc_field(front, "status", "VmHWM")
        model = client.load_encrypted_model("mem-enc", str(tmp_path / "model.enc"), key)
        front_growth = proc_field(front, "status", "VmHWM") - before
        assert front_growth < 2.3 * size * MiB, front_growth / MiB
        assert model.sha256 == key.sha256
        client.delete_model(model.name)
        client.delete_model(warm.name)


def test_a_model_declaring_huge_inputs_loads_without_warm_up(server: ServerProcess) -> None:
    """Warm-up zeros are not made beyond 256 MiB over all inputs (each input within the
    server's element limit): the model loads unwarmed, and its worker's memory is left for
    the runs users ask for."""
    shape = [8192, 4097]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "huge", inputs, [y])
    huge = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with connect(server) as client:
        model = client.upload_model(huge, name="huge")
        assert (
            f"model sha256:{model.sha256} was not warmed up (skipped: its declared inputs "
            "exceed 256 MiB)" in server.log()
        )
        client.delete_model(model.name)
