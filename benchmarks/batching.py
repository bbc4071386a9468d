"""Dynamic batching: 16 concurrent clients with and without it, against in-process onnxruntime.

    .venv/bin/python benchmarks/batching.py [--models synthetic,m5,facenet] [--clients 16]
        [--seconds 5] [--rounds 2] [--max-batch-size 16] [--max-queue-delay-us 0]
        [--max-concurrency 1] [--json out.json]

Starts a real `blindfold serve --open-upload` (simulation TEE) on a free loopback port and
uploads each model twice: as it is, and with dynamic batching (the options above). Then, in
the same run:

- single-request p50 through the SDK (one client) and in-process onnxruntime p50;
- for each of the two uploads, `--clients` threads sharing one SDK client send requests for
  `--seconds`, in alternating rounds; throughput and latency percentiles;
- in-process onnxruntime running the whole batch in one call, as the ceiling batching
  approaches.

It prints the throughput ratio batched / unbatched (goal >= 1.5) and the batched p99 over the
single-request p50 (goal <= 2). `synthetic` is a small MLP that needs nothing else; `m5` and
`facenet` are the catalogue's (bin/install-examples), re-exported with a dynamic batch axis.
A benchmark, not a test: the figures depend on the machine and on what else it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import blindfold

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples" / "models"))
from server_process import start_server  # noqa: E402


def synthetic_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """An MLP 256-512-512-10 with a dynamic batch axis: about 0.1 ms of compute per row, so
    what batching saves is the per-request cost."""
    rng = np.random.default_rng(0)
    nodes, inits, previous, width = [], [], "x", 256
    for index, out in enumerate((512, 512, 10)):
        w = (rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{index}")]
        inits += [numpy_helper.from_array(np.zeros(out, np.float32), f"b{index}")]
        nodes.append(helper.make_node("Gemm", [previous, f"w{index}", f"b{index}"], [f"g{index}"]))
        nodes.append(helper.make_node("Relu", [f"g{index}"], [f"r{index}"]))
        previous, width = f"r{index}", out
    nodes[-1] = helper.make_node("Softmax", [f"g{index}"], ["y"], axis=-1)
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"x": rng.standard_normal((1, 256)).astype(np.float32)}


def catalogue_model(script: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A catalogue model, exported with a dynamic first axis on every input and output (the
    scripts export batch 1, which batching refuses)."""
    import _common

    module = importlib.import_module(script)
    export = module.export_torch

    def dynamic_export(model: Any, args: Any, inputs: list[str], outputs: list[str]) -> Any:
        axes = {name: {0: "batch"} for name in [*inputs, *outputs]}
        return export(model, args, inputs, outputs, dynamic_axes=axes)

    module.export_torch = dynamic_export
    try:
        example = module.build(_common.parser(None, checkpoint="-").parse_args([]))
    finally:
        module.export_torch = export
    return example.model, {k: np.asarray(v) for k, v in example.inputs.items()}


MODELS: dict[str, Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray]]]] = {
    "synthetic": synthetic_model,
    "m5": lambda: catalogue_model("m5"),
    "facenet": lambda: catalogue_model("facenet"),
}


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) * 1e3


