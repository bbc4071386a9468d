"""Blindfold's overhead against in-process onnxruntime, measured in one run.

    .venv/bin/python benchmarks/overhead.py [--json out.json] [--intra-op-threads N]

Starts a real `blindfold serve --open-upload` process (simulation TEE) on a free loopback
port, uploads two models built with onnx.helper through the SDK, and measures for each:

* in-process onnxruntime (default session options, like the server): 1 thread, 8 threads;
* the SDK over attested, pinned TLS: 1 client; 8 concurrent clients, both as 8 threads
  with their own `blindfold.Client` and as 8 threads sharing one Client (its transport
  keeps a thread-safe pool of keep-alive connections).

Models: (a) "tiny", one [1,64] x [64,64] MatMul, where the cost is all overhead;
(b) "medium", a small CNN (six 3x3 Conv+Relu layers, 1.1 M parameters) on one 3x96x96
image, about 10 ms per inference in-process on a 2-core machine (108 KiB in, 40 B out);
and, for information only, "mlp-io": an MLP (8.4 M parameters) on a batch of 96 with
384 KiB in and 384 KiB out for ~9 ms of compute, where TLS and HTTP's share shows.

In-process and SDK figures are measured in alternating rounds (--rounds) and pooled, so
load from other processes on the machine biases both sides of each ratio alike.

Targets (printed as PASS/MISS):
  (b) SDK p50 / in-process p50 <= 1.15
  (a) SDK p50 - in-process p50 <= 1 ms
  (a) throughput with 8 clients >= 2000 inferences/s
Run it twice to see what model isolation costs: as is, and with
--server-arg=--unsafe-no-isolation (models inside the front process).
This is a benchmark, not a test: absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import blindfold

# The same `blindfold serve` child process the tests start.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_process import start_server

CLIENTS = 8


# --- models ---


def _finish(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_model() -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    return _finish(graph), rng.standard_normal((1, 64)).astype(np.float32)


def medium_model(size: int = 96) -> tuple[bytes, np.ndarray]:
    """A small CNN: six 3x3 Conv+Relu layers (32-64-128-128-256-256 channels), global
    average pooling and a 10-way Gemm; 1.1 M parameters, one 3x96x96 image in (108 KiB),
    10 logits out. About 10 ms per inference in-process on a 2-core machine."""
    rng = np.random.default_rng(3)
    nodes, initializers, previous, channels = [], [], "x", 3
    layers = [(32, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)]
    for i, (out, stride) in enumerate(layers):
        w = (rng.standard_normal((out, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
        initializers.append(numpy_helper.from_array(w, f"conv{i}_w"))
        initializers.append(numpy_helper.from_array(np.zeros(out, np.float32), f"conv{i}_b"))
        nodes.append(
            helper.make_node(
                "Conv",
                [previous, f"conv{i}_w", f"conv{i}_b"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        previous, channels = f"relu{i}", out
    nodes.append(helper.make_node("GlobalAveragePool", [previous], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    w = (rng.standard_normal((channels, 10)) / np.sqrt(channels)).astype(np.float32)
    initializers.append(numpy_helper.from_array(w, "fc_w"))
    initializers.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "medium",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        initializers,
    )
    return _finish(graph), rng.standard_normal((1, 3, size, size)).astype(np.float32)


def mlp_model(
    batch: int = 96, dims: tuple[int, ...] = (1024, 2048, 2048, 1024)
) -> tuple[bytes, np.ndarray]:
    """Informational, not a target: an MLP (8.4 M parameters) on a batch of 96, so 384 KiB
    travel each way over TLS for about 9 ms of compute; shows the transport's share."""
    rng = np.random.default_rng(2)
    nodes, initializers, previous = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        initializers.append(numpy_helper.from_array(w, f"w{i}"))
        initializers.append(numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [f"h{i}"]))
        previous = f"h{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [previous], [f"r{i}"]))
            previous = f"r{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp_io",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, dims[-1]])],
        initializers,
    )
    return _finish(graph), rng.standard_normal((batch, dims[0])).astype(np.float32)


# --- server process ---


def connect(url: str) -> blindfold.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the simulation TEE warning
        return blindfold.connect(url, allow_simulation=True)


# --- measurement ---


@dataclass
class Result:
    model: str
    mode: str
    threads: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    throughput: float  # inferences per second
    latencies: list[float] = field(default_factory=list, repr=False)  # seconds; not saved

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "latencies"}


