"""The Oblivious HTTP channel end to end: a real nginx (Debian's nginx-light) terminates TLS
with its own certificate in front of the server, and a recording relay between nginx and the
server keeps every byte nginx forwards in the clear (what the proxy itself sees). With
channel="ohttp" upload, run and delete work and neither nginx's logs nor that capture hold a
model or tensor byte; the pinned-TLS channel refuses the proxy. Then the attacks: a relay
that swaps in another server's HPKE configuration, a tampered identity document, a stripped
document, replayed and stale requests, garbage bodies; and key rotation."""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_attacks import AttackProxy

import blindfold
from blindfold import ohttp
from blindfold.attestation.binding import identity_document
from blindfold.client.attest import fetch_attestation
from blindfold.client.ohttp_channel import KeyConfigurationStale, OhttpTransport
from blindfold.client.transport import Endpoint
from blindfold.errors import EvidenceError, PinnedKeyMismatch, ReportDataMismatch

from conftest import ServerProcess, free_port, start_server
from helpers import write_self_signed
from server_process import debian_tool, unverified_context

pytestmark = pytest.mark.filterwarnings("ignore:SIMULATION TEE")


def _secret_model(seed: int = 11) -> tuple[onnx.ModelProto, bytes]:
    """A MatMul model whose weights are random bytes (easy to recognise in a capture)."""
    weights = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "secret",
        [x],
        [y],
        [numpy_helper.from_array(weights, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights.tobytes()


def _leaks(secret: bytes, haystack: bytes, window: int = 32) -> list[int]:
    """Offsets of `secret` whose `window`-byte slices appear in `haystack`."""
    return [
        start
        for start in range(0, max(1, len(secret) - window + 1), window)
        if secret[start : start + window] in haystack
    ]


# --- the proxy's view: nginx terminating TLS, then a recording relay ---


class RecordingRelay:
    """Accepts plain HTTP from nginx, records every byte both ways, and carries it on over
    TLS to the server: the capture is exactly what the proxy reads after TLS termination.
    One asyncio loop in a thread, so that each TLS connection is driven by one thread only."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port, ssl=unverified_context()
            )
        except OSError:
            writer.close()
            return

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    with self._lock:
                        self.captured += data
                    sink.write(data)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def capture(self) -> bytes:
        with self._lock:
            return bytes(self.captured)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class Nginx:
    def __init__(self, executable: str, directory: Path, upstream_port: int) -> None:
        self.directory = directory
        self.cert_path, key_path = write_self_signed(directory, "proxy")
        self.port = free_port()
        self.access_log = directory / "access.log"
        self.error_log = directory / "error.log"
        temp = directory / "temp"
        temp.mkdir()
        config = directory / "nginx.conf"
        config.write_text(
            f"""
user root;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 64; }}
http {{
    access_log {self.access_log};
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self.cert_path};
        ssl_certificate_key {key_path};
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
        )
        self.process = subprocess.Popen(
            [executable, "-c", str(config), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=(directory / "nginx.stderr").open("wb"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((directory / "nginx.stderr").read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not start listening")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def logs(self) -> bytes:
        return b"".join(
            path.read_bytes() for path in (self.access_log, self.error_log) if path.exists()
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def gateway_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("ohttp-server"), "--open-upload")
    yield process
    process.stop()


@pytest.fixture
def proxied(
    gateway_server: ServerProcess, tmp_path: Path
) -> Iterator[tuple[Nginx, RecordingRelay]]:
    nginx_path = debian_tool("nginx", "nginx-light")
    relay = RecordingRelay(gateway_server.port)
    nginx = Nginx(nginx_path, tmp_path, relay.port)
    yield nginx, relay
    nginx.stop()
    relay.close()


def test_ohttp_through_nginx_hides_models_and_tensors(
    proxied: tuple[Nginx, RecordingRelay],
) -> None:
    nginx, relay = proxied
    model, weights = _secret_model()
    model_bytes = model.SerializeToString()
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    expected = x @ np.frombuffer(weights, np.float32).reshape(64, 64)
    with blindfold.connect(
        nginx.url, allow_simulation=True, channel="ohttp", verify=nginx.cert_path
    ) as client:
        uploaded = client.upload_model(model, "secret")
        outputs = client.run_model("secret", x, receipt=True)
        np.testing.assert_allclose(outputs["y"], expected, rtol=1e-4, atol=1e-4)
        assert outputs.receipt is not None
        assert [row["name"] for row in client.list_models()] == ["secret"]
        client.delete_model("secret")
        assert client.list_models() == []
        token = uploaded.owner_token
    capture = relay.capture()
    logs = nginx.logs()
    # The capture and the logs saw the traffic: the gateway path, many times.
    assert capture.count(b"POST /v2/ohttp HTTP/1.1") >= 5
    assert b"/v2/ohttp" in logs
    for secret, what in (
        (model_bytes, "model"),
        (x.tobytes(), "input tensor"),
        (outputs["y"].tobytes(), "output tensor"),
    ):
        assert _leaks(secret, capture) == [], f"{what} bytes in the proxy-to-server capture"
        assert _leaks(secret, logs) == [], f"{what} bytes in nginx's logs"
    for clear in (b"secret", b"/infer", b"/load", b"/unload", token.encode() if token else b"-"):
        if clear == b"secret":
            # The model name appears nowhere outside the encryption either.
            assert b'"secret"' not in capture
        else:
            assert clear not in capture
    # Every encapsulated request's size is a padding bucket plus the fixed OHTTP overhead.
    overhead = ohttp.REQUEST_HEADER_LENGTH + ohttp.ENC_LENGTH + ohttp.TAG_LENGTH
    sizes = [
        int(line.split(b":")[1])
        for line in capture.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    request_sizes = [s - overhead for s in sizes if (s - overhead) in ohttp.DEFAULT_BUCKETS]
    assert len(request_sizes) >= 5


def test_pinned_tls_channel_refuses_the_proxy(proxied: tuple[Nginx, RecordingRelay]) -> None:
    nginx, relay = proxied
    with pytest.raises(PinnedKeyMismatch, match="channel='ohttp'"):
        blindfold.connect(nginx.url, allow_simulation=True)
    assert b"/v2/ohttp" not in relay.capture()


def test_ohttp_channel_checks_the_proxys_certificate(
    proxied: tuple[Nginx, RecordingRelay], tmp_path: Path
) -> None:
    nginx, _ = proxied
    other_ca, _ = write_self_signed(tmp_path, "other-ca")
    with pytest.raises(blindfold.errors.AttestationError, match="CERTIFICATE_VERIFY_FAILED"):
        blindfold.connect(nginx.url, allow_simulation=True, channel="ohttp", verify=other_ca)


# --- attacks on the binding of the HPKE key ---


def _rewriting_proxy(
    make: Callable[..., AttackProxy],
    upstream: ServerProcess,
    rewrite: Callable[[dict[str, Any], str], dict[str, Any]],
) -> AttackProxy:
    def responder(proxy: AttackProxy, method: str, target: str) -> tuple[int, bytes] | None:
        if not target.startswith("/v2/attestation"):
            return None
        status, body = proxy.fetch_upstream(target)
        return status, json.dumps(rewrite(json.loads(body), target)).encode()

    return make(upstream.port, "mitm", responder)


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., AttackProxy]]:
    proxies: list[AttackProxy] = []

    def make(upstream_port: int, mode: str = "mitm", responder: Any = None) -> AttackProxy:
        proxy = AttackProxy(tmp_path, upstream_port, mode, responder)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


def _context_for(proxy: AttackProxy) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy.cert_path))


def test_relay_swapping_in_another_servers_hpke_configuration_is_refused(
    gateway_server: ServerProcess,
    tmp_path: Path,
    make_proxy: Callable[..., AttackProxy],
) -> None:
    other = start_server(tmp_path, "--open-upload")
    try:
        other_document, _ = fetch_attestation(Endpoint("127.0.0.1", other.port), None)
        other_configs = json.loads(other_document["identity_document"])["hpke_key_configs"]

        def swap(document: dict[str, Any], target: str) -> dict[str, Any]:
            mine = json.loads(document["identity_document"])
            document["identity_document"] = identity_document(
                bytes.fromhex(mine["tls_spki_sha256"]),
                [bytes.fromhex(c) for c in other_configs],
            ).decode()
            return document

        proxy = _rewriting_proxy(make_proxy, gateway_server, swap)
        with pytest.raises(ReportDataMismatch, match="swap in their own HPKE key"):
            blindfold.connect(
                proxy.url, allow_simulation=True, channel="ohttp", verify=_context_for(proxy)
            )
        assert not [line for line in proxy.seen() if "/v2/ohttp" in line]
    finally:
        other.stop()


def _flip_key_hash(document: str) -> str:
    """Another TLS key hash in an otherwise genuine document (recomputing nothing)."""
    at = document.index('"tls_spki_sha256":"') + len('"tls_spki_sha256":"')
    return document[:at] + ("1" if document[at] == "0" else "0") + document[at + 1 :]


@pytest.mark.parametrize(
    ("tamper", "error", "match"),
    [
        (_flip_key_hash, ReportDataMismatch, "does not bind the identity document"),
        # The same content, not in canonical form: one identity must have one hash.
        (lambda d: d.replace(",", ", ", 1), EvidenceError, "canonical"),
        (lambda d: "[]", EvidenceError, "not a Blindfold identity document"),
    ],
)
def test_tampered_identity_document_is_refused(
    gateway_server: ServerProcess,
    make_proxy: Callable[..., AttackProxy],
    tamper: Callable[[str], str],
    error: type[Exception],
    match: str,
) -> None:
    def rewrite(document: dict[str, Any], target: str) -> dict[str, Any]:
        document["identity_document"] = tamper(document["identity_document"])
        return document

    proxy = _rewriting_proxy(make_proxy, gateway_server, rewrite)
    with pytest.raises(error, match=match):
        blindfold.connect(
            proxy.url, allow_simulation=True, channel="ohttp", verify=_context_for(proxy)
        )
    assert not [line for line in proxy.seen() if "/v2/ohttp" in line]


def test_stripped_identity_document_is_refused_for_ohttp(
    gateway_server: ServerProcess, make_proxy: Callable[..., AttackProxy]
) -> None:
    """A relay that downgrades the request to the plain key binding (drops `binding=`)."""

    def downgrade(document: dict[str, Any], target: str) -> dict[str, Any]:
        _status, body = proxy.fetch_upstream(target.replace("binding=identity", "binding=spki"))
        return dict(json.loads(body))

    proxy = _rewriting_proxy(make_proxy, gateway_server, downgrade)
    with pytest.raises(EvidenceError, match="binds no identity document"):
        blindfold.connect(
            proxy.url, allow_simulation=True, channel="ohttp", verify=_context_for(proxy)
        )


def test_old_clients_binding_still_holds(gateway_server: ServerProcess) -> None:
    """Without `binding=identity` the server answers exactly as before: report data is
    SHA-256(SPKI) || nonce, which is what clients before the identity document check."""
    from blindfold.attestation.binding import expected_report_data
    from blindfold.attestation.verdict import Evidence
    from blindfold.attestation.verify import verify_evidence

    nonce = bytes(range(32))
    connection = http.client.HTTPSConnection(
        "127.0.0.1", gateway_server.port, context=unverified_context(), timeout=30
    )
    connection.request("GET", f"/v2/attestation?nonce={nonce.hex()}")
    document = json.loads(connection.getresponse().read())
    connection.close()
    assert "identity_document" not in document
    verdict = verify_evidence(Evidence.from_json(document))
    certificate = ssl.PEM_cert_to_DER_cert(document["certificate"])
    assert verdict.report_data[:64] == expected_report_data(certificate, nonce)


# --- the gateway's own refusals ---


def _post(
    server: ServerProcess, body: bytes, content_type: str = ohttp.REQUEST_MEDIA_TYPE
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", server.port, context=unverified_context(), timeout=30
    )
    try:
        connection.request("POST", "/v2/ohttp", body, {"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _key_config(server: ServerProcess) -> ohttp.KeyConfig:
    document, _ = fetch_attestation(Endpoint("127.0.0.1", server.port), None)
    configs = json.loads(document["identity_document"])["hpke_key_configs"]
    return ohttp.KeyConfig.decode(bytes.fromhex(configs[0]))


def _encapsulated(
    config: ohttp.KeyConfig, path: str = "/v2/health/ready", date: float | None = None
) -> tuple[bytes, ohttp.ClientContext]:
    fields = [("date", email.utils.formatdate(time.time() if date is None else date, usegmt=True))]
    return ohttp.encapsulate_request(
        config, ohttp.encode_request(ohttp.BinaryRequest("GET", path, fields))
    )


def _open(context: ohttp.ClientContext, body: bytes) -> ohttp.BinaryResponse:
    return ohttp.decode_response(ohttp.decapsulate_response(context, body))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "shorter"),
        (b"garbage" * 3, "shorter"),
        (bytes(100), "suite"),
        (b"\x00\x00\x20\x00\x01\x00\x01" + bytes(80), "holds no HPKE key|does not decrypt"),
    ],
)
def test_garbage_ohttp_bodies_get_a_clear_400(
    gateway_server: ServerProcess, body: bytes, match: str
) -> None:
    status, _, answer = _post(gateway_server, body)
    assert status == 400
    assert __import__("re").search(match, json.loads(answer)["error"])
    status, _, answer = _post(gateway_server, b"{}", "application/json")
    assert status == 415 and "message/ohttp-req" in json.loads(answer)["error"]
    # Still serving, and through the gateway too.
    message, context = _encapsulated(_key_config(gateway_server))
    status, _, answer = _post(gateway_server, message)
    assert status == 200 and _open(context, answer).status == 200


