"""BlindAI's model catalogue end to end: every script in examples/models builds its model,
uploads it to a real server, runs it on a realistic input and checks the server's outputs
against in-process onnxruntime (1e-4 relative).

Marked `models`; needs the `examples` extra (bin/install-examples) and is skipped, saying
which package is missing, without it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_process import ServerProcess, start_server

pytestmark = pytest.mark.models

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
NEEDS = {  # script: the importable packages it needs beyond Blindfold's own
    "distilbert": ["torch", "transformers", "onnxruntime_extensions"],
    "covidnet": ["torch"],
    "wav2vec2": ["torch", "transformers", "onnxruntime_extensions"],
    "facenet": ["torch", "facenet_pytorch"],
    "yolo": ["torch", "ultralytics"],
    "word2vec": [],
    "random_forest": ["sklearn", "skl2onnx"],
    "m5": ["torch"],
}


@pytest.fixture(scope="module")
def catalogue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    pytest.importorskip("onnxruntime_extensions", reason="bin/install-examples installs it")
    process = start_server(
        tmp_path_factory.mktemp("catalogue"), "--open-upload", "--enable-ort-extensions"
    )
    yield process
    process.stop()


def test_every_model_of_the_catalogue_has_a_script() -> None:
    scripts = {path.stem for path in EXAMPLES.glob("*.py") if not path.stem.startswith("_")}
    assert scripts == set(NEEDS)


@pytest.mark.parametrize("script", sorted(NEEDS))
def test_model_end_to_end(script: str, catalogue_server: ServerProcess) -> None:
    missing = [name for name in NEEDS[script] if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run bin/install-examples")
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / f"{script}.py"),
            catalogue_server.url,
            "--allow-simulation",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "outputs match in-process onnxruntime" in result.stdout, output[-4000:]
    assert "MISMATCH" not in output
    assert catalogue_server.alive()
