"""Real `blindfold serve` child processes on loopback, for the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def unverified_context() -> ssl.SSLContext:
    """A TLS client context that checks nothing: for reaching a test server without (or
    before) attesting it, as a probe's or an attacker's connection does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A `blindfold serve` child process; `log()` returns what it printed so far."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int | None = None) -> None:
        if self.process.poll() is None:
            if sig is None:
                self.process.terminate()
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    tmp_path: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None
) -> ServerProcess:
    """Starts `python -m blindfold serve --port P ARGS` and waits until it answers."""
    port = port or free_port()
    log_path = tmp_path / f"server-{port}-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "blindfold", "serve", "--port", str(port), *args]
    with log_path.open("wb") as handle:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = ServerProcess(port, process, log_path, list(args))
    context = unverified_context()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(  # noqa: S310 (https to the server it started)
                f"{server.url}/v2/health/live", context=context, timeout=2
            ) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not start within 60 s:\n{server.log()}")


def write_cluster_policy(directory: Path, extra: str = "") -> Path:
    """A cluster policy accepting this checkout's code on the simulation TEE (explicitly,
    as the cluster policy demands), plus `extra` TOML."""
    from blindfold.attestation.simulation import measure_package

    path = directory / f"cluster-{time.monotonic_ns()}.toml"
    path.write_text(
        "[cluster]\nunsafe_allow_simulation = true\n\n"
        f'[simulation]\nmeasurement = ["{measure_package()}"]\n{extra}'
    )
    return path


def start_replica(
    tmp_path: Path, policy: Path, *args: str, join: ServerProcess | str | None = None
) -> ServerProcess:
    """A cluster replica (open upload): the first one without `join`, later ones joining."""
    extra = ["--join", join if isinstance(join, str) else join.url] if join is not None else []
    return start_server(tmp_path, "--open-upload", "--cluster-policy", str(policy), *extra, *args)


def run_replica_expecting_failure(
    tmp_path: Path, policy: Path, join: ServerProcess, *args: str, timeout: float = 60
) -> tuple[int, str]:
    """Runs a joining replica that must exit (refused at join); returns (code, its output)."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "blindfold", "serve", "--port", str(port), "--open-upload"),
        *("--cluster-policy", str(policy), "--join", join.url, *args),
    ]
    result = subprocess.run(command, capture_output=True, timeout=timeout, text=True)
    return result.returncode, result.stdout + result.stderr


@dataclass
class Balancer:
    """HAProxy (Debian package) in front of replicas: round-robin TCP passthrough, so TLS
    ends in the replica and the client pins the replica's key through it."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def debian_tool(executable: str, package: str) -> str:
    """The path of `executable`, installing Debian's `package` with apt-get when it is missing
    (as CI's fresh machine needs: tests start real components themselves); skips the calling
    test, saying why, where that cannot be done (not root, no apt-get, no mirror)."""
    import shutil

    import pytest

    def found() -> str | None:
        return shutil.which(executable) or next(
            (
                str(path)
                for path in (Path("/usr/sbin") / executable, Path("/sbin") / executable)
                if path.exists()
            ),
            None,
        )

    path = found()
    if path is not None:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"needs {executable} (apt-get install -y {package}) and root to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=900, env=env, check=False
        )
        if result.returncode != 0:
            pytest.skip(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    path = found()
    if path is None:
        pytest.skip(f"apt-get installed {package} but {executable} is not on the PATH")
    return path


def start_balancer(tmp_path: Path, backends: list[int]) -> Balancer:
    """Starts `haproxy -db` on a free loopback port; skips the calling test without it."""
    haproxy = debian_tool("haproxy", "haproxy")
    port = free_port()
    servers = "\n".join(
        f"  server r{i} 127.0.0.1:{backend} check inter 500 fall 1 rise 2"
        for i, backend in enumerate(backends)
    )
    config = tmp_path / f"haproxy-{port}.cfg"
    config.write_text(
        "global\n  maxconn 4096\n"
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n"
        "  timeout server 120s\n  retries 3\n  option redispatch\n"
        f"frontend replicas\n  bind 127.0.0.1:{port}\n  default_backend replicas\n"
        f"backend replicas\n  balance roundrobin\n{servers}\n"
    )
    log_path = tmp_path / f"haproxy-{port}.log"
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            [haproxy, "-db", "-f", str(config)], stdout=handle, stderr=subprocess.STDOUT
        )
    balancer = Balancer(port, process, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited: {log_path.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return balancer
        time.sleep(0.05)
    balancer.stop()
    raise RuntimeError("haproxy did not listen within 20 s")


def inferences_served(server: ServerProcess) -> int:
    """`blindfold_inferences_total` from the replica's own /metrics, over every model and
    outcome."""
    context = unverified_context()
    url = f"{server.url}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=5) as answer:  # noqa: S310 (https)
        text = answer.read().decode()
    return sum(
        int(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "blindfold_inferences_total"
    )


def children_of() -> dict[int, list[int]]:
    """Every live process's children, by parent pid (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            ppid = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
            children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (for the server: the fork server and the workers)."""
    children = children_of()
    found, queue = [pid], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def proc_field(pid: int, path: str, name: str) -> int:
    """A `Name: N kB` field of /proc/PID/status or smaps_rollup, in bytes (0 when gone;
    fields without a unit, such as PPid, come multiplied by 1024 too)."""
    try:
        text = Path(f"/proc/{pid}/{path}").read_text()
    except OSError:
        return 0
    line = next((x for x in text.splitlines() if x.startswith(name + ":")), None)
    return int(line.split()[1]) * 1024 if line else 0


def model_workers(front: int) -> set[int]:
    """A server's model workers: the processes below its fork server (its grandchildren)."""
    children = set(process_tree(front)) - {front}
    return {pid for pid in children if proc_field(pid, "status", "PPid") // 1024 != front}


def model_memfds(pid: int | str = "self") -> list[int]:
    """The sizes of the model memfds a process holds (ModelBytesWriter and the store's
    unsealing name them `blindfold-model`): restart copies and models being uploaded."""
    sizes = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry).startswith("/memfd:blindfold-model"):
                sizes.append(entry.stat().st_size)
        except OSError:  # closed meanwhile (the listing's own descriptor, say)
            continue
    return sizes


def kill_worker_of(server: ServerProcess, known: set[int]) -> int:
    """SIGKILLs the one model worker not in `known` (as a crashing runtime would die), and
    waits until the front has noticed (it watches a worker once it has run a request)."""
    (worker,) = model_workers(server.process.pid) - known
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while f"model worker {worker} stopped" not in server.log():  # the front has noticed
        assert time.monotonic() < deadline, "the front did not notice the killed worker"
        time.sleep(0.05)
    return worker


def tree_memory(pid: int) -> int:
    """The proportional set size (PSS) of a process tree, in bytes: pages shared between its
    processes count once. Memory held only in unmapped memfds is not included."""
    return sum(proc_field(p, "smaps_rollup", "Pss") for p in process_tree(pid))


def tree_peak(pid: int) -> int:
    """The sum of each process's peak resident size (VmHWM) over a process tree, in bytes."""
    return sum(proc_field(p, "status", "VmHWM") for p in process_tree(pid))