def test_truncated_and_altered_requests_get_a_clear_400(gateway_server: ServerProcess) -> None:
    config = _key_config(gateway_server)
    message, _ = _encapsulated(config)
    status, _, answer = _post(gateway_server, message[:-5])
    assert status == 400 and "does not decrypt" in json.loads(answer)["error"]
    unknown = ohttp.KeyConfig((config.key_id + 7) % 256, config.public_key)
    message, _ = _encapsulated(unknown)
    status, _headers, answer = _post(gateway_server, message)
    assert status == 400
    problem = json.loads(answer)
    assert problem["type"] == ohttp.KEY_PROBLEM_TYPE and "rotated" in problem["error"]


def test_replayed_request_is_refused_inside_the_encryption(gateway_server: ServerProcess) -> None:
    message, context = _encapsulated(_key_config(gateway_server))
    status, _, first = _post(gateway_server, message)
    assert status == 200 and _open(context, first).status == 200
    status, _, second = _post(gateway_server, message)
    assert status == 200  # the relay learns nothing from the outer status...
    replay = _open(context, second)  # ...only the original client can read the refusal
    assert replay.status == 400 and "replay" in json.loads(replay.body)["error"]


@pytest.mark.parametrize(
    "date",
    [None, "garbage", "Sun, 31 Feb 2026 10:00:00 GMT", "Sun, 06 Nov 1994 08:49:37 -0000"],
)
def test_a_missing_or_malformed_date_is_refused_inside_the_encryption(
    gateway_server: ServerProcess, date: str | None
) -> None:
    """Whatever the date field holds, the answer is the gateway's encrypted 400 naming the
    field (not an internal error), and the server keeps serving."""
    fields = [] if date is None else [("date", date)]
    inner = ohttp.encode_request(ohttp.BinaryRequest("GET", "/v2/health/ready", fields))
    message, context = ohttp.encapsulate_request(_key_config(gateway_server), inner)
    status, _, answer = _post(gateway_server, message)
    assert status == 200
    refused = _open(context, answer)
    assert refused.status == 400 and "date field" in json.loads(refused.body)["error"]
    message, context = _encapsulated(_key_config(gateway_server))
    status, _, answer = _post(gateway_server, message)
    assert status == 200 and _open(context, answer).status == 200


