"""Blindfold side by side with KServe, the server users would pick instead, in one run.

    .venv/bin/python benchmarks/peers.py [--seconds 4] [--rounds 4] [--no-seed] [--json out.json]
                                         [--kserve-python PATH] [--kserve-logging]
                                         [--only tiny,m5] [--server-arg ARG]...

Starts, on free loopback ports:

* a real `blindfold serve --open-upload` (simulation TEE), driven by the SDK: attested,
  pinned TLS, each model run by hash;
* KServe's `ModelServer` (benchmarks/kserve_server.py: a `kserve.Model` whose `predict` runs
  onnxruntime), plain HTTP, driven by tritonclient's HTTP client with binary tensors, the
  fastest way to talk to it from Python. gRPC and KServe's per-request log lines are off
  (Blindfold writes none by default; --kserve-logging turns KServe's back on); everything else
  is KServe's default.

Both servers run the same onnxruntime version with default session options, and so does the
in-process baseline. Models: "tiny" and "medium" from overhead.py, and two seed models of the
catalogue (examples/models), FaceNet and M5, when the `examples` extra is installed.

For each model: one client (in-process, Blindfold, KServe) and then 8 concurrent clients (8
threads sharing the in-process session; 8 own `blindfold.Client`s; 8 own tritonclient
clients), each comparison in alternating rounds that are pooled, so load from elsewhere on the
machine biases every side alike. Before timing, both servers' outputs are checked against
in-process onnxruntime. Prints per model the p50/p99 of each, the milliseconds each server adds
to in-process p50, the ratios, the throughput with 8 clients, and whether Blindfold is ahead
of KServe on each figure.

KServe comes from the `peers` extra (pyproject.toml). When this interpreter cannot import
kserve, the benchmark installs that extra's requirements, with this run's onnxruntime and
numpy versions, into its own virtual environment under ~/.cache/blindfold/ (kserve's
dependencies would move pinned packages of the server's environment, protobuf among them) and
runs KServe from there.

A benchmark, not a test: absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.http as triton
from tritonclient.utils import np_to_triton_dtype

import blindfold

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))
from overhead import CLIENTS, Result, connect, interleaved, medium_model, tiny_model  # noqa: E402

from server_process import free_port, start_server  # noqa: E402

PEERS_VENV = Path.home() / ".cache" / "blindfold" / "peers-venv"
SEED_MODELS = ["facenet", "m5"]  # scripts in examples/models
KSERVE_START_SECONDS = 180  # importing kserve takes a while on a busy 2-core machine


@dataclass
class Subject:
    """A model to measure: its ONNX bytes and the inputs to run it on, by input name."""

    name: str
    data: bytes
    inputs: dict[str, np.ndarray]
    small: bool  # well under a millisecond: more requests and warm-up calls


def builtin_subjects() -> list[Subject]:
    tiny, x = tiny_model()
    medium, image = medium_model()
    return [Subject("tiny", tiny, {"x": x}, True), Subject("medium", medium, {"x": image}, False)]


def seed_subjects() -> tuple[list[Subject], str | None]:
    """FaceNet and M5 from examples/models, or none and the reason why."""
    sys.path.insert(0, str(ROOT / "examples" / "models"))
    subjects = []
    try:
        import _common

        for script in SEED_MODELS:
            module = importlib.import_module(script)
            example = module.build(_common.parser(None, checkpoint="-").parse_args([]))
            inputs = {key: np.asarray(value) for key, value in example.inputs.items()}
            data = example.model.SerializeToString()
            subjects.append(Subject(script, data, inputs, small=False))
    except ImportError as exc:
        return [], (
            f"skipping the seed models (FaceNet, M5): {exc.name or exc} is not installed; "
            "bin/install-examples installs the `examples` extra they need"
        )
    return subjects, None


# --- KServe in its own process (and, when needed, its own environment) ---


def peer_requirements() -> list[str]:
    """The `peers` extra of pyproject.toml, with onnxruntime and numpy pinned to this run's
    versions so that KServe computes with the same onnxruntime as the other sides."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        extra = tomllib.load(handle)["project"]["optional-dependencies"]["peers"]
    return [*extra, f"onnxruntime=={ort.__version__}", f"numpy=={np.__version__}"]


