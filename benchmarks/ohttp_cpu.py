"""CPU per request that the Oblivious HTTP channel adds over pinned TLS, client and server.

    .venv/bin/python benchmarks/ohttp_cpu.py [--rounds 5] [--requests 2000] [--model tiny]

Latency on a shared machine moves with everyone else's load; CPU time per request moves
much less, so this is the figure to judge a change to the channel by (`ohttp.py` measures
the latency itself). Starts a real `blindfold serve --open-upload` process, uploads
overhead.py's "tiny" (or "medium") model, and runs alternating rounds of `--requests`
requests over each channel, one client each, reading the client's CPU
(`time.process_time`) and the server's front process's (user + system from /proc/PID/stat;
Linux only). Prints per-channel medians and the median of the per-round OHTTP - TLS
differences.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import blindfold

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ohttp import _unverified
from overhead import medium_model, tiny_model

from server_process import start_server


def _server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--model", choices=["tiny", "medium"], default="tiny")
    args = parser.parse_args()
    data, x = tiny_model() if args.model == "tiny" else medium_model()
    per_ms = 1000 / args.requests
    client: dict[str, list[float]] = {"tls": [], "ohttp": []}
    server_cpu: dict[str, list[float]] = {"tls": [], "ohttp": []}
    with tempfile.TemporaryDirectory(prefix="blindfold-bench-ohttp-cpu-") as tmp:
        server = start_server(Path(tmp), "--open-upload")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                channels = {
                    "tls": blindfold.connect(server.url, allow_simulation=True),
                    "ohttp": blindfold.connect(
                        server.url, allow_simulation=True, channel="ohttp", verify=_unverified()
                    ),
                }
            digest = channels["tls"].upload_model(data, args.model, public=True).sha256
            for sdk in channels.values():  # warm up both paths
                for _ in range(min(300, args.requests)):
                    sdk.run_model(digest, x)
            for _ in range(args.rounds):
                for name, sdk in channels.items():
                    server_before, client_before = (
                        _server_cpu(server.process.pid),
                        time.process_time(),
                    )
                    for _ in range(args.requests):
                        sdk.run_model(digest, x)
                    client[name].append((time.process_time() - client_before) * per_ms)
                    server_cpu[name].append(
                        (_server_cpu(server.process.pid) - server_before) * per_ms
                    )
        finally:
            server.stop()
    for side, figures in (("client", client), ("server", server_cpu)):
        added = [o - t for o, t in zip(figures["ohttp"], figures["tls"], strict=True)]
        print(
            f"{side} CPU ms per request: tls {statistics.median(figures['tls']):.3f}, "
            f"ohttp {statistics.median(figures['ohttp']):.3f}, "
            f"added {statistics.median(added):.3f}"
        )


if __name__ == "__main__":
    main()