def test_stale_request_is_refused_and_the_sdk_corrects_its_clock(
    gateway_server: ServerProcess,
) -> None:
    message, context = _encapsulated(_key_config(gateway_server), date=time.time() - 3600)
    _status, _, answer = _post(gateway_server, message)
    stale = _open(context, answer)
    assert stale.status == 400 and "replay window" in json.loads(stale.body)["error"]
    assert "date" in dict(stale.headers)
    made: list[OhttpTransport] = []

    def keep(_: blindfold.AttestedServer, default: blindfold.BaseTransport) -> OhttpTransport:
        assert isinstance(default, OhttpTransport)  # the OHTTP channel is just a transport
        made.append(default)
        return default

    client = blindfold.connect(
        gateway_server.url,
        allow_simulation=True,
        channel="ohttp",
        verify=unverified_context(),
        transport=keep,
    )
    with client:
        made[0].clock_offset = -3600.0
        assert client.is_ready()
        assert abs(made[0].clock_offset) < 60


def test_inner_errors_are_the_routes_own(gateway_server: ServerProcess) -> None:
    """Auth and errors are identical: the inner request goes through the same app."""
    with blindfold.connect(
        gateway_server.url, allow_simulation=True, channel="ohttp", verify=unverified_context()
    ) as client:
        with pytest.raises(blindfold.errors.NotFoundError):
            client.run_model("no-such-model", np.zeros((1, 3), np.float32))
        model, _ = _secret_model(3)
        client.upload_model(model, "owned")
        with pytest.raises(blindfold.errors.AuthenticationError):
            client.delete_model("owned", token="bfo_not-the-owner")
        client.delete_model("owned")