def concurrent(
    client: blindfold.Client,
    model: str,
    inputs: dict[str, np.ndarray],
    clients: int,
    seconds: float,
) -> tuple[int, list[float], float]:
    """`clients` threads calling as fast as they can; returns (count, latencies, elapsed)."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker() -> None:
        mine = []
        start.wait()
        while time.perf_counter() < stop_at[0]:
            began = time.perf_counter()
            client.run_model(model, inputs)
            mine.append(time.perf_counter() - began)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    return len(latencies), latencies, time.perf_counter() - began


def measure(name: str, client: blindfold.Client, args: argparse.Namespace) -> dict[str, Any]:
    model, inputs = MODELS[name]()
    data = model.SerializeToString()
    plain = client.upload_model(data, f"{name}-plain")
    batched = client.upload_model(
        data,
        f"{name}-batched",
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        max_concurrency=args.max_concurrency or None,
    )
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    batch = {k: np.concatenate([v] * args.clients) for k, v in inputs.items()}
    for _ in range(3):  # warm both sides
        client.run_model(plain.name, inputs)
        client.run_model(batched.name, inputs)
        session.run(None, inputs)
    local, single, local_batch = [], [], []
    for _ in range(args.single_runs):
        began = time.perf_counter()
        session.run(None, inputs)
        local.append(time.perf_counter() - began)
        began = time.perf_counter()
        client.run_model(plain.name, inputs)
        single.append(time.perf_counter() - began)
        began = time.perf_counter()
        session.run(None, batch)
        local_batch.append(time.perf_counter() - began)
    totals = {"plain": [0, 0.0], "batched": [0, 0.0]}
    latencies: dict[str, list[float]] = {"plain": [], "batched": []}
    for _ in range(args.rounds):  # alternate: load elsewhere biases both alike
        for mode, target in (("plain", plain.name), ("batched", batched.name)):
            count, lat, elapsed = concurrent(client, target, inputs, args.clients, args.seconds)
            totals[mode][0] += count
            totals[mode][1] += elapsed
            latencies[mode] += lat
    client.delete_model(plain.name)
    client.delete_model(batched.name)
    result: dict[str, Any] = {
        "model": name,
        "in_process_p50_ms": percentile(local, 50),
        "sdk_single_p50_ms": percentile(single, 50),
        "in_process_batch_per_s": args.clients / np.median(local_batch),
    }
    for mode in ("plain", "batched"):
        result[f"{mode}_per_s"] = totals[mode][0] / totals[mode][1]
        result[f"{mode}_p50_ms"] = percentile(latencies[mode], 50)
        result[f"{mode}_p99_ms"] = percentile(latencies[mode], 99)
    result["throughput_ratio"] = result["batched_per_s"] / result["plain_per_s"]
    result["p99_over_single_p50"] = result["batched_p99_ms"] / result["sdk_single_p50_ms"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="synthetic,m5,facenet")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single-runs", type=int, default=50)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    parser.add_argument("--max-concurrency", type=int, default=1, help="0: the server's")
    parser.add_argument("--server-arg", action="append", default=[], help="for blindfold serve")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as directory:
        server = start_server(Path(directory), "--open-upload", *args.server_arg)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                client = blindfold.connect(server.url, allow_simulation=True)
            with client:
                for name in args.models.split(","):
                    try:
                        row = measure(name, client, args)
                    except ImportError as exc:
                        print(f"{name}: skipped ({exc}; run bin/install-examples)", flush=True)
                        continue
                    results.append(row)
                    print(
                        f"{name:<10} single: in-process p50 {row['in_process_p50_ms']:.2f} ms, "
                        f"SDK p50 {row['sdk_single_p50_ms']:.2f} ms | {args.clients} clients: "
                        f"unbatched {row['plain_per_s']:.0f}/s (p50 {row['plain_p50_ms']:.1f}, "
                        f"p99 {row['plain_p99_ms']:.1f} ms), batched {row['batched_per_s']:.0f}/s "
                        f"(p50 {row['batched_p50_ms']:.1f}, p99 {row['batched_p99_ms']:.1f} ms) | "
                        f"in-process one batch of {args.clients}: "
                        f"{row['in_process_batch_per_s']:.0f}/s\n"
                        f"{'':<10} throughput batched/unbatched {row['throughput_ratio']:.2f} "
                        f"(goal >= 1.5: {'PASS' if row['throughput_ratio'] >= 1.5 else 'MISS'}); "
                        f"batched p99 / single p50 {row['p99_over_single_p50']:.2f} "
                        f"(goal <= 2: {'PASS' if row['p99_over_single_p50'] <= 2 else 'MISS'})",
                        flush=True,
                    )
        finally:
            server.stop()
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
