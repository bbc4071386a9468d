"""The sealed persistent model store (`blindfold serve --store DIR`): unit tests of
`blindfold.server.store` against a temp dir, and real server processes that restart, crash
(SIGKILL at each step of a write, and mid-upload) and meet damaged blobs."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import sqlite3
import ssl
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import blindfold
from blindfold.errors import ConfigurationError
from blindfold.sealing import seal
from blindfold.server.main import open_store
from blindfold.server.store import (
    BLOB_DIR,
    CRASH_ENV,
    ModelStore,
    ModelUnavailable,
    StoredModel,
    StoreError,
    blob_label,
)
from blindfold.server.tee.simulation import SEALING_KEY_FILE

from conftest import ServerProcess, start_server
from onnx_models import identity_model, matmul_model

X = np.arange(6, dtype=np.float32).reshape(2, 3)


def model_bytes(tag: str) -> bytes:
    """Distinct ONNX identity models (the graph name changes the bytes)."""
    return identity_model(TensorProto.FLOAT, name=tag).SerializeToString()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- unit tests of the store ---


def record(name: str, data: bytes, **changes: Any) -> StoredModel:
    fields: dict[str, Any] = dict(
        name=name,
        version=1,
        sha256=sha(data),
        size=len(data),
        owner_token_sha256=sha(b"owner-" + name.encode()),
        public=True,
    )
    fields.update(changes)
    return StoredModel(**fields)


def put(store: ModelStore, rec: StoredModel, data: bytes) -> None:
    staged = None if store.has_blob(rec.sha256) else store.stage_blob(rec.sha256, data)
    store.commit_model(rec, staged)


def blob_names(directory: Path) -> set[str]:
    return {p.name for p in (directory / BLOB_DIR).iterdir()}


@pytest.fixture()
def key() -> bytes:
    return secrets.token_bytes(32)


def test_store_round_trip_and_reopen(tmp_path: Path, key: bytes) -> None:
    data = model_bytes("a")
    rec = record("a", data, public=False, run_keys={"k1": sha(b"run")})
    store = ModelStore(tmp_path, key)
    put(store, rec, data)
    store.close()
    store = ModelStore(tmp_path, key)
    try:
        (loaded,) = store.records()
        assert loaded.problem is None
        assert loaded.record == rec
        assert store.read_model(loaded.record, 1 << 20) == data
        # Sealed on disk: the plaintext bytes are nowhere in the blob.
        assert data not in store.blob_path(rec.sha256).read_bytes()
    finally:
        store.close()


def test_store_dedup_replace_and_delete_collect_blobs(tmp_path: Path, key: bytes) -> None:
    one, two = model_bytes("one"), model_bytes("two")
    store = ModelStore(tmp_path, key)
    try:
        put(store, record("a", one), one)
        put(store, record("b", one), one)
        assert blob_names(tmp_path) == {f"{sha(one)}.sealed"}
        store.delete_model("a")
        assert blob_names(tmp_path) == {f"{sha(one)}.sealed"}  # b still uses it
        put(store, record("b", two, version=2), two)  # replacement drops the old blob
        assert blob_names(tmp_path) == {f"{sha(two)}.sealed"}
        store.delete_model("b")
        assert blob_names(tmp_path) == set()
        assert store.records() == []
    finally:
        store.close()


def test_store_rules_update_is_durable(tmp_path: Path, key: bytes) -> None:
    data = model_bytes("a")
    store = ModelStore(tmp_path, key)
    put(store, record("a", data), data)
    updated = record("a", data, public=False, run_keys={"id1": sha(b"k1"), "id2": sha(b"k2")})
    store.update_rules(updated)
    store.close()
    store = ModelStore(tmp_path, key)
    try:
        (loaded,) = store.records()
        assert loaded.problem is None and loaded.record == updated
    finally:
        store.close()


def test_store_recover_removes_temp_files_and_orphans(tmp_path: Path, key: bytes) -> None:
    kept, orphan = model_bytes("kept"), model_bytes("orphan")
    store = ModelStore(tmp_path, key)
    try:
        put(store, record("kept", kept), kept)
        store.stage_blob(sha(orphan), orphan)  # a crash before rename leaves this
        (tmp_path / BLOB_DIR / f"{sha(orphan)}.sealed").write_bytes(b"x")  # ...or this
        (tmp_path / BLOB_DIR / "README").write_text("not ours")
        removed = store.recover()
        assert len(removed) == 2
        assert blob_names(tmp_path) == {f"{sha(kept)}.sealed", "README"}
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "foreign", "swap", "missing"])
def test_store_refuses_damaged_blob_naming_the_model(
    tmp_path: Path, key: bytes, damage: str
) -> None:
    data, other = model_bytes("victim"), model_bytes("other")
    store = ModelStore(tmp_path, key)
    try:
        put(store, record("victim", data), data)
        put(store, record("other", other), other)
        path = store.blob_path(sha(data))
        blob = bytearray(path.read_bytes())
        if damage == "flip":
            blob[len(blob) // 2] ^= 0x01
        elif damage == "truncate":
            del blob[-5:]
        elif damage == "append":
            blob += b"\x00"
        elif damage == "foreign":  # sealed by another TEE (another key), same label
            blob = bytearray(seal(secrets.token_bytes(32), data, label=blob_label(sha(data))))
        elif damage == "swap":  # another model's blob moved under this row
            blob = bytearray(store.blob_path(sha(other)).read_bytes())
        if damage == "missing":
            path.unlink()
        else:
            path.write_bytes(bytes(blob))
        records = {r.record.name: r.record for r in store.records()}
        with pytest.raises(ModelUnavailable, match="'victim'") as caught:
            store.read_model(records["victim"], 1 << 20)
        assert data.hex() not in str(caught.value)
        assert store.read_model(records["other"], 1 << 20) == other
    finally:
        store.close()


def test_store_under_another_key_reports_every_row(tmp_path: Path, key: bytes) -> None:
    data = model_bytes("a")
    store = ModelStore(tmp_path, key)
    put(store, record("a", data), data)
    store.close()
    store = ModelStore(tmp_path, secrets.token_bytes(32))
    try:
        assert not store.key_matches
        (loaded,) = store.records()
        assert loaded.problem is not None and "different sealing key" in loaded.problem
    finally:
        store.close()


def test_store_detects_metadata_edited_outside(tmp_path: Path, key: bytes) -> None:
    data = model_bytes("a")
    store = ModelStore(tmp_path, key)
    try:
        put(store, record("a", data, public=False), data)
        with sqlite3.connect(tmp_path / "store.db") as db:
            db.execute("UPDATE models SET public = 1")
        (loaded,) = store.records()
        assert loaded.problem is not None and "modified outside" in loaded.problem
    finally:
        store.close()


def test_store_is_locked_to_one_process(tmp_path: Path, key: bytes) -> None:
    store = ModelStore(tmp_path, key)
    try:
        with pytest.raises(StoreError, match="in use by another"):
            ModelStore(tmp_path, key)
    finally:
        store.close()
    ModelStore(tmp_path, key).close()


def test_store_rejects_unknown_crash_point(tmp_path: Path, key: bytes) -> None:
    with pytest.raises(ConfigurationError, match=CRASH_ENV):
        ModelStore(tmp_path, key, crash_point="sometime")


class _NoKeyProvider:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def sealing_key(self) -> bytes | None:
        return None


@pytest.mark.parametrize("kind", ["tdx", "nitro"])
def test_store_refused_without_sealing_key(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ConfigurationError, match="key broker") as caught:
        open_store(_NoKeyProvider(kind), tmp_path / "store")  # type: ignore[arg-type]
    assert "--store" in str(caught.value)
    assert not (tmp_path / "store").exists()


# --- real servers ---


@pytest.fixture()
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def serve(tmp_path: Path, store_dir: Path, **env: str) -> ServerProcess:
    return start_server(tmp_path, "--open-upload", "--store", str(store_dir), env=env)


@pytest.fixture()
def servers() -> Iterator[list[ServerProcess]]:
    """Every server a test starts, stopped at the end whatever happens."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.stop(signal.SIGKILL)


