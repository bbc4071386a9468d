"""What Gramine SGX lacks, the server does without: no memfd_create (the TLS key then reaches
the TLS stack as an encrypted temporary file under a random in-memory password) and no
shared memory for SQLite's WAL (the store's `delete` journal). Verified here by removing
memfd_create from the process; real SGX hardware was not available."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

import blindfold
from blindfold.attestation.binding import spki_sha256
from blindfold.server.identity import ServerIdentity
from blindfold.server.tee.simulation import SimulationProvider

from conftest import start_server
from onnx_models import identity_model


def _handshake(context: ssl.SSLContext) -> bytes:
    """A real TLS handshake on loopback; returns the certificate the server presented."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        raw, _ = listener.accept()
        try:
            with context.wrap_socket(raw, server_side=True) as conn:
                conn.recv(1)
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), 10) as raw,
        client_context.wrap_socket(raw) as conn,
    ):
        certificate = conn.getpeercert(binary_form=True)
    thread.join(10)
    listener.close()
    assert certificate
    return certificate


def test_tls_key_without_memfd_is_only_ever_written_encrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = ServerIdentity(SimulationProvider(None), ["127.0.0.1"])

    def no_memfd(*args: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")  # what Gramine answers

    written: list[bytes] = []
    real_unlink = os.unlink

    def unlink_recording(path: str) -> None:
        written.append(Path(path).read_bytes())
        real_unlink(path)

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    monkeypatch.setattr(os, "unlink", unlink_recording)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    context = identity.ssl_context()
    monkeypatch.undo()

    assert spki_sha256(_handshake(context)) == identity.spki_sha256
    assert list(tmp_path.iterdir()) == []  # removed as soon as it was loaded
    assert len(written) == 1 and b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in written[0]
    assert b"-----BEGIN PRIVATE KEY-----" not in written[0]


def test_server_without_memfd_and_with_delete_journal_serves_and_keeps_models(
    tmp_path: Path,
) -> None:
    """A whole server process as Gramine would run it: memfd_create is missing, the store uses
    the rollback journal; models survive a restart and no WAL or shared-memory file appears."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\ndel os.memfd_create\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    store = tmp_path / "store"
    env = {"PYTHONPATH": str(site), "TMPDIR": str(temp)}
    # As deploy/gramine runs it: workers need memfd, so models run in the server process.
    args = (
        "--open-upload",
        "--store",
        str(store),
        "--store-journal",
        "delete",
        "--unsafe-no-isolation",
    )
    x = np.ones((1, 3), np.float32)
    for attempt in range(2):
        server = start_server(tmp_path, *args, env=env)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                client = blindfold.connect(server.url, allow_simulation=True)
            with client:
                if attempt == 0:
                    model = identity_model(TensorProto.FLOAT, name="gramine")
                    client.upload_model(model, name="gramine", public=True)
                np.testing.assert_array_equal(client.run_model("gramine", x)["y"], x)
        finally:
            server.stop()
        assert not [p.name for p in temp.iterdir() if p.name.startswith("blindfold-tls")]
        assert not [p.name for p in store.iterdir() if p.name.endswith(("-wal", "-shm"))]


def test_manifest_command_line_is_one_the_server_accepts() -> None:
    import tomllib

    from blindfold.cli import build_parser
    from blindfold.server.tee.gramine_manifest import render_manifest

    template = Path(__file__).parent.parent / "deploy" / "gramine" / "blindfold.manifest.template"
    argv = tomllib.loads(render_manifest(template.read_text()))["loader"]["argv"]
    assert argv[1:3] == ["-m", "blindfold"]
    args = build_parser().parse_args(argv[3:])
    assert args.tee == "sgx" and args.store_journal == "delete"
    assert args.upload_key_file is not None and not args.open_upload
