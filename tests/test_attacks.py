"""Attacks on the attested channel and on model ownership. Each attack must be refused before
any payload (model, tensor, token) leaves the client, and each test checks on the server side
(its access log, or the request lines an attacking proxy saw) that none arrived."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import blindfold
from blindfold.client.attest import fetch_attestation
from blindfold.client.transport import Endpoint, Transport, pinned_context

from conftest import ServerProcess, free_port, start_server
from helpers import connect, write_self_signed
from onnx_models import identity_model
from server_process import unverified_context
from transports import Recording, send

pytestmark = pytest.mark.filterwarnings("ignore:SIMULATION TEE")

PAYLOAD_PATH = re.compile(r"/infer|/load|/unload|/keys|/access")
REQUEST_LINE = re.compile(r'"(GET|POST|PUT|DELETE|HEAD|PATCH) (\S+) HTTP/1\.[01]"')
X = np.arange(6, dtype=np.float32).reshape(2, 3)

Responder = Callable[["AttackProxy", str, str], "tuple[int, bytes] | None"]


# --- an attacking TLS proxy on loopback ---


class AttackProxy:
    """Listens on 127.0.0.1 and relays to the server at `upstream_port`.

    mode "tcp": relays the TLS bytes untouched (an honest load balancer);
    mode "mitm": terminates TLS with its OWN certificate, records every request line, and
    either answers itself (`responder`) or forwards the request to the server over TLS.
    """

    def __init__(
        self,
        directory: Path,
        upstream_port: int,
        mode: str = "mitm",
        responder: Responder | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.responder = responder
        self.cert_path, key_path = write_self_signed(directory)
        self.cert_pem = self.cert_path.read_text()
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(self.cert_path, key_path)
        self.requests: list[str] = []
        self.handshake_failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def seen(self) -> list[str]:
        with self._lock:
            return list(self.requests)

    def fetch_upstream(self, target: str) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.upstream_port, context=unverified_context(), timeout=30
        )
        try:
            connection.request("GET", target)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    # --- plumbing ---

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
        return sock

    def drop_connections(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(30)
            self._track(sock)
            if self.mode == "tcp":
                self._spawn(self._relay_tcp, sock)
            else:
                self._spawn(self._serve_mitm, sock)

    def _relay_tcp(self, client: socket.socket) -> None:
        try:
            upstream = self._track(socket.create_connection(("127.0.0.1", self.upstream_port), 10))
        except OSError:
            client.close()
            return

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while True:
                    data = source.recv(65536)
                    if not data:
                        break
                    sink.sendall(data)
            except OSError:
                pass
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        self._spawn(pump, upstream, client)
        pump(client, upstream)

    def _serve_mitm(self, raw: socket.socket) -> None:
        try:
            tls = self._tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            with self._lock:
                self.handshake_failures += 1
            raw.close()
            return
        self._track(tls)
        try:
            reader = tls.makefile("rb")
            while not self._stop.is_set():
                line = reader.readline(65536)
                if not line.strip():
                    break
                request_line = line.decode("latin-1").strip()
                headers: dict[str, str] = {}
                while True:
                    header = reader.readline(65536)
                    if header in (b"\r\n", b"\n", b""):
                        break
                    key, _, value = header.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                with self._lock:
                    self.requests.append(request_line)
                body = reader.read(int(headers.get("content-length", "0") or 0))
                method, target, _ = request_line.split(" ", 2)
                answer = self.responder(self, method, target) if self.responder else None
                if answer is None:
                    answer = self._forward(method, target, headers, body)
                status, payload = answer
                tls.sendall(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
        except (OSError, ValueError):
            pass
        finally:
            tls.close()

    def _forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.upstream_port, context=unverified_context(), timeout=30
        )
        skip = {"host", "connection", "content-length", "transfer-encoding"}
        try:
            connection.request(
                method, target, body or None, {k: v for k, v in headers.items() if k not in skip}
            )
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self.drop_connections()
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., AttackProxy]]:
    proxies: list[AttackProxy] = []

    def make(
        upstream_port: int, mode: str = "mitm", responder: Responder | None = None
    ) -> AttackProxy:
        proxy = AttackProxy(tmp_path, upstream_port, mode, responder)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


# --- the victim server, with an access log to see what reached it ---


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("victim"), "--open-upload", "--access-log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def victim_model(victim: ServerProcess) -> str:
    with connect(victim.url, policy=policy_of(victim)) as client:
        client.upload_model(identity_model(TensorProto.FLOAT), name="victim-model")
    return "victim-model"


def measurement_of(server: ServerProcess) -> str:
    """The measurement the server printed at start (the tree may change while tests run)."""
    found = re.search(r"measurement: ([0-9a-f]{64})", server.log())
    assert found, server.log()
    return found.group(1)


def policy_of(server: ServerProcess) -> blindfold.Policy:
    return blindfold.Policy.simulation(measurement_of(server))


def requests_in(log: str) -> list[str]:
    return [f"{method} {path}" for method, path in REQUEST_LINE.findall(log)]


class LogWatch:
    """The request lines the server's access log shows after this point."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.mark = len(server.log())

    def lines(self, expect_attestation: bool = True) -> list[str]:
        deadline = time.monotonic() + 5
        while True:
            lines = requests_in(self.server.log()[self.mark :])
            if not expect_attestation or any("/v2/attestation" in x for x in lines):
                return lines
            if time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


