"""What the SDK reads before any trust exists is bounded, and its connection pool works in
processes with many open files.

A hostile server (or anyone on the path, since the attestation request travels over TLS that
nothing authenticates yet) answers `GET /v2/attestation` itself: the SDK must refuse an
oversized or absurdly nested answer with a clear error, without reading it all.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import blindfold
from blindfold.client.attest import MAX_ATTESTATION_BYTES

from conftest import ServerProcess
from helpers import write_self_signed

GIB = 1 << 30
Answer = Callable[[ssl.SSLSocket], None]


class HostileServer:
    """A TLS server on loopback (its own certificate) that answers every request with
    `answer`, counting the bytes it managed to send before the client hung up."""

    def __init__(self, directory: Path, answer: Answer) -> None:
        cert, key = write_self_signed(directory, "hostile")
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert, key)
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.sent = 0
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        raw, _ = self._listener.accept()
        try:
            with self._tls.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(30)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                self._answer_counting(conn)
        except OSError:
            pass  # the client hung up: what we want
        finally:
            self.done.set()

    def _answer_counting(self, conn: ssl.SSLSocket) -> None:
        original = conn.sendall

        def counting(data: bytes) -> None:
            original(data)
            self.sent += len(data)

        # Counts what the server sends; the stand-in takes bytes only, as the server sends.
        conn.sendall = counting  # type: ignore[method-assign,assignment]
        self._answer(conn)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Callable[[Answer], HostileServer]]:
    servers: list[HostileServer] = []

    def make(answer: Answer) -> HostileServer:
        server = HostileServer(tmp_path, answer)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _stream_chunked(conn: ssl.SSLSocket, total: int) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    conn.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * (1 << 20)
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    for _ in range(total // len(chunk)):
        conn.sendall(frame)
    conn.sendall(b"0\r\n\r\n")


def _declared(conn: ssl.SSLSocket, total: int) -> None:
    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
    chunk = b" " * (1 << 20)
    for _ in range(total // len(chunk)):
        conn.sendall(chunk)


def _body(conn: ssl.SSLSocket, body: bytes, status: str = "200 OK") -> None:
    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda conn: _stream_chunked(conn, GIB), id="chunked-1GiB"),
        pytest.param(lambda conn: _declared(conn, GIB), id="content-length-1GiB"),
        pytest.param(
            lambda conn: _body(conn, b"x" * (64 << 20), "500 Internal Server Error"),
            id="error-64MiB",
        ),
    ],
)
def test_huge_attestation_answer_is_refused_without_reading_it(
    hostile: Callable[[Answer], HostileServer], answer: Answer
) -> None:
    server = hostile(answer)
    with pytest.raises(blindfold.AttestationError) as refused:
        blindfold.connect(server.url, allow_simulation=True, timeout=30)
    message = str(refused.value)
    assert "attestation" in message and "too large" in message
    assert server.done.wait(30)
    # The client hung up after at most a few MiB (plus what the socket buffers held).
    assert server.sent < MAX_ATTESTATION_BYTES + (32 << 20)


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_attestation_answer_is_refused(
    hostile: Callable[[Answer], HostileServer], opener: bytes
) -> None:
    depth = 200_000
    closer = b"]" if opener == b"[" else b"}"
    body = opener * depth + b"1" + closer * depth
    server = hostile(lambda conn: _body(conn, body))
    with pytest.raises(blindfold.EvidenceError) as refused:
        blindfold.connect(server.url, allow_simulation=True, timeout=30)
    assert "nest" in str(refused.value)


def test_moderately_nested_attestation_answer_is_refused(
    hostile: Callable[[Answer], HostileServer],
) -> None:
    # Deep enough to be absurd for an attestation document, shallow enough for json.loads.
    body = b'{"kind": ' + b"[" * 500 + b"]" * 500 + b"}"
    server = hostile(lambda conn: _body(conn, body))
    with pytest.raises(blindfold.EvidenceError) as refused:
        blindfold.connect(server.url, allow_simulation=True, timeout=30)
    assert "nest" in str(refused.value)


def _endless(conn: ssl.SSLSocket, opening: bytes, filler: bytes) -> None:
    conn.sendall(opening)
    block = filler * ((1 << 20) // len(filler))
    for _ in range(GIB // len(block)):
        conn.sendall(block)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda conn: _endless(conn, b"HTTP/1.1 200 OK", b"x"), id="endless-line"),
        pytest.param(
            lambda conn: _endless(conn, b"HTTP/1.1 200 OK\r\n", b"X-Fill: y\r\n"),
            id="endless-fields",
        ),
        pytest.param(
            lambda conn: _endless(conn, b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
            id="endless-interim",
        ),
    ],
)
def test_endless_response_head_is_refused_without_reading_it(
    hostile: Callable[[Answer], HostileServer], answer: Answer
) -> None:
    server = hostile(answer)
    with pytest.raises(blindfold.AttestationError) as refused:
        blindfold.connect(server.url, allow_simulation=True, timeout=30)
    assert "response head exceeds" in str(refused.value) or "interim" in str(refused.value)
    assert server.done.wait(30)
    assert server.sent < (32 << 20)


@pytest.mark.parametrize(
    ("head", "complaint"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 9\r\n", "two different"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n", "Transfer-Encoding 'gzip'"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n",
            "and a Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\n", "no valid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n", "no valid Content-Length"),
        (b"HTTP/1.1 200 OK\r\n Folded: x\r\nContent-Length: 2\r\n", "malformed header"),
        (b"HTTP/9 200 OK\r\nContent-Length: 2\r\n", "status line"),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n", "status line"),
    ],
)
def test_ambiguous_response_framing_is_refused(
    hostile: Callable[[Answer], HostileServer], head: bytes, complaint: str
) -> None:
    """Framing that two parsers could read differently (the stuff of response smuggling)
    is refused, with what was wrong, rather than guessed at."""
    server = hostile(lambda conn: conn.sendall(head + b"\r\n{}"))
    with pytest.raises(blindfold.AttestationError) as refused:
        blindfold.connect(server.url, allow_simulation=True, timeout=30)
    assert complaint in str(refused.value)


def test_chunked_attestation_answer_is_decoded(
    hostile: Callable[[Answer], HostileServer],
) -> None:
    """A chunked answer within the bound is read (a proxy may re-frame responses so): the
    document that arrives is the one the chunks carry, here refused for its nesting."""
    body = b'{"kind": ' + b"[" * 500 + b"]" * 500 + b"}"
    frames = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:]))

    def answer(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + frames)
        conn.sendall(b"0\r\nTrailer: x\r\n\r\n")

    server = hostile(answer)
    with pytest.raises(blindfold.EvidenceError) as refused:
        blindfold.connect(server.url, allow_simulation=True, timeout=30)
    assert "nest" in str(refused.value)


MANY_FILES = textwrap.dedent(
    """
    import os, resource, sys, warnings
    import numpy as np
    import blindfold

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    assert max(held) > 1024
    warnings.simplefilter("ignore")
    with blindfold.connect(sys.argv[1], allow_simulation=True) as client:
        model = client.upload_model(sys.argv[2], name="many-files")
        x = np.ones((1, 3), np.float32)
        for _ in range(5):  # later requests reuse (and check) pooled keep-alive sockets
            assert (client.run_model("many-files", x)["y"] == x).all()
        client.delete_model("many-files", token=model.owner_token)
    print("ok")
    """
)


def test_sdk_works_with_more_than_1024_open_files(server: ServerProcess, tmp_path: Path) -> None:
    import resource

    from onnx import TensorProto

    from onnx_models import identity_model

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048:
        pytest.skip("the hard limit on open files is below 2048 here")
    model = tmp_path / "identity.onnx"
    model.write_bytes(identity_model(TensorProto.FLOAT, name="many").SerializeToString())
    result = subprocess.run(
        [sys.executable, "-c", MANY_FILES, server.url, str(model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