def connect(server: ServerProcess, token: str | None = None) -> blindfold.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blindfold.connect(server.url, allow_simulation=True, token=token)


def run_as(server: ServerProcess, token: str, model: str) -> Any:
    """Runs with `token` as the client's token (it also reads the model's metadata)."""
    with connect(server, token) as client:
        return client.run_model(model, X)["y"]


def restart(
    servers: list[ServerProcess], tmp_path: Path, store_dir: Path, **env: str
) -> tuple[ServerProcess, blindfold.Client]:
    for process in servers:
        process.stop()
    server = serve(tmp_path, store_dir, **env)
    servers.append(server)
    return server, connect(server)


def index(client: blindfold.Client) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in client.list_models()}


def assert_store_consistent(store_dir: Path, client: blindfold.Client) -> None:
    """No temp file, no unreferenced blob, every READY model's blob present."""
    listed = index(client)
    blobs = blob_names(store_dir)
    assert not [name for name in blobs if name.startswith(".tmp-")]
    assert blobs == {f"{row['sha256']}.sealed" for row in listed.values()}


def test_restart_keeps_models_and_access_rules(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    server, client = restart(servers, tmp_path, store_dir)
    public = client.upload_model(model_bytes("public"), name="pub", public=True)
    restricted = client.upload_model(model_bytes("restricted"), name="priv", public=False)
    key_id, run_key = client.create_run_key("priv", token=restricted.owner_token)
    revoked_id, revoked_key = client.create_run_key("priv", token=restricted.owner_token)
    client.revoke_run_key("priv", revoked_id, token=restricted.owner_token)
    replaced = client.upload_model(
        model_bytes("public-v2"), name="pub", token=public.owner_token, public=True
    )
    assert replaced.version == "2"
    client.close()

    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client)
        assert listed["pub"] == {
            "name": "pub",
            "version": "2",
            "state": "READY",
            "sha256": replaced.sha256,
            "public": True,
        }
        assert listed["priv"]["public"] is False and listed["priv"]["state"] == "READY"
        np.testing.assert_array_equal(client.run_model("pub", X)["y"], X)
        with pytest.raises(blindfold.AuthenticationError):
            client.run_model("priv", X)
        np.testing.assert_array_equal(run_as(server, run_key, "priv"), X)
        with pytest.raises(blindfold.AuthenticationError):
            run_as(server, revoked_key, "priv")
        with pytest.raises(blindfold.AuthenticationError):  # not the owner
            client.delete_model("priv", token=run_key)
        # The owner token still works: change access, revoke, delete.
        client.set_public("priv", True, token=restricted.owner_token)
        client.revoke_run_key("priv", key_id, token=restricted.owner_token)
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        assert index(client)["priv"]["public"] is True
        client.delete_model("priv", token=restricted.owner_token)
        client.delete_model("pub", token=public.owner_token)
        assert index(client) == {}
        assert blob_names(store_dir) == set()
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        assert index(client) == {}