def assert_no_payload(lines: list[str]) -> None:
    payload = [line for line in lines if PAYLOAD_PATH.search(line)]
    assert not payload, f"payload requests reached the server: {payload}"


def attempt_payload(url: str, **kwargs: Any) -> None:
    """What a victim would do: connect, then upload and run. Connecting must fail."""
    client = connect(url, **kwargs)
    with client:
        client.upload_model(identity_model(TensorProto.FLOAT), name="leaked")
        client.run_model("victim-model", X)


# --- a. wrong measurement ---


def test_wrong_measurement(victim: ServerProcess, victim_model: str) -> None:
    watch = LogWatch(victim)
    with pytest.raises(blindfold.MeasurementMismatch) as failure:
        attempt_payload(victim.url, policy=blindfold.Policy.simulation("00" * 32))
    message = str(failure.value)
    assert "00" * 32 in message and measurement_of(victim) in message
    assert "expected" in message and "found" in message
    lines = watch.lines()
    assert any(line.startswith("GET /v2/attestation") for line in lines)
    assert_no_payload(lines)

    policy = blindfold.Policy.from_dict({"simulation": {"measurement": ["ab" * 32, "cd" * 32]}})
    with pytest.raises(blindfold.MeasurementMismatch):
        attempt_payload(victim.url, policy=policy)
    assert_no_payload(watch.lines())


# --- b. a TLS proxy with its own certificate that forwards everything ---


def test_mitm_proxy_forwarding_attestation(
    victim: ServerProcess, victim_model: str, make_proxy: Callable[..., AttackProxy]
) -> None:
    proxy = make_proxy(victim.port)
    watch = LogWatch(victim)
    with pytest.raises((blindfold.PinnedKeyMismatch, blindfold.ReportDataMismatch)):
        attempt_payload(proxy.url, policy=policy_of(victim))
    seen = proxy.seen()
    assert seen and all(line.startswith("GET /v2/attestation") for line in seen), seen
    assert_no_payload(watch.lines())


# --- c. evidence bound to another key ---


def test_evidence_binding_the_real_key_with_the_proxy_certificate(
    victim: ServerProcess, victim_model: str, make_proxy: Callable[..., AttackProxy]
) -> None:
    def swap_certificate(proxy: AttackProxy, method: str, target: str) -> tuple[int, bytes]:
        if not target.startswith("/v2/attestation"):
            return 500, b'{"error": "attacker saw a payload request"}'
        status, body = proxy.fetch_upstream(target)  # fresh evidence for the client's nonce
        document = json.loads(body)
        document["certificate"] = proxy.cert_pem
        return status, json.dumps(document).encode()

    proxy = make_proxy(victim.port, responder=swap_certificate)
    watch = LogWatch(victim)
    with pytest.raises(blindfold.ReportDataMismatch) as failure:
        attempt_payload(proxy.url, policy=policy_of(victim))
    assert "another public key" in str(failure.value)
    assert all(line.startswith("GET /v2/attestation") for line in proxy.seen())
    assert_no_payload(watch.lines())


def test_unmodified_evidence_relayed_over_the_proxy_tls(
    victim: ServerProcess, victim_model: str, make_proxy: Callable[..., AttackProxy]
) -> None:
    def relay(proxy: AttackProxy, method: str, target: str) -> tuple[int, bytes]:
        if not target.startswith("/v2/attestation"):
            return 500, b'{"error": "attacker saw a payload request"}'
        return proxy.fetch_upstream(target)

    proxy = make_proxy(victim.port, responder=relay)
    watch = LogWatch(victim)
    with pytest.raises(blindfold.PinnedKeyMismatch) as failure:
        attempt_payload(proxy.url, policy=policy_of(victim))
    assert "proxy" in str(failure.value)
    assert all(line.startswith("GET /v2/attestation") for line in proxy.seen())
    assert_no_payload(watch.lines())


# --- d. replayed evidence ---


def test_replayed_evidence_is_refused(
    victim: ServerProcess, victim_model: str, make_proxy: Callable[..., AttackProxy]
) -> None:
    cache: dict[str, tuple[int, bytes]] = {}

    def replay(proxy: AttackProxy, method: str, target: str) -> tuple[int, bytes]:
        if not target.startswith("/v2/attestation"):
            return 500, b'{"error": "attacker saw a payload request"}'
        if "answer" not in cache:
            cache["answer"] = proxy.fetch_upstream(target)
        return cache["answer"]

    proxy = make_proxy(victim.port, responder=replay)
    # The attacker harvested evidence earlier, for some nonce of its choosing.
    document, _ = fetch_attestation(Endpoint("127.0.0.1", proxy.port), secrets.token_bytes(32))
    assert document["kind"] == "simulation"
    watch = LogWatch(victim)
    for _ in range(2):
        with pytest.raises(blindfold.ReportDataMismatch) as failure:
            attempt_payload(proxy.url, policy=policy_of(victim))
        assert "nonce" in str(failure.value) and "replayed" in str(failure.value)
    assert all(line.startswith("GET /v2/attestation") for line in proxy.seen())
    lines = watch.lines(expect_attestation=False)
    assert not any(line.startswith("GET /v2/attestation") for line in lines), lines
    assert_no_payload(lines)