def _summarize(model: str, mode: str, threads: int, lat: list[float], seconds: float) -> Result:
    array = np.array(lat) * 1e3
    return Result(
        model,
        mode,
        threads,
        len(lat),
        seconds,
        float(np.percentile(array, 50)),
        float(np.percentile(array, 99)),
        len(lat) / seconds,
        lat,
    )


def measure(
    model: str,
    mode: str,
    calls: list[Callable[[], Any]],
    *,
    warmup: int,
    max_requests: int,
    max_seconds: float,
) -> Result:
    """Runs each of `calls` (one per thread) in a loop: `warmup` untimed calls per thread,
    then timed calls until `max_requests` in total or `max_seconds` have passed."""
    barrier = threading.Barrier(len(calls) + 1)
    latencies: list[list[float]] = [[] for _ in calls]
    stop = threading.Event()
    errors: list[BaseException] = []
    per_thread = max(1, max_requests // len(calls))

    def worker(index: int) -> None:
        call, mine = calls[index], latencies[index]
        try:
            for _ in range(warmup):
                call()
        except BaseException as exc:
            errors.append(exc)
        barrier.wait()
        clock = time.perf_counter
        try:
            while not stop.is_set() and len(mine) < per_thread:
                start = clock()
                call()
                mine.append(clock() - start)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    timer = threading.Timer(max_seconds, stop.set)
    timer.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    timer.cancel()
    if errors:
        raise errors[0]
    merged = [value for mine in latencies for value in mine]
    return _summarize(model, mode, len(calls), merged, elapsed)


# --- the run ---


def interleaved(
    model: str, modes: dict[str, list[Callable[[], Any]]], rounds: int, **limits: Any
) -> list[Result]:
    """Measures several modes in alternating rounds and pools each mode's rounds, so that
    load from elsewhere on the machine biases all of them alike."""
    pooled: dict[str, list[Result]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, calls in modes.items():
            pooled[mode].append(
                measure(
                    model,
                    mode,
                    calls,
                    warmup=limits["warmup"],
                    max_requests=limits["max_requests"] // rounds,
                    max_seconds=limits["max_seconds"] / rounds,
                )
            )
    merged = []
    for mode, parts in pooled.items():
        latencies = [value for part in parts for value in part.latencies]
        seconds = sum(part.seconds for part in parts)
        merged.append(_summarize(model, mode, len(modes[mode]), latencies, seconds))
    return merged


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = {"tiny": tiny_model(), "medium": medium_model()}
    if not args.no_mlp:
        models["mlp-io"] = mlp_model()
    results: list[Result] = []
    seconds = args.seconds
    rounds = args.rounds

    def record(result: Result) -> None:
        results.append(result)
        print(
            f"  {result.model:<7} {result.mode:<22} {result.p50_ms:8.3f} ms p50 "
            f"{result.p99_ms:8.3f} ms p99 {result.throughput:9.1f}/s ({result.requests} requests)",
            file=sys.stderr,
            flush=True,
        )

    extra = [] if args.intra_op_threads == 0 else ["--intra-op-threads", str(args.intra_op_threads)]
    extra += args.server_arg
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="blindfold-bench-") as tmp:
        server = start_server(Path(tmp), "--open-upload", *extra)
        try:
            shared = connect(server.url)
            own = [connect(server.url) for _ in range(CLIENTS)]
            hashes = {}
            for name, (data, _) in models.items():
                # Public: the other clients run it by hash (uploads are restricted by default).
                hashes[name] = shared.upload_model(data, name, public=True).sha256
            for name, (data, x) in models.items():
                digest = hashes[name]
                small = name == "tiny"
                options = ort.SessionOptions()  # what the server sets, bar the log level
                options.intra_op_num_threads = args.intra_op_threads
                session = ort.InferenceSession(
                    data, sess_options=options, providers=["CPUExecutionProvider"]
                )
                feeds = {"x": x}

                def local(session: Any = session, feeds: dict[str, Any] = feeds) -> Any:
                    return session.run(None, feeds)

                def sdk(client: blindfold.Client, digest: str = digest, x: np.ndarray = x) -> Any:
                    return lambda: client.run_model(digest, x)

                # Correctness once: the SDK returns what onnxruntime computes.
                np.testing.assert_allclose(
                    shared.run_model(digest, x)["y"], local()[0], rtol=1e-3, atol=1e-4
                )
                single = interleaved(
                    name,
                    {"in-process": [local], "sdk 1 client": [sdk(shared)]},
                    rounds,
                    warmup=100 if small else 10,
                    max_requests=20000 if small else 500,
                    max_seconds=2 * seconds,
                )
                multi = interleaved(
                    name,
                    {
                        f"in-process x{CLIENTS}": [local] * CLIENTS,
                        f"sdk {CLIENTS} own clients": [sdk(c) for c in own],
                        f"sdk {CLIENTS} shared client": [sdk(shared)] * CLIENTS,
                    },
                    rounds,
                    warmup=20 if small else 2,
                    max_requests=1_000_000,
                    max_seconds=seconds,
                )
                for result in single + multi:
                    record(result)
            for client in [shared, *own]:
                client.close()
        finally:
            server.stop()
    return {
        "results": [r.as_json() for r in results],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "intra_op_threads": args.intra_op_threads,
        "server_args": extra,
    }


def report(data: dict[str, Any]) -> dict[str, Any]:
    rows = [Result(**r) for r in data["results"]]

    def get(model: str, mode: str) -> Result:
        return next(r for r in rows if r.model == model and r.mode == mode)

    def best_multi(model: str) -> Result:
        candidates = [r for r in rows if r.model == model and r.mode.startswith(f"sdk {CLIENTS}")]
        return max(candidates, key=lambda r: r.throughput)

    print()
    print(f"{'model':<8}{'mode':<24}{'p50 ms':>10}{'p99 ms':>10}{'inf/s':>11}{'requests':>10}")
    for r in rows:
        print(
            f"{r.model:<8}{r.mode:<24}{r.p50_ms:>10.3f}{r.p99_ms:>10.3f}"
            f"{r.throughput:>11.1f}{r.requests:>10}"
        )
    ratio = get("medium", "sdk 1 client").p50_ms / get("medium", "in-process").p50_ms
    added = get("tiny", "sdk 1 client").p50_ms - get("tiny", "in-process").p50_ms
    tiny_multi = best_multi("tiny")
    targets = [
        ("(b) medium: SDK p50 / in-process p50", ratio, "<=", 1.15, f"{ratio:.3f}"),
        ("(a) tiny: added latency p50 (ms)", added, "<=", 1.0, f"{added:.3f} ms"),
        (
            f"(a) tiny: throughput, {CLIENTS} clients (inf/s)",
            tiny_multi.throughput,
            ">=",
            2000.0,
            f"{tiny_multi.throughput:.0f}/s ({tiny_multi.mode})",
        ),
    ]
    print()
    summary = []
    for label, value, op, limit, shown in targets:
        ok = value <= limit if op == "<=" else value >= limit
        print(f"{'PASS' if ok else 'MISS'}  {label:<44} {shown}  (target {op} {limit:g})")
        summary.append({"target": label, "value": value, "op": op, "limit": limit, "pass": ok})
    for model in [m for m in ("tiny", "medium", "mlp-io") if any(r.model == m for r in rows)]:
        own, shared = (
            get(model, f"sdk {CLIENTS} own clients"),
            get(model, f"sdk {CLIENTS} shared client"),
        )
        print(
            f"note: {model} with {CLIENTS} threads: own clients {own.throughput:.0f}/s, one "
            f"shared client {shared.throughput:.0f}/s; "
            f"in-process x{CLIENTS} {get(model, f'in-process x{CLIENTS}').throughput:.0f}/s"
        )
    return {"targets": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="time budget of each throughput measurement, twice that for "
        "each latency one, split over the rounds (default 4)",
    )
    parser.add_argument(
        "--no-mlp",
        action="store_true",
        help="skip the informational large-I/O MLP (saves about a third)",
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds per comparison (default 4)"
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads, in-process and on the server "
        "(default 0: onnxruntime's default, one per core)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `blindfold serve` (repeatable)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"measuring ({os.cpu_count()} CPUs, onnxruntime {ort.__version__}) ...",
        file=sys.stderr,
        flush=True,
    )
    data = run(args)
    data.update(report(data))
    data["wall_seconds"] = time.perf_counter() - started
    load = data["machine"]
    print(
        f"\nwhole run: {data['wall_seconds']:.0f} s; load average before "
        f"{load['load_average_before'][0]:.2f}, after {load['load_average_after'][0]:.2f} "
        f"on {load['cpus']} CPUs (other work on the machine inflates every figure)"
    )
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