def ready_kserve_python() -> str | None:
    """An interpreter that can run kserve_server.py without installing anything, or None."""
    if importlib.util.find_spec("kserve") is not None:
        return sys.executable
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".blindfold-peers"
    if python.exists() and stamp.exists() and stamp.read_text() == "\n".join(peer_requirements()):
        return str(python)
    return None


def kserve_python() -> str:
    """ready_kserve_python(), after creating or updating PEERS_VENV when there is none."""
    ready = ready_kserve_python()
    if ready:
        return ready
    requirements = peer_requirements()
    print(f"installing {' '.join(requirements)} into {PEERS_VENV} ...", file=sys.stderr)
    PEERS_VENV.parent.mkdir(parents=True, exist_ok=True)
    # The interpreter this environment was made from, not the environment itself.
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    subprocess.run([str(base), "-m", "venv", str(PEERS_VENV)], check=True)
    python = PEERS_VENV / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
    (PEERS_VENV / ".blindfold-peers").write_text("\n".join(requirements))
    return str(python)


@dataclass
class KServeProcess:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"  # tritonclient takes host:port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def kserve_server(
    python: str, models: dict[str, Path], directory: Path, *, logging: bool = False
) -> Iterator[KServeProcess]:
    """Runs kserve_server.py with `models` (name -> ONNX file) until every model is ready.
    Without `logging`, KServe writes no access and latency lines per request (as Blindfold's
    default); with it, KServe logs as it does out of the box."""
    port = free_port()
    log_path = directory / f"kserve-{port}.log"
    command = [python, str(HERE / "kserve_server.py"), "--http_port", str(port)]
    command += ["--enable_grpc", "false"]
    if not logging:
        command += ["--enable_latency_logging", "false", "--configure_logging", "false"]
    for name, path in models.items():
        command += ["--model", f"{name}={path}"]
    with log_path.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    server = KServeProcess(port, process, log_path)
    try:
        deadline = time.monotonic() + KSERVE_START_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"KServe exited with {process.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"KServe was not ready within {KSERVE_START_SECONDS} s:\n{server.log()}"
                )
            try:
                url = f"http://{server.url}/v2/health/ready"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        yield server
    finally:
        server.stop()


def kserve_version(python: str) -> str:
    command = [python, "-c", "from importlib.metadata import version; print(version('kserve'))"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


class TritonClients:
    """tritonclient HTTP clients to one server, one per thread that uses them.

    tritonclient's HTTP client runs on gevent, whose connections belong to the thread that
    opened them, and overhead.measure starts fresh threads for each round: each thread opens
    its own client on its first (untimed, warm-up) call."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._opened: list[triton.InferenceServerClient] = []
        self._lock = threading.Lock()

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> dict[str, np.ndarray]:
        """One v2 request as a tritonclient user writes it: binary tensors both ways."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = triton.InferenceServerClient(
                self.url, connection_timeout=120.0, network_timeout=120.0
            )
            self._local.client = client
            with self._lock:
                self._opened.append(client)
        tensors = []
        for name, value in inputs.items():
            tensor = triton.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value, binary_data=True)
            tensors.append(tensor)
        requested = [triton.InferRequestedOutput(name, binary_data=True) for name in outputs]
        result = client.infer(model, tensors, outputs=requested)
        return {name: result.as_numpy(name) for name in outputs}

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for client in opened:
            client.close()


# --- the run ---