def test_standing_evidence_is_not_fresh(
    victim: ServerProcess, victim_model: str, make_proxy: Callable[..., AttackProxy]
) -> None:
    """A proxy that strips the client's nonce gets evidence without freshness: refused."""

    def strip_nonce(proxy: AttackProxy, method: str, target: str) -> tuple[int, bytes]:
        if not target.startswith("/v2/attestation"):
            return 500, b'{"error": "attacker saw a payload request"}'
        return proxy.fetch_upstream("/v2/attestation")

    proxy = make_proxy(victim.port, responder=strip_nonce)
    with pytest.raises(blindfold.ReportDataMismatch, match="nonce"):
        attempt_payload(proxy.url, policy=policy_of(victim))
    assert all(line.startswith("GET /v2/attestation") for line in proxy.seen())


# --- e. simulation evidence without opting in ---


def test_simulation_refused_without_opt_in(victim: ServerProcess, victim_model: str) -> None:
    watch = LogWatch(victim)
    with pytest.raises(blindfold.SimulationNotAllowed) as failure:
        attempt_payload(victim.url, policy=policy_of(victim), allow_simulation=False)
    assert "allow_simulation" in str(failure.value)
    lines = watch.lines()
    assert any(line.startswith("GET /v2/attestation") for line in lines)
    assert_no_payload(lines)


