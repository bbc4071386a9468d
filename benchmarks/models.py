"""The model catalogue (examples/models) through Blindfold against in-process onnxruntime.

    .venv/bin/python benchmarks/models.py [--runs 20] [--only yolo,m5] [--json out.json]

Needs the `examples` extra (bin/install-examples). Starts a real `blindfold serve
--open-upload --enable-ort-extensions` process (simulation TEE) on a free loopback port,
then for each model builds it with its example script, and measures, in alternating rounds:
in-process onnxruntime p50/p90 (the same session options as the server), the SDK's p50/p90
through the server (attested, pinned TLS, run by hash), and their ratio; plus the upload time
and the server's memory for the model (resident memory of the server and all its worker
processes, after the upload minus before it). Each model is deleted before the next.

A benchmark, not a test: absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import blindfold

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples" / "models"))
from server_process import start_server  # noqa: E402

MODELS = [
    "distilbert",
    "covidnet",
    "wav2vec2",
    "facenet",
    "yolo",
    "word2vec",
    "random_forest",
    "m5",
]


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (the front, fork server, workers)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(
                next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]
            )
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total * 1024


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 90))


def measure(name: str, client: blindfold.Client, pid: int, runs: int) -> dict[str, Any]:
    import _common

    module = importlib.import_module(name)
    args = _common.parser(None, checkpoint="-").parse_args([])
    example = module.build(args)
    data = example.model.SerializeToString()
    session = _common.local_session(example.model)
    feeds = {key: np.asarray(value) for key, value in example.inputs.items()}
    before = tree_rss(pid)
    started = time.perf_counter()
    uploaded = client.upload_model(data, name=example.name)
    upload_seconds = time.perf_counter() - started
    target = f"sha256:{uploaded.sha256}"
    client.run_model(target, example.inputs)  # warm up both sides
    session.run(None, feeds)
    memory = tree_rss(pid) - before
    local, sdk = [], []
    for _ in range(runs):  # alternate, so load elsewhere on the machine biases both alike
        started = time.perf_counter()
        session.run(None, feeds)
        local.append(time.perf_counter() - started)
        started = time.perf_counter()
        client.run_model(target, example.inputs)
        sdk.append(time.perf_counter() - started)
    client.delete_model(example.name)
    (local_p50, local_p90), (sdk_p50, sdk_p90) = percentiles(local), percentiles(sdk)
    return {
        "model": example.name,
        "onnx_mib": len(data) / 2**20,
        "local_p50_ms": local_p50 * 1e3,
        "local_p90_ms": local_p90 * 1e3,
        "sdk_p50_ms": sdk_p50 * 1e3,
        "sdk_p90_ms": sdk_p90 * 1e3,
        "ratio_p50": sdk_p50 / local_p50,
        "upload_s": upload_seconds,
        "server_memory_mib": memory / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="inferences per side and model")
    parser.add_argument("--only", help="comma-separated scripts, e.g. yolo,m5")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else MODELS
    results = []
    with tempfile.TemporaryDirectory() as directory:
        server = start_server(Path(directory), "--open-upload", "--enable-ort-extensions")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                client = blindfold.connect(server.url, allow_simulation=True)
            with client:
                for name in names:
                    results.append(measure(name, client, server.process.pid, args.runs))
                    row = results[-1]
                    print(
                        f"{row['model']:<22} in-process p50 {row['local_p50_ms']:8.2f} ms "
                        f"p90 {row['local_p90_ms']:8.2f} | SDK p50 {row['sdk_p50_ms']:8.2f} ms "
                        f"p90 {row['sdk_p90_ms']:8.2f} | ratio {row['ratio_p50']:5.2f} | "
                        f"upload {row['upload_s']:5.1f} s ({row['onnx_mib']:.0f} MiB) | "
                        f"server memory +{row['server_memory_mib']:.0f} MiB",
                        flush=True,
                    )
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