def check(side: str, model: str, got: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    """Raises unless `side` answered what in-process onnxruntime computes."""
    for name, value in expected.items():
        if name not in got:
            raise AssertionError(f"{side} left output {name!r} of {model} out of its answer")
        np.testing.assert_allclose(
            np.asarray(got[name]), value, rtol=1e-4, atol=1e-5, err_msg=f"{side}, {model}.{name}"
        )


def measure_subject(
    subject: Subject,
    digest: str,
    shared: blindfold.Client,
    own: list[blindfold.Client],
    kserve: TritonClients,
    args: argparse.Namespace,
) -> list[Result]:
    session = ort.InferenceSession(subject.data, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    feeds = subject.inputs
    expected = dict(zip(names, session.run(names, feeds), strict=True))
    check("Blindfold", subject.name, shared.run_model(digest, feeds), expected)
    check("KServe", subject.name, kserve.infer(subject.name, feeds, names), expected)

    def local() -> Any:
        return session.run(names, feeds)

    def sdk(client: blindfold.Client) -> Callable[[], Any]:
        return lambda: client.run_model(digest, feeds)

    def peer() -> Any:
        return kserve.infer(subject.name, feeds, names)

    single = interleaved(
        subject.name,
        {"in-process": [local], "blindfold": [sdk(shared)], "kserve": [peer]},
        args.rounds,
        warmup=100 if subject.small else 5,
        max_requests=20000 if subject.small else 500,
        max_seconds=2 * args.seconds,
    )
    multi = interleaved(
        subject.name,
        {
            f"in-process x{CLIENTS}": [local] * CLIENTS,
            f"blindfold x{CLIENTS}": [sdk(client) for client in own],
            f"kserve x{CLIENTS}": [peer] * CLIENTS,  # a client per thread
        },
        args.rounds,
        warmup=20 if subject.small else 2,
        max_requests=1_000_000,
        max_seconds=args.seconds,
    )
    for result in single + multi:
        print(
            f"  {result.model:<14} {result.mode:<15} {result.p50_ms:9.3f} ms p50 "
            f"{result.p99_ms:9.3f} ms p99 {result.throughput:9.1f}/s ({result.requests} requests)",
            file=sys.stderr,
            flush=True,
        )
    return single + multi


def run(args: argparse.Namespace) -> dict[str, Any]:
    python = args.kserve_python or kserve_python()
    subjects = builtin_subjects()
    skipped = None
    wanted = set(args.only.split(",")) if args.only else None
    if wanted is not None and wanted - {"tiny", "medium", *SEED_MODELS}:
        unknown = ", ".join(sorted(wanted - {"tiny", "medium", *SEED_MODELS}))
        raise SystemExit(
            f"--only: no model named {unknown} (tiny, medium, {', '.join(SEED_MODELS)})"
        )
    if not args.no_seed and (wanted is None or wanted & set(SEED_MODELS)):
        print("building the seed models ...", file=sys.stderr, flush=True)
        seeds, skipped = seed_subjects()
        subjects += seeds
        if skipped:
            print(skipped, flush=True)
    if wanted is not None:
        subjects = [subject for subject in subjects if subject.name in wanted]
    results: list[Result] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="blindfold-peers-") as tmp:
        directory = Path(tmp)
        files = {}
        for subject in subjects:
            files[subject.name] = directory / f"{subject.name}.onnx"
            files[subject.name].write_bytes(subject.data)
        server = start_server(directory, "--open-upload", *args.server_arg)
        try:
            with kserve_server(python, files, directory, logging=args.kserve_logging) as peer:
                shared = connect(server.url)
                own = [connect(server.url) for _ in range(CLIENTS)]
                kserve = TritonClients(peer.url)
                try:
                    for subject in subjects:
                        # Public: the other clients run it by hash (uploads are restricted).
                        digest = shared.upload_model(subject.data, subject.name, public=True)
                        results += measure_subject(
                            subject, f"sha256:{digest.sha256}", shared, own, kserve, args
                        )
                finally:
                    for client in [shared, *own]:
                        client.close()
                    kserve.close()
        finally:
            server.stop()
    return {
        "results": [result.as_json() for result in results],
        "models": [subject.name for subject in subjects],
        "server_args": args.server_arg,
        "kserve_logging": args.kserve_logging,
        "skipped": skipped,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "kserve": kserve_version(python),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
    }


def report(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Prints the table and the verdicts; returns one verdict row per model and figure."""
    rows = [Result(**row) for row in data["results"]]

    def get(model: str, mode: str) -> Result:
        return next(row for row in rows if row.model == model and row.mode == mode)

    print()
    print(
        f"{'':<15}{'in-process':>11} | {'Blindfold (attested TLS)':^35} | "
        f"{'KServe (plain HTTP)':^35} | {f'throughput, {CLIENTS} clients (inf/s)':^29}"
    )
    print(
        f"{'model':<15}{'p50 ms':>11} | {'p50':>7}{'p99':>8}{'added':>8}{'ratio':>7}     | "
        f"{'p50':>7}{'p99':>8}{'added':>8}{'ratio':>7}     | "
        f"{'in-proc':>9}{'Blindfold':>10}{'KServe':>9}"
    )
    verdicts = []
    for model in data["models"]:
        local, ours, theirs = (
            get(model, "in-process"),
            get(model, "blindfold"),
            get(model, "kserve"),
        )
        many = {
            side: get(model, f"{side} x{CLIENTS}") for side in ("in-process", "blindfold", "kserve")
        }
        cells = []
        for side in (ours, theirs):
            added = side.p50_ms - local.p50_ms
            ratio = side.p50_ms / local.p50_ms
            cells.append(f"{side.p50_ms:>7.2f}{side.p99_ms:>8.2f}{added:>8.2f}{ratio:>7.2f}x    ")
        print(
            f"{model:<15}{local.p50_ms:>11.3f} | {cells[0]} | {cells[1]} | "
            f"{many['in-process'].throughput:>9.0f}{many['blindfold'].throughput:>10.0f}"
            f"{many['kserve'].throughput:>9.0f}"
        )
        for figure, mine, peer, lower_is_better in (
            ("p50 ms", ours.p50_ms, theirs.p50_ms, True),
            ("p99 ms", ours.p99_ms, theirs.p99_ms, True),
            (
                f"inf/s, {CLIENTS} clients",
                many["blindfold"].throughput,
                many["kserve"].throughput,
                False,
            ),
        ):
            ahead = mine < peer if lower_is_better else mine > peer
            verdicts.append(
                {
                    "model": model,
                    "figure": figure,
                    "blindfold": mine,
                    "kserve": peer,
                    "ahead": ahead,
                }
            )
    print()
    for verdict in verdicts:
        mark = "PASS" if verdict["ahead"] else "MISS"
        print(
            f"{mark}  {verdict['model']:<14} {verdict['figure']:<20}"
            f" Blindfold {verdict['blindfold']:10.2f}  KServe {verdict['kserve']:10.2f}"
        )
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="time budget of each throughput measurement, twice that for each latency one, "
        "split over the rounds (default 4)",
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds per comparison (default 4)"
    )
    parser.add_argument(
        "--no-seed", action="store_true", help="only the tiny and medium models (no torch needed)"
    )
    parser.add_argument(
        "--kserve-python",
        help="an interpreter with kserve installed (default: this one if it has kserve, else "
        f"{PEERS_VENV}, created on first use)",
    )
    parser.add_argument(
        "--only", help=f"comma-separated models among tiny, medium, {', '.join(SEED_MODELS)}"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `blindfold serve` (repeatable), e.g. --unsafe-no-isolation",
    )
    parser.add_argument(
        "--kserve-logging",
        action="store_true",
        help="let KServe write its default access and latency log lines for every request "
        "(off by default: Blindfold writes none)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"measuring ({os.cpu_count()} CPUs, onnxruntime {ort.__version__}) ...",
        file=sys.stderr,
        flush=True,
    )
    data = run(args)
    data["verdicts"] = report(data)
    data["wall_seconds"] = time.perf_counter() - started
    machine = data["machine"]
    print(
        f"\nKServe {machine['kserve']}, onnxruntime {machine['onnxruntime']}; whole run: "
        f"{data['wall_seconds']:.0f} s; load average before "
        f"{machine['load_average_before'][0]:.2f}, after "
        f"{machine['load_average_after'][0]:.2f} on {machine['cpus']} CPUs "
        "(other work on the machine inflates every figure)"
    )
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