def test_key_rotation_is_followed_by_reattesting(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, "--open-upload", "--hpke-rotation-seconds", "1", "--hpke-grace-seconds", "0"
    )
    try:
        with blindfold.connect(
            server.url, allow_simulation=True, channel="ohttp", verify=unverified_context()
        ) as client:
            first = client.attestation.hpke_key_config()
            time.sleep(1.5)  # the server's key is now replaced and the old one gone
            message, _ = _encapsulated(first)
            status, _, answer = _post(server, message)
            assert status == 400 and json.loads(answer)["type"] == ohttp.KEY_PROBLEM_TYPE
            assert client.is_ready()  # re-attested silently: the same TLS key, same server
            assert client.attestation.hpke_key_config().key_id != first.key_id
    finally:
        server.stop()


def test_stale_key_is_an_attestation_error_before_anything_is_read() -> None:
    assert issubclass(KeyConfigurationStale, PinnedKeyMismatch)


def test_keyring_rotates_on_schedule_and_keeps_the_old_key_for_the_grace_period() -> None:
    from blindfold.server.hpke_keys import HpkeKeyring

    now = [1010.0]  # periods of 100 s start at multiples of 100; 1010 is past the grace
    keyring = HpkeKeyring(rotation_seconds=100, grace_seconds=10, clock=lambda: now[0])
    (first,) = keyring.configs()
    now[0] += 89
    assert keyring.configs() == [first]
    now[0] += 1
    second, previous = keyring.configs()
    assert previous == first and second.key_id == (first.key_id + 1) % 256
    assert keyring.private_key(first.key_id) is not None  # in the grace period
    now[0] += 10
    assert keyring.configs() == [second]
    with pytest.raises(ohttp.UnknownKeyError, match="rotated away"):
        keyring.private_key(first.key_id)
    # Replicas sharing the seed (the service identity's) derive the same keys.
    twin = HpkeKeyring(100, 10, clock=lambda: now[0], seed=b"s" * 32)
    again = HpkeKeyring(100, 10, clock=lambda: now[0], seed=b"s" * 32)
    assert twin.configs() == again.configs() != keyring.configs()