def test_cli_attest_refuses_simulation_without_flag(
    victim: ServerProcess, victim_model: str, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_of(victim).to_toml())

    def attest(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "blindfold",
                "attest",
                victim.url,
                "--policy",
                str(policy),
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = attest()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "simulation" in refused.stderr.lower()
    assert '"verified": true' not in refused.stdout
    accepted = attest("--allow-simulation")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["verified"] is True


# --- f. tampered evidence ---


def test_tampered_simulation_evidence(
    victim: ServerProcess, victim_model: str, make_proxy: Callable[..., AttackProxy]
) -> None:
    def tamper(proxy: AttackProxy, method: str, target: str) -> tuple[int, bytes]:
        if not target.startswith("/v2/attestation"):
            return 500, b'{"error": "attacker saw a payload request"}'
        status, body = proxy.fetch_upstream(target)
        document = json.loads(body)
        evidence = json.loads(base64.b64decode(document["evidence"]))
        measurement = evidence["measurement"]
        flipped = format(int(measurement[:2], 16) ^ 0x01, "02x")
        evidence["measurement"] = flipped + measurement[2:]  # signature kept as it was
        document["evidence"] = base64.b64encode(json.dumps(evidence).encode()).decode()
        return status, json.dumps(document).encode()

    proxy = make_proxy(victim.port, responder=tamper)
    watch = LogWatch(victim)
    with pytest.raises(blindfold.EvidenceError, match="signature"):
        attempt_payload(
            proxy.url,
            policy=blindfold.Policy.from_dict(
                {"simulation": {"unsafe_accept_any_measurement": True}}
            ),
        )
    with pytest.raises(blindfold.EvidenceError):
        attempt_payload(proxy.url, policy=policy_of(victim))
    assert all(line.startswith("GET /v2/attestation") for line in proxy.seen())
    assert_no_payload(watch.lines())


# --- g. the pinned key changes mid-session ---


def operator_key(directory: Path) -> tuple[Path, str]:
    """A fresh operator key file (made by the CLI, as an operator would) and its key id."""
    path = directory / f"operator-{secrets.token_hex(4)}.key"
    from blindfold.cli import main

    assert main(["deployment", "keygen", "--out", str(path)]) == 0
    from blindfold.attestation.deployment import load_operator_private_key, operator_key_id

    return path, operator_key_id(load_operator_private_key(path).public_key())


def endorse(server: ServerProcess, key: Path, name: str) -> None:
    """What the operator runs after each start: attest the server, endorse its new key."""
    from blindfold.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = ["deployment", "endorse", server.url, "--allow-simulation"]
        assert main([*argv, "--operator-key", str(key), "--name", name]) == 0


def pinned_policy(server: ServerProcess, **deployment: object) -> blindfold.Policy:
    return blindfold.Policy.from_dict(
        {"simulation": {"measurement": measurement_of(server)}, "deployment": deployment}
    )


# Each scenario: (flags of the first server, flags of the second, policy's [deployment]).
# The second server is a genuine instance of the same build that the attacker controls or
# that merely belongs to another deployment.
REROUTES = {
    "no-deployment-identity": ([], [], None),
    "other-deployment-id": (["--deployment-id", "prod"], ["--deployment-id", "staging"], None),
    "deployment-id-pinned": (
        ["--deployment-id", "prod"],
        [],
        {"simulation_deployment_id": "prod"},
    ),
    "endorsed-first-server-only": ("endorse:prod", [], None),
    "attacker-endorsed-same-name": ("endorse:prod", "attacker:prod", None),
    "operator-key-pinned": ("endorse:prod", "attacker:prod", {"operator_keys": "OPERATOR"}),
}


def _start_deployment(
    tmp_path: Path, flags: object, operator: Path, attacker: Path, *extra: str
) -> ServerProcess:
    if isinstance(flags, list):
        return start_server(tmp_path, "--open-upload", *flags, *extra)
    server = start_server(tmp_path, "--open-upload", *extra)
    who, _, name = str(flags).partition(":")
    endorse(server, operator if who == "endorse" else attacker, name)
    return server


@pytest.mark.parametrize("scenario", list(REROUTES))
def test_rerouted_to_another_genuine_instance_sends_nothing(
    scenario: str, tmp_path: Path, make_proxy: Callable[..., AttackProxy]
) -> None:
    """A network attacker re-routes a connected client to another genuine instance of the
    same build: the next upload must raise DeploymentChanged, and no byte of it may reach
    the other instance."""
    first_flags, second_flags, deployment = REROUTES[scenario]
    operator, operator_id = operator_key(tmp_path)
    attacker, _ = operator_key(tmp_path)
    first = _start_deployment(tmp_path, first_flags, operator, attacker)
    second = _start_deployment(tmp_path, second_flags, operator, attacker, "--access-log")
    try:
        proxy = make_proxy(first.port, mode="tcp")  # the network, honest at first
        if deployment is None:
            policy = policy_of(first)
        else:
            pins = {k: operator_id if v == "OPERATOR" else v for k, v in deployment.items()}
            policy = pinned_policy(first, **pins)
        with connect(proxy.url, policy=policy) as client:
            client.upload_model(identity_model(TensorProto.FLOAT), name="first")
            np.testing.assert_array_equal(client.run_model("first", X)["y"], X)
            attested = client.attestation
            if measurement_of(second) != measurement_of(first):
                pytest.skip("the source tree changed between the two server starts")
            proxy.upstream_port = second.port  # the attacker re-routes the connection
            proxy.drop_connections()
            watch = LogWatch(second)
            secret_model = identity_model(TensorProto.FLOAT)
            with pytest.raises(blindfold.DeploymentChanged) as failure:
                client.upload_model(secret_model, name="secret")
            with pytest.raises(blindfold.DeploymentChanged):
                client.run_model("first", X)
            assert "Nothing was sent" in str(failure.value)
            assert failure.value.previous is attested
            assert client.attestation is attested  # still pinned to the first server
        assert_no_payload(watch.lines())
        assert "secret" not in second.log()
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("accept", [False, True])
def test_deployment_change_callback_decides(
    accept: bool, tmp_path: Path, make_proxy: Callable[..., AttackProxy]
) -> None:
    first = start_server(tmp_path, "--open-upload")
    second = start_server(tmp_path, "--open-upload", "--access-log")
    try:
        seen: list[tuple[bytes, bytes]] = []

        def decide(previous: object, current: object) -> bool:
            seen.append((previous.spki_sha256, current.spki_sha256))  # type: ignore[attr-defined]
            return accept

        proxy = make_proxy(first.port, mode="tcp")
        recording = Recording()
        with connect(
            proxy.url, policy=policy_of(first), on_deployment_change=decide, transport=recording
        ) as client:
            mine = client.upload_model(identity_model(TensorProto.FLOAT), name="mine")
            before = client.attestation.spki_sha256
            sent_before = len(recording.requests())
            proxy.upstream_port = second.port
            proxy.drop_connections()
            watch = LogWatch(second)
            if accept:
                client.upload_model(identity_model(TensorProto.FLOAT), name="accepted")
                assert client.attestation.spki_sha256 != before
                # The first deployment's owner token is not offered to the second one, not
                # even for the model it was issued for.
                with pytest.raises(blindfold.ServerError):
                    client.delete_model("mine")
                assert len(recording.attested) == 2
                after = recording.requests()[sent_before:]
                assert after and "/v2/repository/models/mine/unload" in [r.path for r in after]
                assert mine.owner_token
                assert not any(mine.owner_token in str(r.headers) for r in after)
            else:
                with pytest.raises(blindfold.DeploymentChanged, match="refused"):
                    client.upload_model(identity_model(TensorProto.FLOAT), name="refused")
        assert len(seen) == 1 and seen[0][0] == before and seen[0][1] != before
        lines = watch.lines()
        if accept:
            assert "POST /v2/repository/models/accepted/load" in lines
        else:
            assert_no_payload(lines)
    finally:
        first.stop()
        second.stop()


def _restart_on_same_port(
    tmp_path: Path, *flags: str
) -> tuple[ServerProcess, Callable[[], ServerProcess]]:
    port = free_port()
    first = start_server(tmp_path, "--open-upload", *flags, port=port)

    def restart() -> ServerProcess:
        first.stop()
        second = start_server(tmp_path, "--open-upload", "--access-log", *flags, port=port)
        if measurement_of(second) != measurement_of(first):
            second.stop()
            pytest.skip("the source tree changed between the two server starts")
        return second

    return first, restart


def _use_after_restart(client: blindfold.Client, before: object) -> None:
    # The new server lost the model (memory only): re-attested, then a clean 404.
    with pytest.raises(blindfold.NotFoundError):
        client.run_model("restart", X)
    after = client.attestation
    assert after.spki_sha256 != before.spki_sha256  # type: ignore[attr-defined]
    assert after.verdict.measurements == before.verdict.measurements  # type: ignore[attr-defined]
    client.upload_model(identity_model(TensorProto.FLOAT), name="restart")
    np.testing.assert_array_equal(client.run_model("restart", X)["y"], X)


@pytest.mark.parametrize("pinned", [False, True])
def test_same_deployment_id_restart_is_reattested_transparently(
    pinned: bool, tmp_path: Path
) -> None:
    first, restart = _restart_on_same_port(tmp_path, "--deployment-id", "prod")
    try:
        policy = (
            pinned_policy(first, simulation_deployment_id="prod") if pinned else policy_of(first)
        )
        client = connect(first.url, policy=policy)
        client.upload_model(identity_model(TensorProto.FLOAT), name="restart")
        before = client.attestation
    finally:
        second = restart()
    try:
        with client:
            _use_after_restart(client, before)
        lines = requests_in(second.log())
        assert any(line.startswith("GET /v2/attestation?nonce=") for line in lines)
    finally:
        second.stop()


def test_endorsed_restart_is_followed_once_the_operator_endorses_it(tmp_path: Path) -> None:
    operator, operator_id = operator_key(tmp_path)
    first, restart = _restart_on_same_port(tmp_path)
    try:
        endorse(first, operator, "prod")
        policy = pinned_policy(first, operator_keys=[operator_id], names=["prod"])
        client = connect(first.url, policy=policy)
        assert client.attestation.deployment.operator == (operator_id, "prod")
        client.upload_model(identity_model(TensorProto.FLOAT), name="restart")
        before = client.attestation
    finally:
        second = restart()
    try:
        with client:
            watch = LogWatch(second)
            # Until the operator endorses the new key, it is not provably the deployment.
            with pytest.raises(blindfold.DeploymentChanged, match="not endorsed this server"):
                client.upload_model(identity_model(TensorProto.FLOAT), name="early")
            assert_no_payload(watch.lines())
            endorse(second, operator, "prod")
            _use_after_restart(client, before)
    finally:
        second.stop()


def test_follow_key_changes_same_code_is_the_old_behaviour(tmp_path: Path) -> None:
    first, restart = _restart_on_same_port(tmp_path)
    try:
        client = connect(first.url, policy=policy_of(first), follow_key_changes="same-code")
        client.upload_model(identity_model(TensorProto.FLOAT), name="restart")
        before = client.attestation
    finally:
        second = restart()
    try:
        with client:
            _use_after_restart(client, before)
    finally:
        second.stop()


def test_endorsements_cannot_be_forged_copied_or_taken_over(tmp_path: Path) -> None:
    from blindfold.attestation.deployment import Endorsement, load_operator_private_key

    operator, _ = operator_key(tmp_path)
    attacker, _ = operator_key(tmp_path)
    server = start_server(tmp_path, "--open-upload")
    other = start_server(tmp_path, "--open-upload")
    try:
        with connect(server.url, policy=policy_of(server)) as client:
            key = load_operator_private_key(operator)
            mine = client.attestation.spki_sha256
            # An endorsement of another server's key is refused (copied from elsewhere).
            with connect(other.url, policy=policy_of(other)) as elsewhere:
                copied = Endorsement.sign(key, "prod", elsewhere.attestation.spki_sha256)

            def endorse(body: bytes) -> tuple[int, str]:
                response = send(client, "POST", "/v2/deployment/endorsement", body)
                return response.status, json.loads(response.body).get("error", "")

            status, error = endorse(json.dumps(copied.to_json()).encode())
            assert status == 400 and "copied from another server" in error
            # A tampered one does not verify.
            forged = Endorsement.sign(key, "prod", mine).to_json() | {"deployment": "other"}
            status, error = endorse(json.dumps(forged).encode())
            assert status == 400 and "does not verify" in error
            for junk in (b"not json", b"[" * 60_000, b"[]", b'{"format": 1}'):
                status, error = endorse(junk)
                assert status == 400 and "blindfold deployment endorse" in error
            client.endorse_deployment(key, "prod")
            # Another operator cannot replace the first one's endorsement.
            with pytest.raises(blindfold.ServerError, match="already endorsed") as e:
                client.endorse_deployment(load_operator_private_key(attacker), "prod")
            assert e.value.status == 409
        with connect(server.url, policy=policy_of(server)) as client:
            assert client.attestation.deployment.operator is not None
            assert client.attestation.deployment.operator[1] == "prod"
    finally:
        server.stop()
        other.stop()


def test_server_accepts_only_named_operator_keys(tmp_path: Path) -> None:
    operator, operator_id = operator_key(tmp_path)
    attacker, _ = operator_key(tmp_path)
    public = operator.with_name(operator.name + ".pub")
    server = start_server(tmp_path, "--open-upload", "--deployment-operator-key", str(public))
    try:
        from blindfold.attestation.deployment import load_operator_private_key

        # A client pinning the operator refuses the server until the operator endorsed it.
        with pytest.raises(blindfold.PolicyError, match="operator endorsement"):
            connect(server.url, policy=pinned_policy(server, operator_keys=operator_id))
        with connect(server.url, policy=policy_of(server)) as client:
            with pytest.raises(blindfold.AuthenticationError, match="may not endorse"):
                client.endorse_deployment(load_operator_private_key(attacker), "prod")
            endorsement = client.endorse_deployment(load_operator_private_key(operator), "prod")
            assert endorsement.operator_key_id == operator_id
        pinned = pinned_policy(server, operator_keys=operator_id)
        with connect(server.url, policy=pinned) as client:
            assert client.attestation.deployment.operator == (operator_id, "prod")
    finally:
        server.stop()


def test_key_change_to_an_unattested_certificate_fails_closed(
    tmp_path: Path, make_proxy: Callable[..., AttackProxy]
) -> None:
    server = start_server(tmp_path, "--open-upload", "--access-log")
    try:
        proxy = make_proxy(server.port, mode="tcp")  # an honest load balancer, at first
        client = connect(proxy.url, policy=policy_of(server))
        with client:
            owner = client.upload_model(identity_model(TensorProto.FLOAT), name="pinned")
            np.testing.assert_array_equal(client.run_model("pinned", X)["y"], X)
            pinned = client.attestation.spki_sha256
            # Now the balancer terminates TLS with its own certificate.
            proxy.mode = "mitm"
            proxy.drop_connections()
            watch = LogWatch(server)
            with pytest.raises(blindfold.AttestationError):
                client.run_model("pinned", X)
            with pytest.raises(blindfold.AttestationError):
                client.delete_model("pinned", token=owner.owner_token)
            assert client.attestation.spki_sha256 == pinned
        seen = proxy.seen()
        assert seen and all(line.startswith("GET /v2/attestation") for line in seen), seen
        assert_no_payload(watch.lines())
        assert str(owner.owner_token) not in server.log()
    finally:
        server.stop()


def test_a_loopback_peer_cannot_choose_the_client_address_the_logs_show(
    victim: ServerProcess,
) -> None:
    """A local process (a relay, a sidecar, anything on the host's loopback) sends
    X-Forwarded-For and X-Forwarded-Proto: the access log must still name the TCP peer.
    uvicorn's default trusted these headers from 127.0.0.1, so the logs named whatever
    address such a process chose."""
    spoofed = "203.0.113.77"
    watch = LogWatch(victim)
    connection = http.client.HTTPSConnection(
        "127.0.0.1", victim.port, context=unverified_context(), timeout=10
    )
    try:
        connection.request(
            "GET",
            "/v2/health/live",
            headers={"X-Forwarded-For": spoofed, "X-Forwarded-Proto": "http"},
        )
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    deadline = time.monotonic() + 5
    while not any("/v2/health/live" in line for line in watch.lines(expect_attestation=False)):
        assert time.monotonic() < deadline, victim.log()[watch.mark :]
        time.sleep(0.05)
    logged = victim.log()[watch.mark :]
    assert spoofed not in logged
    assert "127.0.0.1" in logged


# --- h. model ownership ---


UPLOAD_KEY_A = "upload-key-alice-" + "a" * 16
UPLOAD_KEY_B = "upload-key-bob-" + "b" * 16


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("keyed")
    key_file = directory / "keys.txt"
    key_file.write_text(f"# upload keys\n{UPLOAD_KEY_A}\n{UPLOAD_KEY_B}\n")
    process = start_server(directory, "--upload-key-file", str(key_file), "--access-log")
    yield process
    process.stop()


def test_owner_token_of_another_model_has_no_rights(keyed: ServerProcess) -> None:
    model_a = identity_model(TensorProto.FLOAT, name="alice")
    model_b = identity_model(TensorProto.FLOAT, ["N", 4], name="bob")
    with connect(keyed.url, policy=policy_of(keyed)) as client:
        a = client.upload_model(model_a, name="model-a", public=False, token=UPLOAD_KEY_A)
        b = client.upload_model(model_b, name="model-b", public=False, token=UPLOAD_KEY_B)
        assert a.owner_token and b.owner_token and a.owner_token != b.owner_token
        _, run_key_b = client.create_run_key("model-b", token=b.owner_token)
        key_id_a, run_key_a = client.create_run_key("model-a", token=a.owner_token)

        def index_of_a() -> list[dict[str, object]]:  # restricted: listed for its owner
            response = send(client, "POST", "/v2/repository/index", b"{}", token=a.owner_token)
            assert response.status == 200, response.body
            rows: list[dict[str, object]] = json.loads(response.body)
            return rows

        index_before = index_of_a()

        foreign: dict[str, Callable[[str | None], object]] = {
            "unload": lambda t: client.delete_model("model-a", token=t),
            "replace": lambda t: client.upload_model(model_b, name="model-a", token=t),
            "access": lambda t: client.set_public("model-a", True, token=t),
            "create key": lambda t: client.create_run_key("model-a", token=t),
            "revoke key": lambda t: client.revoke_run_key("model-a", key_id_a, token=t),
        }
        token: str | None
        for action, call in foreign.items():
            for token, status in (
                (b.owner_token, 403),
                (run_key_a, 403),
                (UPLOAD_KEY_A, 403),
                ("", 401),
            ):
                with pytest.raises(blindfold.AuthenticationError) as failure:
                    call(token)
                assert failure.value.status == status, (action, status, failure.value)

        # a run key (or the owner token) of model b cannot run restricted model a, by name
        # or by hash: for them it does not exist (404, as a missing model). (Client-level
        # tokens: run_model(token=...) does not send the token with its metadata request.)
        for token in (run_key_b, b.owner_token, None):
            with connect(keyed.url, policy=policy_of(keyed), token=token) as other:
                for reference in ("model-a", f"sha256:{a.sha256}"):
                    with pytest.raises(blindfold.NotFoundError):
                        other.run_model(reference, X)
                    path = f"/v2/models/{reference}/infer"
                    assert send(other, "POST", path, b"{}", token=token).status == 404

        # nothing changed: model a still runs for its owner and its run key
        assert index_of_a() == index_before
        entry = next(e for e in index_of_a() if e["name"] == "model-a")
        assert (entry["sha256"], entry["version"], entry["public"]) == (a.sha256, "1", False)
        for token in (a.owner_token, run_key_a):
            with connect(keyed.url, policy=policy_of(keyed), token=token) as allowed:
                np.testing.assert_array_equal(allowed.run_model("model-a", X)["y"], X)
                np.testing.assert_array_equal(allowed.run_model(a.sha256, X)["y"], X)

        # uploads: no key -> 401, wrong key (or an owner token) -> 403
        for token, status in (("", 401), ("not-an-upload-key", 403), (a.owner_token, 403)):
            with pytest.raises(blindfold.AuthenticationError) as failure:
                client.upload_model(model_b, name="model-c", token=token)
            assert failure.value.status == status
        assert "model-c" not in {e["name"] for e in client.list_models()}

        # the rightful owner can do all of it
        client.set_public("model-a", True, token=a.owner_token)
        client.revoke_run_key("model-a", key_id_a, token=a.owner_token)
        client.delete_model("model-a", token=a.owner_token)
        client.delete_model("model-b", token=b.owner_token)

    log = keyed.log()
    for secret in (a.owner_token, b.owner_token, run_key_a, run_key_b, UPLOAD_KEY_A, UPLOAD_KEY_B):
        assert secret not in log


def test_new_uploads_are_restricted_by_default(keyed: ServerProcess) -> None:
    """A model is private to its owner unless they opt into public; the uploading Client
    remembers the owner token and uses it without being told."""
    model = identity_model(TensorProto.FLOAT, name="restricted-default")
    with connect(keyed.url, policy=policy_of(keyed), token=UPLOAD_KEY_A) as owner:
        uploaded = owner.upload_model(model, name="restricted-default")
        assert uploaded.public is False
        for reference in ("restricted-default", f"sha256:{uploaded.sha256}", uploaded.sha256):
            np.testing.assert_array_equal(owner.run_model(reference, X)["y"], X)
        key_id, run_key = owner.create_run_key("restricted-default")
        with connect(keyed.url, policy=policy_of(keyed)) as stranger:
            for reference in ("restricted-default", f"sha256:{uploaded.sha256}"):
                with pytest.raises((blindfold.NotFoundError, blindfold.AuthenticationError)):
                    stranger.run_model(reference, X)
            # Replacing keeps the rule; the owner opts into public explicitly.
            owner.upload_model(model, name="restricted-default")
            with pytest.raises((blindfold.NotFoundError, blindfold.AuthenticationError)):
                stranger.run_model("restricted-default", X)
            opted = owner.upload_model(model, name="public-opt-in", public=True)
            assert opted.public is True
            np.testing.assert_array_equal(stranger.run_model("public-opt-in", X)["y"], X)
        with connect(keyed.url, policy=policy_of(keyed), token=run_key) as user:
            np.testing.assert_array_equal(user.run_model("restricted-default", X)["y"], X)
        owner.revoke_run_key("restricted-default", key_id)
        owner.delete_model("restricted-default")
        owner.delete_model("public-opt-in")


# --- i. CA environment variables do not widen what the SDK trusts ---


def test_ca_environment_variables_are_ignored(
    victim: ServerProcess,
    victim_model: str,
    make_proxy: Callable[..., AttackProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = make_proxy(victim.port)
    for variable in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(variable, str(proxy.cert_path))
    monkeypatch.setenv("SSL_CERT_DIR", str(proxy.cert_path.parent))
    # Sanity: a default-trust client would now accept the proxy.
    default = ssl.create_default_context()
    default.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", proxy.port), 10) as raw,
        default.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass
    watch = LogWatch(victim)
    with pytest.raises(blindfold.PinnedKeyMismatch):
        attempt_payload(proxy.url, policy=policy_of(victim))

    # And after attesting the real server, the pinned channel does not trust the proxy.
    def via_proxy(attested: blindfold.AttestedServer, _: object) -> Transport:
        """The attested server's pin, but connections go to the proxy."""
        context = pinned_context(attested.certificate_pem)
        return Transport(Endpoint("127.0.0.1", proxy.port), context, attested.spki_sha256)

    with (
        connect(victim.url, policy=policy_of(victim), transport=via_proxy) as client,
        pytest.raises(blindfold.AttestationError),
    ):
        client.run_model(victim_model, X)
    assert all(line.startswith("GET /v2/attestation") for line in proxy.seen())
    assert_no_payload(watch.lines())


# --- j. a model that reads the server's files through external data ---


def _external_tensor(name: str, location: str, size: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[size])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _external_sparse(location: str, size: int) -> onnx.SparseTensorProto:
    sparse = onnx.SparseTensorProto(dims=[size])
    sparse.values.CopyFrom(_external_tensor("leak_values", location, size))
    sparse.indices.CopyFrom(helper.make_tensor("leak_i", TensorProto.INT64, [size], range(size)))
    return sparse


def _file_reading_models(location: str, size: int) -> dict[str, onnx.ModelProto]:
    """y = x + (bytes of `location`), with the file reference hidden where a check of graph
    initializers and top-level Constant nodes does not look."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [size])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [size])
    opsets = [helper.make_opsetid("", 17)]

    # A Constant inside a model-local function.
    function = helper.make_function(
        "local.fn",
        "Leak",
        ["a"],
        ["b"],
        [
            helper.make_node("Constant", [], ["c"], value=_external_tensor("c", location, size)),
            helper.make_node("Add", ["a", "c"], ["b"]),
        ],
        opset_imports=opsets,
    )
    graph = helper.make_graph(
        [helper.make_node("Leak", ["x"], ["y"], domain="local.fn")], "f", [x], [y]
    )
    in_function = helper.make_model(
        graph, opset_imports=[*opsets, helper.make_opsetid("local.fn", 1)], functions=[function]
    )

    # A Constant with a sparse_value attribute.
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], sparse_value=_external_sparse(location, size)),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "s",
        [x],
        [y],
    )
    in_sparse_attribute = helper.make_model(graph, opset_imports=opsets)

    # A sparse Constant inside a Loop body subgraph.
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["k"], sparse_value=_external_sparse(location, size)),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
            helper.make_node("Identity", ["k"], ["scan"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("scan", TensorProto.UINT8, [size]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trip", "go"], ["scans"], body=body),
            helper.make_node("Reshape", ["scans", "flat"], ["leak"]),
            helper.make_node("Add", ["x", "leak"], ["y"]),
        ],
        "l",
        [x],
        [y],
        initializer=[
            helper.make_tensor("trip", TensorProto.INT64, [], [1]),
            helper.make_tensor("go", TensorProto.BOOL, [], [True]),
            helper.make_tensor("flat", TensorProto.INT64, [1], [size]),
        ],
    )
    in_loop_body = helper.make_model(graph, opset_imports=opsets)
    return {
        "function-constant": in_function,
        "sparse-attribute": in_sparse_attribute,
        "loop-body-sparse": in_loop_body,
    }


def test_models_cannot_read_files_through_external_data_anywhere(
    server: ServerProcess,
) -> None:
    """The server process runs in the test's working directory; a file planted there is what
    a relative external-data reference resolves to (onnxruntime refuses absolute and '..'
    paths itself, so the upload check must refuse the reference wherever it hides)."""
    canary = b"CANARY-" + secrets.token_hex(12).encode()
    planted = Path.cwd() / f".blindfold-canary-{secrets.token_hex(6)}.bin"
    planted.write_bytes(canary)
    try:
        with connect(server.url, allow_simulation=True) as client:
            for label, model in _file_reading_models(planted.name, len(canary)).items():
                try:
                    uploaded = client.upload_model(model, name=f"leak-{label}")
                except blindfold.ServerError as error:
                    # PT017: each model of the loop may be refused or run; both are checked.
                    assert error.status == 400, (label, error.message)  # noqa: PT017
                    assert "references external data" in error.message, label  # noqa: PT017
                    assert canary.decode() not in error.message  # noqa: PT017
                    continue
                try:
                    leaked = client.run_model(
                        f"leak-{label}", np.zeros(len(canary), dtype=np.uint8)
                    )["y"]
                finally:
                    client.delete_model(f"leak-{label}", token=uploaded.owner_token)
                pytest.fail(f"{label}: the upload was accepted and returned {bytes(leaked)!r}")
    finally:
        planted.unlink()
    assert canary.decode() not in server.log()
