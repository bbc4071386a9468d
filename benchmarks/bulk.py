"""Bulk tensors: what moving megabytes through Blindfold costs, against in-process onnxruntime.

    .venv/bin/python benchmarks/bulk.py [--seconds 3] [--rounds 4] [--server-arg ARG]...

Starts a real `blindfold serve --open-upload` (simulation TEE) and runs an `Identity` model
on float32 [rows, 1024] tensors of 4 KiB, 128 KiB, 1 MiB and 8 MiB (the same size goes in and
comes out), in alternating rounds with in-process onnxruntime. Identity computes nothing, so
what the SDK adds is the transport: TLS, HTTP, the OIP codec, the hop to the model worker.

Targets (issue 9, printed as PASS/MISS): 1 MiB in + 1 MiB out adds <= 1.5 ms (>= 1.5 GB/s
each way); 8 MiB adds <= 8 ms. A benchmark, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from overhead import _finish, connect, interleaved, start_server

SIZES = {"4 KiB": 1, "128 KiB": 32, "1 MiB": 256, "8 MiB": 2048}  # rows of 1024 float32
TARGETS_MS = {"1 MiB": 1.5, "8 MiB": 8.0}


def identity_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 1024])],
    )
    return _finish(graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per size and mode")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG")
    args = parser.parse_args()
    data = identity_model()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    load_before = os.getloadavg()
    lines = []
    with tempfile.TemporaryDirectory(prefix="blindfold-bench-") as tmp:
        server = start_server(Path(tmp), "--open-upload", *args.server_arg)
        try:
            client = connect(server.url)
            digest = client.upload_model(data, "identity").sha256
            for label, rows in SIZES.items():
                x = np.random.default_rng(0).random((rows, 1024), dtype=np.float32)
                np.testing.assert_array_equal(client.run_model(digest, x)["y"], x)
                results = interleaved(
                    label,
                    {
                        "in-process": [lambda x=x: session.run(None, {"x": x})],
                        "sdk": [lambda x=x: client.run_model(digest, x)],
                    },
                    args.rounds,
                    warmup=5,
                    max_requests=4000 if rows < 256 else 800,
                    max_seconds=2 * args.seconds,
                )
                local, sdk = results
                added = sdk.p50_ms - local.p50_ms
                rate = x.nbytes / (added / 1e3) / 1e9 if added > 0 else float("inf")
                line = (
                    f"{label:>8}  in-process {local.p50_ms:7.3f} ms  sdk {sdk.p50_ms:7.3f} ms "
                    f"(p99 {sdk.p99_ms:7.3f})  added {added:7.3f} ms  {rate:5.2f} GB/s each way"
                )
                if label in TARGETS_MS:
                    verdict = "PASS" if added <= TARGETS_MS[label] else "MISS"
                    line += f"  {verdict} (target <= {TARGETS_MS[label]} ms)"
                print(line, file=sys.stderr, flush=True)
                lines.append(line)
            client.close()
        finally:
            server.stop()
    print("\n".join(lines))
    print(
        f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
