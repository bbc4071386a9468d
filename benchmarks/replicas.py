"""Replicas behind a load balancer, against in-process onnxruntime, measured in one run.

    .venv/bin/python benchmarks/replicas.py [--seconds 8] [--json out.json]

Starts real `blindfold serve` replicas (simulation TEE) joined under a cluster policy and a
real HAProxy (round-robin TCP passthrough) in front of them, and measures:

* the time for a replica to join: process start until it listens, for the first replica
  (bootstrap: nothing to join) and for joiners (attest the peer, be attested, receive the
  identity, copy the models), with the medium model already uploaded;
* throughput of 1 replica vs 3 replicas behind the balancer, with 8 and 32 client threads,
  for the tiny and the medium model of `overhead.py`, as a ratio to in-process onnxruntime
  (8 threads on one session) measured in the same run.

All replicas share this machine's cores: on 2 cores three replicas cannot scale, so the
figure that matters is per-core efficiency (throughput per busy core, relative to 1 replica).
This is a benchmark, not a test: absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import blindfold

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import medium_model, tiny_model

from server_process import (
    start_balancer,
    start_replica,
    write_cluster_policy,
)


def connect(url: str) -> blindfold.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blindfold.connect(url, allow_simulation=True)


def in_process(model: bytes, x: np.ndarray, threads: int, seconds: float) -> float:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _throughput(lambda: session.run(None, {name: x}), threads, seconds)


def through(url: str, sha256: str, x: np.ndarray, threads: int, seconds: float) -> float:
    clients = [connect(url) for _ in range(threads)]
    try:
        calls = iter(clients)
        local = threading.local()

        def call() -> None:
            if not hasattr(local, "client"):
                local.client = next(calls)
            local.client.run_model(sha256, x)

        return _throughput(call, threads, seconds)
    finally:
        for client in clients:
            client.close()


def _throughput(call: Any, threads: int, seconds: float) -> float:
    counts = [0] * threads
    stop = threading.Event()
    start_gate = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        call()  # warm up (and attach the thread's client)
        start_gate.wait()
        while not stop.is_set():
            call()
            counts[index] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    start_gate.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - began)


def join_handshake(url: str, policy: Path, rounds: int = 5) -> float:
    """Median time of the join protocol alone (attest the peer, its nonce, this replica's
    evidence, verification, the sealed identity), from this process."""
    from blindfold.server.cluster import ClusterPolicy, join_cluster
    from blindfold.server.tee.simulation import SimulationProvider

    cluster = ClusterPolicy.load(policy)
    provider = SimulationProvider()
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            began = time.perf_counter()
            join_cluster(url, cluster, provider, advertise_url="")  # "": not added as member
            times.append(time.perf_counter() - began)
    return float(np.median(times))


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="blindfold-replicas-"))
    policy = write_cluster_policy(tmp)
    models = {"tiny": tiny_model(), "medium": medium_model()}
    replicas = []
    result: dict[str, Any] = {"cpus": os.cpu_count(), "seconds": args.seconds}
    try:
        began = time.perf_counter()
        first = start_replica(tmp, policy)
        replicas.append(first)
        result["bootstrap_start_s"] = time.perf_counter() - began
        with connect(first.url) as client:
            hashes = {
                name: client.upload_model(data, name=name, public=True).sha256
                for name, (data, _) in models.items()
            }
        joins = []
        for _ in range(2):
            began = time.perf_counter()
            replicas.append(start_replica(tmp, policy, join=first))
            joins.append(time.perf_counter() - began)
        result["join_start_s"] = joins
        result["join_overhead_s"] = float(np.median(joins)) - result["bootstrap_start_s"]
        result["join_handshake_s"] = join_handshake(first.url, policy)
        if args.join_only:
            return result
        balancers = {
            1: start_balancer(tmp, [first.port]),
            3: start_balancer(tmp, [r.port for r in replicas]),
        }
        try:
            for name, (data, x) in models.items():
                for threads in (8, 32):
                    base = in_process(data, x, 8, args.seconds)
                    row: dict[str, Any] = {"in_process_8_threads": base}
                    for count, balancer in balancers.items():
                        rate = through(
                            balancer.url, f"sha256:{hashes[name]}", x, threads, args.seconds
                        )
                        row[f"replicas_{count}"] = rate
                        row[f"replicas_{count}_ratio"] = rate / base
                    row["scaling_3_vs_1"] = row["replicas_3"] / row["replicas_1"]
                    result[f"{name}_{threads}_clients"] = row
                    print(name, threads, "clients:", json.dumps(row), flush=True)
        finally:
            for balancer in balancers.values():
                balancer.stop()
    finally:
        for replica in replicas:
            replica.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--join-only", action="store_true", help="skip the throughput part")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    cpus = result["cpus"] or 1
    print(
        f"\njoin: bootstrap start {result['bootstrap_start_s']:.2f} s, joiner start "
        f"{np.median(result['join_start_s']):.2f} s (join adds "
        f"{result['join_overhead_s']:.2f} s, models copied included); the join protocol "
        f"alone {result['join_handshake_s'] * 1000:.0f} ms"
    )
    for key, row in result.items():
        if isinstance(row, dict):
            print(
                f"{key}: 1 replica {row['replicas_1']:.0f}/s ({row['replicas_1_ratio']:.2f}x "
                f"in-process), 3 replicas {row['replicas_3']:.0f}/s "
                f"({row['replicas_3_ratio']:.2f}x); 3 vs 1 = {row['scaling_3_vs_1']:.2f} "
                f"on {cpus} cores"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
