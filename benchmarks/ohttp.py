"""What the Oblivious HTTP channel adds over pinned TLS, measured in one run.

    .venv/bin/python benchmarks/ohttp.py [--json out.json] [--rounds 5] [--seconds 20]

Starts a real `blindfold serve --open-upload` process (simulation TEE), uploads overhead.py's
"tiny" model ([1,64] x [64,64] MatMul: all overhead) and "medium" CNN (~10 ms of compute),
and measures, in alternating rounds so that load elsewhere biases all alike, one client
each of: in-process onnxruntime; the SDK over pinned TLS (channel="tls"); the SDK with
channel="ohttp" (BHTTP + HPKE + padding on both sides, the gateway's replay check, and the
inner request through the same app). Both SDK modes talk to the server directly, so the
difference is the channel's own cost, not a proxy's.

Targets (printed as PASS/MISS):
  tiny:   ohttp p50 - tls p50 <= 0.3 ms
  medium: ohttp p50 / tls p50 <= 1.05
This is a benchmark, not a test: absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnxruntime as ort

import blindfold

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from overhead import Result, interleaved, medium_model, tiny_model

from server_process import start_server


def _unverified() -> ssl.SSLContext:
    # Straight to the server's self-signed certificate: the evidence authenticates the
    # HPKE key; the outer TLS here only stands in for a proxy's.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = {"tiny": tiny_model(), "medium": medium_model()}
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="blindfold-bench-ohttp-") as tmp:
        server = start_server(Path(tmp), "--open-upload")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tls = blindfold.connect(server.url, allow_simulation=True)
                sealed = blindfold.connect(
                    server.url, allow_simulation=True, channel="ohttp", verify=_unverified()
                )
            for name, (data, x) in models.items():
                digest = tls.upload_model(data, name, public=True).sha256
                session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                feeds = {"x": x}
                modes = {
                    "in-process": [lambda s=session, f=feeds: s.run(None, f)],
                    "sdk tls": [lambda d=digest, v=x: tls.run_model(d, v)],
                    "sdk ohttp": [lambda d=digest, v=x: sealed.run_model(d, v)],
                }
                small = name == "tiny"
                for result in interleaved(
                    name,
                    modes,
                    args.rounds,
                    warmup=50 if small else 5,
                    max_requests=20000 if small else 2000,
                    max_seconds=args.seconds,
                ):
                    results.append(result)
                    print(
                        f"  {result.model:<7} {result.mode:<11} {result.p50_ms:8.3f} ms p50 "
                        f"{result.p99_ms:8.3f} ms p99 ({result.requests} requests)",
                        file=sys.stderr,
                    )
            tls.close()
            sealed.close()
        finally:
            server.stop()
    return {"results": [r.as_json() for r in results]}


def report(data: dict[str, Any]) -> list[str]:
    rows = {(r["model"], r["mode"]): r for r in data["results"]}

    def p50(model: str, mode: str) -> float:
        return float(rows[(model, mode)]["p50_ms"])

    added = p50("tiny", "sdk ohttp") - p50("tiny", "sdk tls")
    ratio = p50("medium", "sdk ohttp") / p50("medium", "sdk tls")
    lines = [
        f"{'PASS' if added <= 0.3 else 'MISS'} tiny: ohttp adds {added:.3f} ms p50 over "
        f"pinned TLS (goal <= 0.3 ms; tls {p50('tiny', 'sdk tls'):.3f} ms, in-process "
        f"{p50('tiny', 'in-process'):.3f} ms)",
        f"{'PASS' if ratio <= 1.05 else 'MISS'} medium: ohttp p50 / tls p50 = {ratio:.3f} "
        f"(goal <= 1.05; tls {p50('medium', 'sdk tls'):.3f} ms, ohttp "
        f"{p50('medium', 'sdk ohttp'):.3f} ms, in-process {p50('medium', 'in-process'):.3f} ms)",
    ]
    for model in ("tiny", "medium"):
        local = p50(model, "in-process")
        lines.append(
            f"     {model}: p50 / in-process: tls {p50(model, 'sdk tls') / local:.2f}, "
            f"ohttp {p50(model, 'sdk ohttp') / local:.2f}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0, help="per model and mode")
    args = parser.parse_args()
    data = run(args)
    for line in report(data):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