def test_identical_bytes_share_one_blob(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    data = model_bytes("shared")
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        first = client.upload_model(data, name="first", public=True)
        second = client.upload_model(data, name="second", public=True)
        assert blob_names(store_dir) == {f"{sha(data)}.sealed"}
        client.delete_model("first", token=first.owner_token)
        assert blob_names(store_dir) == {f"{sha(data)}.sealed"}
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        np.testing.assert_array_equal(client.run_model("second", X)["y"], X)
        client.delete_model("second", token=second.owner_token)
        assert blob_names(store_dir) == set()


def test_without_store_models_live_in_memory_only(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    server = start_server(tmp_path, "--open-upload")
    servers.append(server)
    assert "memory only" in server.log()
    with connect(server) as client:
        client.upload_model(model_bytes("volatile"), name="volatile", public=True)
    server.stop()
    server = start_server(tmp_path, "--open-upload")
    servers.append(server)
    with connect(server) as client:
        assert index(client) == {}


def test_second_server_on_the_same_store_is_refused(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    servers.append(serve(tmp_path, store_dir))
    with pytest.raises(RuntimeError, match="in use by another blindfold server"):
        serve(tmp_path, store_dir)


def _wait_killed(server: ServerProcess) -> None:
    server.process.wait(timeout=60)
    assert server.process.returncode == -signal.SIGKILL, server.log()[-3000:]


@pytest.mark.parametrize(
    ("point", "survives"),
    [
        ("after_blob_write", False),
        ("after_rename", False),
        ("before_db_commit", False),
        ("after_db_commit", True),
    ],
)
def test_sigkill_at_each_write_step_leaves_store_consistent(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess], point: str, survives: bool
) -> None:
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        keep = client.upload_model(model_bytes("keep"), name="keep", public=False)
    server, client = restart(servers, tmp_path, store_dir, **{CRASH_ENV: point})
    new = model_bytes("new")
    with pytest.raises(Exception):  # noqa: B017 - the server dies mid-request
        client.upload_model(new, name="new", public=True)
    _wait_killed(server)
    assert f"crash point {point} reached" in server.log()
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client)
        assert listed["keep"]["state"] == "READY" and listed["keep"]["public"] is False
        with pytest.raises(blindfold.AuthenticationError):
            client.run_model("keep", X)
        client.set_public("keep", True, token=keep.owner_token)
        np.testing.assert_array_equal(client.run_model("keep", X)["y"], X)
        if survives:
            assert listed["new"]["state"] == "READY" and listed["new"]["sha256"] == sha(new)
            np.testing.assert_array_equal(client.run_model("new", X)["y"], X)
        else:
            assert "new" not in listed
            client.upload_model(new, name="new", public=True)  # the name is free again
        assert_store_consistent(store_dir, client)


def test_sigkill_between_delete_commit_and_blob_removal(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        client.upload_model(model_bytes("keep"), name="keep", public=True)
        gone = client.upload_model(model_bytes("gone"), name="gone", public=True)
    server, client = restart(servers, tmp_path, store_dir, **{CRASH_ENV: "after_delete_commit"})
    with pytest.raises(Exception):  # noqa: B017
        client.delete_model("gone", token=gone.owner_token)
    _wait_killed(server)
    assert f"{gone.sha256}.sealed" in blob_names(store_dir)  # left behind by the crash
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        assert set(index(client)) == {"keep"}
        assert_store_consistent(store_dir, client)


def _raw_upload_start(server: ServerProcess, name: str, total: int, first: bytes) -> ssl.SSLSocket:
    """Starts a raw upload over TLS announcing `total` bytes and sends only `first`."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10))
    head = (
        f"POST /v2/repository/models/{name}/load HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {total}\r\n\r\n"
    )
    sock.sendall(head.encode() + first)
    return sock


def test_sigkill_mid_upload_body(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        client.upload_model(model_bytes("keep"), name="keep", public=True)
    data = model_bytes("half")
    sock = _raw_upload_start(server, "half", len(data), data[: len(data) // 2])
    time.sleep(0.5)
    server.stop(signal.SIGKILL)
    sock.close()
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        assert set(index(client)) == {"keep"}
        np.testing.assert_array_equal(client.run_model("keep", X)["y"], X)
        assert_store_consistent(store_dir, client)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_sigkill_at_a_random_moment_of_a_large_upload(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess], delay: float
) -> None:
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        client.upload_model(model_bytes("keep"), name="keep", public=True)
    big = matmul_model(size=1536, seed=int(delay * 100)).SerializeToString()  # ~9 MiB
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            with connect(server) as uploader:
                uploader.upload_model(big, name="big", public=True)
        except BaseException as exc:  # noqa: BLE001 - the server may die at any moment
            errors.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    time.sleep(delay)
    server.stop(signal.SIGKILL)
    thread.join(timeout=60)
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client)
        assert listed["keep"]["state"] == "READY"
        if "big" in listed:  # committed before the kill: then it is whole
            assert listed["big"]["state"] == "READY" and listed["big"]["sha256"] == sha(big)
            out = client.run_model("big", np.ones((1, 1536), np.float32))["y"]
            assert out.shape == (1, 1536)
        assert_store_consistent(store_dir, client)


def _damage_blob(store_dir: Path, digest: str, damage: str, data: bytes) -> None:
    path = store_dir / BLOB_DIR / f"{digest}.sealed"
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x40
    elif damage == "truncate":
        del blob[len(blob) - 7 :]
    elif damage == "foreign":
        blob = bytearray(seal(secrets.token_bytes(32), data, label=blob_label(digest)))
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_damaged_blob_is_refused_and_others_load(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess], damage: str
) -> None:
    victim_bytes, good_bytes = model_bytes("victim"), model_bytes("good")
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        victim = client.upload_model(victim_bytes, name="victim", public=True)
        client.upload_model(good_bytes, name="good", public=True)
    server.stop()
    _damage_blob(store_dir, sha(victim_bytes), damage, victim_bytes)
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client)
        assert listed["good"]["state"] == "READY"
        np.testing.assert_array_equal(client.run_model("good", X)["y"], X)
        assert listed["victim"]["state"] == "UNAVAILABLE"
        assert "does not authenticate" in listed["victim"]["reason"]
        with pytest.raises(blindfold.ServerError, match="unavailable") as caught:
            client.run_model("victim", X)
        assert caught.value.status == 503
        log = server.log()
        assert "stored model 'victim'" in log and "UNAVAILABLE" in log
        assert victim_bytes.hex()[:64] not in log
        # Re-uploading the same bytes heals it; the owner keeps control.
        client.upload_model(victim_bytes, name="victim", token=victim.owner_token, public=True)
        assert index(client)["victim"]["state"] == "READY"
        client.delete_model("victim", token=victim.owner_token)
        assert_store_consistent(store_dir, client)


def test_blobs_under_another_sealing_key_are_refused(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    """A replaced simulation key file stands for another measurement: old blobs are refused,
    models sealed under the new key load, and the server serves throughout."""
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        old = client.upload_model(model_bytes("old"), name="old", public=True)
    server.stop()
    (store_dir / SEALING_KEY_FILE).write_bytes(secrets.token_bytes(32))
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client)
        assert listed["old"]["state"] == "UNAVAILABLE"
        assert "different sealing key" in listed["old"]["reason"]
        assert "different sealing key" in server.log() and "'old'" in server.log()
        client.upload_model(model_bytes("new"), name="new", public=True)
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client)
        assert listed["old"]["state"] == "UNAVAILABLE"
        assert listed["new"]["state"] == "READY"
        np.testing.assert_array_equal(client.run_model("new", X)["y"], X)
        # The stale row's owner hash cannot be authenticated: the deployment (here: open
        # upload) takes the name over with a fresh owner token.
        taken = client.upload_model(
            model_bytes("old"), name="old", token=old.owner_token, public=True
        )
        assert taken.owner_token is not None and taken.owner_token != old.owner_token
        assert index(client)["old"]["state"] == "READY"
        assert_store_consistent(store_dir, client)


def test_access_rules_edited_on_disk_are_refused(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        client.upload_model(model_bytes("secret"), name="secret", public=False)
        client.upload_model(model_bytes("fine"), name="fine", public=True)
    server.stop()
    with sqlite3.connect(store_dir / "store.db") as db:
        db.execute("UPDATE models SET public = 1 WHERE name = 'secret'")
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client)
        assert listed["secret"]["state"] == "UNAVAILABLE"
        assert "modified outside the server" in listed["secret"]["reason"]
        with pytest.raises(blindfold.ServerError, match="unavailable"):
            client.run_model("secret", X)
        np.testing.assert_array_equal(client.run_model("fine", X)["y"], X)


def test_model_bytes_are_sealed_on_disk(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    data = matmul_model(size=64).SerializeToString()
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        client.upload_model(data, name="m", public=True)
    server.stop()
    weights = onnx.load_model_from_string(data).graph.initializer[0].raw_data[:64]
    for path in store_dir.rglob("*"):
        if path.is_file():
            assert weights not in path.read_bytes(), path
    assert os.stat(store_dir / BLOB_DIR / f"{sha(data)}.sealed").st_mode & 0o077 == 0
