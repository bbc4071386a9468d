"""benchmarks/peers.py end to end with a tiny time budget: both servers (Blindfold over attested
TLS, KServe's ModelServer over plain HTTP) start, answer v2 requests with what in-process
onnxruntime computes, and every side is measured. Asserts what ran, never how fast.

Needs kserve: in this interpreter (`pip install -e .[peers]` where its protobuf pin fits) or in
the environment peers.py keeps under ~/.cache/blindfold/ (one run of the benchmark makes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import peers  # noqa: E402

pytestmark = pytest.mark.slow

MODES = ["in-process", "blindfold", "kserve", "in-process x8", "blindfold x8", "kserve x8"]


@pytest.fixture(scope="module")
def kserve_python() -> str:
    """KServe's interpreter, installing KServe from PyPI into its own environment (as the
    benchmark does) when it is not there yet."""
    try:
        return str(peers.kserve_python())
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"could not install KServe from PyPI into {peers.PEERS_VENV}: {exc}")


def test_peers_runs_both_servers_and_reports_every_side(tmp_path: Path, kserve_python: str) -> None:
    out = tmp_path / "peers.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--no-seed"]
    command += ["--seconds", "0.3", "--rounds", "1", "--json", str(out)]
    command += ["--kserve-python", kserve_python]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    # peers.py checks both servers' outputs against in-process onnxruntime before timing,
    # and exits non-zero when either differs.
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["models"] == ["tiny", "medium"]
    ran = {(row["model"], row["mode"]): row["requests"] for row in data["results"]}
    assert set(ran) == {(model, mode) for model in data["models"] for mode in MODES}
    assert all(requests > 0 for requests in ran.values()), ran
    figures = {(v["model"], v["figure"]) for v in data["verdicts"]}
    assert len(figures) == 3 * len(data["models"])
    assert "PASS" in done.stdout or "MISS" in done.stdout
    assert data["machine"]["kserve"].startswith("0.")


def test_kserve_server_answers_v2_with_onnxruntime_results(
    tmp_path: Path, kserve_python: str
) -> None:
    """The peer itself: a v2 request through tritonclient gets onnxruntime's exact output, and
    a request with the wrong shape is refused without taking the server down."""
    data, x = peers.tiny_model()
    path = tmp_path / "tiny.onnx"
    path.write_bytes(data)
    expected = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with peers.kserve_server(kserve_python, {"tiny": path}, tmp_path) as server:
        clients = peers.TritonClients(server.url)
        try:
            got = clients.infer("tiny", {"x": x}, ["y"])
            np.testing.assert_array_equal(got["y"], expected[0])
            with pytest.raises(InferenceServerException) as refused:
                clients.infer("tiny", {"x": np.zeros((1, 3), np.float32)}, ["y"])
            # onnxruntime's shape error (KServe answers it with HTTP 500)
            assert "dimensions" in str(refused.value)
        finally:
            clients.close()
        # Still serving (on a new connection: KServe drops the one that carried the error).
        again = peers.TritonClients(server.url)
        try:
            np.testing.assert_array_equal(again.infer("tiny", {"x": x}, ["y"])["y"], expected[0])
        finally:
            again.close()
