"""The sealed persistent model store (`blindfold serve --store DIR`): unit tests of
`blindfold.server.store` against a temp dir, and real server processes that restart, crash
(SIGKILL at each step of a write, and mid-upload) and meet a hostile host: damaged blobs,
rows put back from older copies, whole-store rollbacks, planted triggers and views.

What the rollback tests show: an older copy of the database alone is refused (the epoch file
remembers the newer epoch); an older copy of the database *and* the epoch file together is
NOT detected unless the epoch file lives where the host did not roll it back (`--epoch-file`
on another medium) or a monotonic counter backs it."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
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
from blindfold.server.model_bytes import ModelBytes, memfd_available
from blindfold.server.model_record import ModelRecord
from blindfold.server.scheduler import DEFAULT, SchedulingOptions
from blindfold.server.store import (
    BLOB_DIR,
    CRASH_ENV,
    DB_FILE,
    EPOCH_FILE,
    ModelStore,
    ModelUnavailable,
    StoreError,
    blob_label,
)
from blindfold.server.tee.simulation import SEALING_KEY_FILE

from conftest import ServerProcess, start_server
from helpers import connect
from onnx_models import identity_model, matmul_model
from server_process import kill_worker_of, model_memfds, model_workers, unverified_context
from transports import send

X = np.arange(6, dtype=np.float32).reshape(2, 3)


def model_bytes(tag: str) -> bytes:
    """Distinct ONNX identity models (the graph name changes the bytes)."""
    data: bytes = identity_model(TensorProto.FLOAT, name=tag).SerializeToString()
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- unit tests of the store ---


def record(name: str, data: bytes, **changes: Any) -> ModelRecord:
    fields: dict[str, Any] = dict(
        name=name,
        version=1,
        sha256=sha(data),
        size=len(data),
        owner_token_sha256=sha(b"owner-" + name.encode()),
        public=True,
    )
    fields.update(changes)
    return ModelRecord(**fields)


def put(store: ModelStore, rec: ModelRecord, data: bytes) -> None:
    staged = None if store.has_blob(rec.sha256) else store.stage_blob(rec.sha256, data)
    store.commit_model(rec, staged)


def blob_names(directory: Path) -> set[str]:
    return {p.name for p in (directory / BLOB_DIR).iterdir()}


@pytest.fixture
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


BATCHED = SchedulingOptions(max_batch_size=8, max_queue_delay_us=500, max_concurrency=2)


def test_store_keeps_scheduling_options_under_the_row_mac(tmp_path: Path, key: bytes) -> None:
    data = model_bytes("a")
    store = ModelStore(tmp_path, key)
    put(store, record("a", data, scheduling=BATCHED), data)
    put(store, record("b", data), data)
    store.close()
    store = ModelStore(tmp_path, key)
    try:
        batched, plain = store.records()
        assert batched.problem is None and batched.record.scheduling == BATCHED
        assert plain.problem is None and plain.record.scheduling == DEFAULT
    finally:
        store.close()
    # The host widens a model's batching (or plants options on another): neither authenticates.
    for name, options in (("a", '{"max_batch_size":64}'), ("b", '{"max_concurrency":1}')):
        with sqlite3.connect(tmp_path / DB_FILE) as db:
            db.execute("UPDATE models SET scheduling = ? WHERE name = ?", (options, name))
    for text in ("not json", "[]", '{"max_batch_size":"many"}'):
        with sqlite3.connect(tmp_path / DB_FILE) as db:
            db.execute("UPDATE models SET scheduling = ? WHERE name = 'a'", (text,))
        store = ModelStore(tmp_path, key)
        try:
            loaded = store.records()
            assert [item.problem is not None for item in loaded] == [True, True], text
            assert all(item.record.scheduling == DEFAULT for item in loaded)
            assert "modified outside" in str(loaded[0].problem)
        finally:
            store.close()


def test_store_opens_a_model_into_a_sealed_memfd(tmp_path: Path, key: bytes) -> None:
    """A model restored at start is unsealed straight into a memfd (its plaintext held once);
    a blob that fails part-way leaves no descriptor behind, and the same reason."""
    if not memfd_available():
        pytest.skip("this platform has no memfd (the store then returns bytes)")
    data = model_bytes("a") + b"\x00" * (3 << 20)  # several sealed chunks
    rec = record("a", data)
    store = ModelStore(tmp_path, key)
    try:
        put(store, rec, data)
        opened = store.open_model(rec, 8 << 20)
        assert isinstance(opened, ModelBytes) and opened.sha256 == rec.sha256
        with opened.view() as view:
            assert view == data
        opened.close()
        blob = store.blob_path(rec.sha256)
        damaged = bytearray(blob.read_bytes())
        damaged[len(damaged) // 2] ^= 1
        blob.write_bytes(bytes(damaged))
        descriptors = len(os.listdir("/proc/self/fd"))
        for reader in (store.open_model, store.read_model):
            with pytest.raises(ModelUnavailable, match="was refused"):
                reader(rec, 8 << 20)
        assert len(os.listdir("/proc/self/fd")) == descriptors
    finally:
        store.close()


STORE_V2 = Path(__file__).parent / "data" / "store-v2"
STORE_V2_KEY = bytes(range(32))  # the key the fixture was written under (tests/data/README)


def test_store_migrates_a_version_2_store_and_loses_nothing(tmp_path: Path) -> None:
    """A store written by the build before scheduling options were kept (schema version 2,
    committed as written by that build) opens: its row and run keys still authenticate, the
    schema becomes version 3 in place, and the new column then holds options."""
    if not STORE_V2.is_dir():
        pytest.skip(f"the version 2 store fixture {STORE_V2} is missing")
    directory = tmp_path / "store"
    shutil.copytree(STORE_V2, directory)
    with sqlite3.connect(directory / DB_FILE) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            "2",
        )
    store = ModelStore(directory, STORE_V2_KEY)
    try:
        (loaded,) = store.records()
        assert loaded.problem is None
        assert loaded.record.name == "written-by-v2" and loaded.record.version == 3
        assert loaded.record.run_keys == {"k1": sha(b"run")}
        assert loaded.record.scheduling == DEFAULT
        data = store.read_model(loaded.record, 1 << 20)
        assert sha(data) == loaded.record.sha256
        epoch = store.epoch
        store.update_rules(replace(loaded.record, scheduling=BATCHED, public=True))
        assert store.epoch == epoch + 1
    finally:
        store.close()
    with sqlite3.connect(directory / DB_FILE) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            "3",
        )
    store = ModelStore(directory, STORE_V2_KEY)
    try:
        (loaded,) = store.records()
        assert loaded.problem is None and loaded.record.scheduling == BATCHED
        assert loaded.record.public is True
    finally:
        store.close()


def test_store_of_version_2_with_a_planted_column_is_refused(tmp_path: Path) -> None:
    """Only the exact schema of a known version is migrated: a version 2 store that the host
    gave an extra column (or the version 3 column under a version 2 label) is refused whole."""
    if not STORE_V2.is_dir():
        pytest.skip(f"the version 2 store fixture {STORE_V2} is missing")
    for statement in (
        "ALTER TABLE models ADD COLUMN extra TEXT",
        "UPDATE meta SET value = '3' WHERE key = 'schema_version'",
    ):
        directory = tmp_path / secrets.token_hex(4)
        shutil.copytree(STORE_V2, directory)
        with sqlite3.connect(directory / DB_FILE) as db:
            db.execute(statement)
        before = snapshot(directory)
        with pytest.raises(StoreError, match="schema"):
            ModelStore(directory, STORE_V2_KEY)
        assert snapshot(directory) == before


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


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a store (to show that a refused store was left untouched). SQLite's
    shared-memory index (a cache any reader rebuilds) and an empty WAL (which a reader
    creates) hold no data, so they are left out."""
    files = {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != "store.lock" and not path.name.endswith("-shm")
    }
    return {name: data for name, data in files.items() if data or not name.endswith("-wal")}


def test_store_under_another_key_is_refused_whole(tmp_path: Path, key: bytes) -> None:
    data = model_bytes("a")
    store = ModelStore(tmp_path, key)
    put(store, record("a", data), data)
    store.close()
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="different sealing key") as caught:
        ModelStore(tmp_path, secrets.token_bytes(32))
    assert "nothing was changed" in str(caught.value)
    assert snapshot(tmp_path) == before
    store = ModelStore(tmp_path, key)  # the right key still opens it
    try:
        assert [loaded.problem for loaded in store.records()] == [None]
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
        # What is shown comes from the manifest: no access rule of the edited row.
        assert loaded.record.public is False and loaded.record.run_keys == {}
        assert loaded.record.owner_token_sha256 == sha(b"owner-a")
    finally:
        store.close()


def _rows(db_path: Path, name: str) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    with sqlite3.connect(db_path) as db:
        row = db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        keys = db.execute("SELECT * FROM run_keys WHERE model = ?", (name,)).fetchall()
    return row, keys


def _put_back(db_path: Path, name: str, row: tuple[Any, ...], keys: list[Any]) -> None:
    """The host's edit: replace one model's row and run keys with an older copy."""
    db = sqlite3.connect(db_path)
    try:
        with db:
            db.execute("DELETE FROM run_keys WHERE model = ?", (name,))
            db.execute("DELETE FROM models WHERE name = ?", (name,))
            placeholders = ", ".join("?" * len(row))  # values are bound, never formatted in
            db.execute(f"INSERT INTO models VALUES ({placeholders})", row)  # noqa: S608
            db.executemany("INSERT INTO run_keys VALUES (?, ?, ?)", keys)
    finally:
        db.close()


def test_store_refuses_one_row_put_back_from_an_older_copy(tmp_path: Path, key: bytes) -> None:
    data, other = model_bytes("a"), model_bytes("other")
    store = ModelStore(tmp_path, key)
    try:
        put(store, record("a", data, run_keys={"k1": sha(b"run")}), data)
        put(store, record("other", other), other)
        old_row, old_keys = _rows(tmp_path / DB_FILE, "a")
        store.update_rules(record("a", data, public=False))  # restricted, key revoked
        _put_back(tmp_path / DB_FILE, "a", old_row, old_keys)
        loaded = {item.record.name: item for item in store.records()}
        problem = loaded["a"].problem
        assert problem is not None and "older copy was put back" in problem
        assert loaded["a"].record.public is False and loaded["a"].record.run_keys == {}
        assert loaded["other"].problem is None
    finally:
        store.close()
    # Still refused after a restart and after unrelated changes.
    store = ModelStore(tmp_path, key)
    try:
        put(store, record("third", model_bytes("third")), model_bytes("third"))
        store.close()
        store = ModelStore(tmp_path, key)
        problems = {item.record.name: item.problem for item in store.records()}
        assert problems["a"] is not None and problems["other"] is None
        assert problems["third"] is None
    finally:
        store.close()


def test_store_refuses_planted_and_reports_deleted_rows(tmp_path: Path, key: bytes) -> None:
    data, gone = model_bytes("a"), model_bytes("gone")
    store = ModelStore(tmp_path, key)
    try:
        put(store, record("gone", gone), gone)
        put(store, record("a", data), data)
        row, keys = _rows(tmp_path / DB_FILE, "a")
        store.delete_model("a")
        _put_back(tmp_path / DB_FILE, "a", row, keys)  # a deleted model comes back
        with sqlite3.connect(tmp_path / DB_FILE) as db:
            db.execute("DELETE FROM models WHERE name = 'gone'")
        loaded = {item.record.name: item for item in store.records()}
        assert "not in the store's manifest" in str(loaded["a"].problem)
        assert loaded["a"].record.owner_token_sha256 == ""  # nobody owns a planted row
        assert "missing from the store database" in str(loaded["gone"].problem)
        assert loaded["gone"].record.sha256 == sha(gone)
        assert store.recover() == []  # the manifest still references the blob of 'gone'
        store.delete_model("gone")  # an owner's delete also clears the manifest entry
        assert "gone" not in {item.record.name for item in store.records()}
        assert f"{sha(gone)}.sealed" not in blob_names(tmp_path)
    finally:
        store.close()


def _copy_db(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", EPOCH_FILE):
        path = source / name
        (target / name).unlink(missing_ok=True)
        if path.exists():
            (target / name).write_bytes(path.read_bytes())


def test_store_refuses_an_older_database(tmp_path: Path, key: bytes) -> None:
    store_dir, old = tmp_path / "store", tmp_path / "old"
    data = model_bytes("a")
    store = ModelStore(store_dir, key)
    put(store, record("a", data, run_keys={"k1": sha(b"run")}), data)
    store.close()
    _copy_db(store_dir, old)
    store = ModelStore(store_dir, key)
    store.update_rules(record("a", data))  # revokes k1: epoch + 1
    epoch = store.epoch
    store.close()
    _copy_db_only(old, store_dir)  # the database alone goes back
    before = snapshot(store_dir)
    with pytest.raises(StoreError, match=f"older than epoch {epoch}") as caught:
        ModelStore(store_dir, key)
    assert "revoked run keys" in str(caught.value)
    assert snapshot(store_dir) == before  # refused: nothing changed or deleted
    # Deliberately restoring a backup: the loudly named reset accepts it.
    store = ModelStore(store_dir, key, unsafe_reset_epoch=True)
    store.close()
    ModelStore(store_dir, key).close()


def test_store_refuses_a_deleted_database_or_epoch_file(tmp_path: Path, key: bytes) -> None:
    data = model_bytes("a")
    store = ModelStore(tmp_path, key)
    put(store, record("a", data), data)
    store.close()
    (tmp_path / EPOCH_FILE).rename(tmp_path / "epoch.saved")
    with pytest.raises(StoreError, match="holds none: it was deleted or moved"):
        ModelStore(tmp_path, key)
    (tmp_path / "epoch.saved").rename(tmp_path / EPOCH_FILE)
    for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(StoreError, match="missing or empty"):
        ModelStore(tmp_path, key)
    assert f"{sha(data)}.sealed" in blob_names(tmp_path)  # no blob lost


def test_store_refuses_a_forged_epoch_file(tmp_path: Path, key: bytes) -> None:
    ModelStore(tmp_path, key).close()
    other = tmp_path / "other"
    ModelStore(other, key).close()
    (tmp_path / EPOCH_FILE).write_bytes((other / EPOCH_FILE).read_bytes())
    with pytest.raises(StoreError, match="belongs to another store"):
        ModelStore(tmp_path, key)
    (tmp_path / EPOCH_FILE).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="does not authenticate"):
        ModelStore(tmp_path, key)


def test_store_epoch_file_elsewhere(tmp_path: Path, key: bytes) -> None:
    """--epoch-file on another medium: rolling back the store's folder is then detected."""
    store_dir, medium = tmp_path / "store", tmp_path / "medium"
    medium.mkdir()
    data = model_bytes("a")
    store = ModelStore(store_dir, key, epoch_file=medium / "epoch")
    put(store, record("a", data), data)
    store.close()
    assert not (store_dir / EPOCH_FILE).exists()
    _copy_db(store_dir, tmp_path / "old")
    store = ModelStore(store_dir, key, epoch_file=medium / "epoch")
    store.delete_model("a")
    store.close()
    (store_dir / f"{DB_FILE}-wal").unlink(missing_ok=True)
    _copy_db(tmp_path / "old", store_dir)
    with pytest.raises(StoreError, match="older than epoch"):
        ModelStore(store_dir, key, epoch_file=medium / "epoch")


class _Counter:
    """An external monotonic counter (in a real deployment: one the host cannot rewind)."""

    description = "the test counter"

    def __init__(self) -> None:
        self.value: int | None = None

    def read(self) -> int | None:
        return self.value

    def advance(self, epoch: int) -> None:
        assert self.value is None or epoch >= self.value
        self.value = epoch


def test_store_external_counter_catches_rollback_of_db_and_epoch_file(
    tmp_path: Path, key: bytes
) -> None:
    counter = _Counter()
    store_dir = tmp_path / "store"
    data = model_bytes("a")
    store = ModelStore(store_dir, key, external_counter=counter)
    put(store, record("a", data), data)
    store.close()
    _copy_db(store_dir, tmp_path / "old")  # database and epoch file
    store = ModelStore(store_dir, key, external_counter=counter)
    store.delete_model("a")
    store.close()
    assert counter.value == 2
    (store_dir / f"{DB_FILE}-wal").unlink(missing_ok=True)
    _copy_db(tmp_path / "old", store_dir)
    ModelStore(store_dir, key).close()  # the sealed file alone cannot tell (documented)
    with pytest.raises(StoreError, match=r"older than epoch 2 .*the test counter"):
        ModelStore(store_dir, key, external_counter=counter)


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        (
            "CREATE TRIGGER spy AFTER UPDATE ON models BEGIN UPDATE models SET public = 1; END",
            "trigger 'spy'",
        ),
        ("CREATE VIEW everything AS SELECT * FROM models", "view 'everything'"),
        ("CREATE INDEX extra ON run_keys(token_sha256)", "index 'extra'"),
        ("CREATE TABLE models2 (x)", "table 'models2'"),
        ("DROP INDEX models_sha256", "index 'models_sha256'"),
    ],
)
def test_store_refuses_a_schema_it_did_not_create(
    tmp_path: Path, key: bytes, statement: str, named: str
) -> None:
    data = model_bytes("a")
    store = ModelStore(tmp_path, key)
    put(store, record("a", data), data)
    store.close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute(statement)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="does not have the schema") as caught:
        ModelStore(tmp_path, key)
    assert named in str(caught.value)
    assert snapshot(tmp_path) == before


def test_store_opens_sqlite_defensively(tmp_path: Path, key: bytes) -> None:
    store = ModelStore(tmp_path, key)
    try:
        db = store._db
        assert db.execute("PRAGMA trusted_schema").fetchone() == (0,)
        assert db.execute("PRAGMA cell_size_check").fetchone() == (1,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        store.close()


def test_store_refuses_a_file_that_is_not_a_database(tmp_path: Path, key: bytes) -> None:
    (tmp_path / DB_FILE).write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="cannot open the store database"):
        ModelStore(tmp_path, key)


def test_store_refuses_a_manifest_edited_outside(tmp_path: Path, key: bytes) -> None:
    ModelStore(tmp_path, key).close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute(
            "UPDATE meta SET value = replace(value, '\"epoch\":0', '\"epoch\":9') "
            "WHERE key = 'manifest'"
        )
    with pytest.raises(StoreError, match=r"manifest .* does not authenticate"):
        ModelStore(tmp_path, key)


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


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def serve(tmp_path: Path, store_dir: Path, *extra: str, **env: str) -> ServerProcess:
    return start_server(tmp_path, "--open-upload", "--store", str(store_dir), *extra, env=env)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Every server a test starts, stopped at the end whatever happens."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.stop(signal.SIGKILL)


def run_as(server: ServerProcess, token: str, model: str) -> Any:
    """Runs with `token` as the client's token (it also reads the model's metadata)."""
    with connect(server, token) as client:
        return client.run_model(model, X)["y"]


def restart(
    servers: list[ServerProcess], tmp_path: Path, store_dir: Path, *extra: str, **env: str
) -> tuple[ServerProcess, blindfold.Client]:
    for process in servers:
        process.stop()
    server = serve(tmp_path, store_dir, *extra, **env)
    servers.append(server)
    return server, connect(server)


def index(client: blindfold.Client, token: str | None = None) -> dict[str, dict[str, Any]]:
    """The repository index as `token` (default: the client's) sees it."""
    response = send(client, "POST", "/v2/repository/index", b"{}", token=token or client.token)
    assert response.status == 200, response.body
    rows = json.loads(response.body)
    return {row["name"]: row for row in rows}


def assert_store_consistent(
    store_dir: Path, client: blindfold.Client, token: str | None = None
) -> None:
    """No temp file, no unreferenced blob, every READY model's blob present (as far as
    `token` may see: restricted models are listed only to those who may run them)."""
    listed = index(client, token)
    blobs = blob_names(store_dir)
    assert not [name for name in blobs if name.startswith(".tmp-")]
    assert not list(store_dir.glob(f"{EPOCH_FILE}.tmp-*"))
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
        assert "priv" not in listed  # restricted: listed only for its owner and run keys
        listed = index(client, restricted.owner_token)
        assert listed["priv"]["public"] is False and listed["priv"]["state"] == "READY"
        np.testing.assert_array_equal(client.run_model("pub", X)["y"], X)
        with pytest.raises(blindfold.NotFoundError):  # restricted: hidden without a token
            client.run_model("priv", X)
        np.testing.assert_array_equal(run_as(server, run_key, "priv"), X)
        with pytest.raises(blindfold.NotFoundError):
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


def test_restart_keeps_scheduling_options(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    """Dynamic batching chosen at upload survives a restart, and a replacement without
    options keeps them (as it does without a store)."""
    _server, client = restart(servers, tmp_path, store_dir)
    uploaded = client.upload_model(
        model_bytes("batched"), name="batched", max_batch_size=4, max_queue_delay_us=200
    )
    assert uploaded.scheduling is not None and uploaded.scheduling["max_batch_size"] == 4
    client.close()
    for tag in ("restart", "replaced"):
        _server, client = restart(servers, tmp_path, store_dir)
        with client:
            scheduling = client.model_metadata("batched", token=uploaded.owner_token).get(
                "scheduling"
            )
            assert scheduling is not None, tag
            assert scheduling["max_batch_size"] == 4 and scheduling["max_queue_delay_us"] == 200
            np.testing.assert_array_equal(
                client.run_model("batched", X, token=uploaded.owner_token)["y"], X
            )
            if tag == "restart":
                client.upload_model(
                    model_bytes("batched-v2"), name="batched", token=uploaded.owner_token
                )


def test_restart_keeps_warmup_shapes_and_warms_before_serving(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    """The configured warm-up shapes are in the model's row: after a restart the metadata
    shows them and the restored model is warmed on them before the server answers."""
    from test_warmup import image_model

    _server, client = restart(servers, tmp_path, store_dir)
    uploaded = client.upload_model(image_model(), name="warm", warmup_shapes={"x": [1, 3, 4, 4]})
    assert uploaded.warmup == "ok"
    client.close()
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        metadata = client.model_metadata("warm", token=uploaded.owner_token)
        assert metadata["scheduling"]["warmup_shapes"] == {"x": [1, 3, 4, 4]}
    assert (
        f"model 'warm' (sha256:{uploaded.sha256}) warmed up on its configured warmup_shapes "
        "1x3x4x4 before ready" in server.log()
    )


def test_identical_bytes_share_one_blob(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    data = model_bytes("shared")
    _server, client = restart(servers, tmp_path, store_dir)
    with client:
        first = client.upload_model(data, name="first", public=True)
        second = client.upload_model(data, name="second", public=True)
        assert blob_names(store_dir) == {f"{sha(data)}.sealed"}
        client.delete_model("first", token=first.owner_token)
        assert blob_names(store_dir) == {f"{sha(data)}.sealed"}
    _server, client = restart(servers, tmp_path, store_dir)
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
        ("after_manifest_commit", True),
        ("epoch_file_staged", True),
        ("after_epoch_update", True),
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
    with pytest.raises(Exception):  # noqa: B017, PT011 - the server dies mid-request
        client.upload_model(new, name="new", public=True)
    _wait_killed(server)
    assert f"crash point {point} reached" in server.log()
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client, keep.owner_token)
        assert listed["keep"]["state"] == "READY" and listed["keep"]["public"] is False
        with pytest.raises(blindfold.NotFoundError):
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
    with pytest.raises(Exception):  # noqa: B017, PT011 - the server dies mid-request
        client.delete_model("gone", token=gone.owner_token)
    _wait_killed(server)
    assert f"{gone.sha256}.sealed" in blob_names(store_dir)  # left behind by the crash
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        assert set(index(client)) == {"keep"}
        assert_store_consistent(store_dir, client)


def _raw_upload_start(server: ServerProcess, name: str, total: int, first: bytes) -> ssl.SSLSocket:
    """Starts a raw upload over TLS announcing `total` bytes and sends only `first`."""
    context = unverified_context()
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
        except BaseException as exc:
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


def test_store_under_another_sealing_key_is_refused_and_kept(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    """A replaced simulation key file stands for another measurement: the server refuses the
    whole store with a clear message, changes nothing, and serves it again with the old key."""
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        client.upload_model(model_bytes("old"), name="old", public=True)
    server.stop()
    original = (store_dir / SEALING_KEY_FILE).read_bytes()
    (store_dir / SEALING_KEY_FILE).write_bytes(secrets.token_bytes(32))
    before = snapshot(store_dir)
    with pytest.raises(RuntimeError, match="different sealing key"):
        serve(tmp_path, store_dir)
    assert snapshot(store_dir) == before
    (store_dir / SEALING_KEY_FILE).write_bytes(original)
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        np.testing.assert_array_equal(client.run_model("old", X)["y"], X)


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


@pytest.mark.parametrize(
    "point",
    ["before_db_commit", "after_manifest_commit", "epoch_file_staged", "after_epoch_update"],
)
def test_sigkill_while_revoking_a_run_key(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess], point: str
) -> None:
    """A crash around the manifest and epoch update never makes the store look rolled back:
    the revocation is either not made (before the commit) or durable."""
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        owned = client.upload_model(model_bytes("m"), name="m", public=False)
        key_id, run_key = client.create_run_key("m", token=owned.owner_token)
    server, client = restart(servers, tmp_path, store_dir, **{CRASH_ENV: point})
    with pytest.raises(Exception):  # noqa: B017, PT011 - the server dies mid-request
        client.revoke_run_key("m", key_id, token=owned.owner_token)
    _wait_killed(server)
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        assert index(client, owned.owner_token)["m"]["state"] == "READY"
        if point == "before_db_commit":
            np.testing.assert_array_equal(run_as(server, run_key, "m"), X)
        else:
            with pytest.raises(blindfold.NotFoundError):  # a revoked key sees no model
                run_as(server, run_key, "m")
        assert_store_consistent(store_dir, client, owned.owner_token)
    server, client = restart(servers, tmp_path, store_dir)  # and it stays acceptable
    client.close()


# --- the host attacks the store as a whole ---


def test_one_row_put_back_from_an_older_copy_is_refused(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    """The host puts back one model's older row (public, with a since revoked run key)."""
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        owned = client.upload_model(model_bytes("m"), name="m", public=True)
        client.upload_model(model_bytes("other"), name="other", public=True)
        key_id, run_key = client.create_run_key("m", token=owned.owner_token)
    server.stop()
    old_row, old_keys = _rows(store_dir / DB_FILE, "m")
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        client.set_public("m", False, token=owned.owner_token)
        client.revoke_run_key("m", key_id, token=owned.owner_token)
    server.stop()
    _put_back(store_dir / DB_FILE, "m", old_row, old_keys)
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client)
        assert listed["m"]["state"] == "UNAVAILABLE" and listed["m"]["public"] is False
        assert "older copy was put back" in listed["m"]["reason"]
        assert "'m'" in server.log() and "older copy" in server.log()
        with pytest.raises(blindfold.ServerError) as caught:  # not public again
            client.run_model("m", X)
        assert caught.value.status == 503
        with pytest.raises(blindfold.ServerError):  # the revoked key stays revoked
            run_as(server, run_key, "m")
        np.testing.assert_array_equal(client.run_model("other", X)["y"], X)
        # Open upload cannot take the name; the owner the manifest names can.
        with pytest.raises(blindfold.AuthenticationError):
            client.upload_model(model_bytes("thief"), name="m", public=True)
        again = client.upload_model(
            model_bytes("m"), name="m", public=False, token=owned.owner_token
        )
        assert again.owner_token is None  # the owner keeps the token they hold
        assert index(client, owned.owner_token)["m"]["state"] == "READY"
        with pytest.raises(blindfold.ServerError):
            run_as(server, run_key, "m")
        client.delete_model("m", token=owned.owner_token)
        assert_store_consistent(store_dir, client)


def _hashed_key_file(path: Path, key: str) -> Path:
    path.write_text(f"sha256:{sha(key.encode())}\n")
    return path


@pytest.mark.parametrize("damage", ["edit", "plant"])
def test_damaged_row_only_its_owner_or_an_admin_key_may_take_the_name(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess], damage: str
) -> None:
    upload_key, admin_key = secrets.token_hex(32), secrets.token_hex(32)
    keys = [
        "--upload-key-file",
        str(_hashed_key_file(tmp_path / "upload-keys", upload_key)),
        "--admin-key-file",
        str(_hashed_key_file(tmp_path / "admin-keys", admin_key)),
        "--store",
        str(store_dir),
    ]
    server = start_server(tmp_path, *keys)
    servers.append(server)
    with connect(server, upload_key) as uploader:
        victim = uploader.upload_model(model_bytes("victim"), name="victim", public=False)
        uploader.upload_model(model_bytes("good"), name="good", public=True)
    server.stop()
    with sqlite3.connect(store_dir / DB_FILE) as db:
        if damage == "edit":  # the host makes the restricted model public
            db.execute("UPDATE models SET public = 1 WHERE name = 'victim'")
        else:  # the host plants a model nobody uploaded (from another model's row)
            db.execute("UPDATE models SET name = 'planted' WHERE name = 'good'")
    name = "victim" if damage == "edit" else "planted"
    server = start_server(tmp_path, *keys)
    servers.append(server)
    listed = index(connect(server, upload_key), upload_key)
    assert listed[name]["state"] == "UNAVAILABLE"
    assert listed[name]["public"] is False
    for token in (upload_key, None):
        with connect(server, token) as other:
            with pytest.raises(blindfold.AuthenticationError) as caught:
                other.upload_model(model_bytes("thief"), name=name, public=True)
            assert caught.value.status == (403 if token else 401)
            with pytest.raises(blindfold.AuthenticationError):
                other.delete_model(name)
    server.stop()
    # Open upload does not open a damaged model's name either.
    server = start_server(tmp_path, "--open-upload", *keys)
    servers.append(server)
    for token in (None, secrets.token_hex(32)):
        with connect(server, token) as anyone:
            with pytest.raises(blindfold.AuthenticationError) as caught:
                anyone.upload_model(model_bytes("thief"), name=name, public=True)
            assert caught.value.status == (403 if token else 401)
    if damage == "edit":  # the manifest still names the owner
        with connect(server, victim.owner_token) as owner:
            owner.delete_model(name)
        assert name not in index(connect(server))
    else:  # nobody owns a planted row: the operator's admin key takes the name
        with (
            connect(server, victim.owner_token) as owner,
            pytest.raises(blindfold.AuthenticationError),
        ):
            owner.delete_model(name)
        with connect(server, admin_key) as admin:
            taken = admin.upload_model(model_bytes("fresh"), name=name, public=True)
        assert taken.owner_token is not None
        assert index(connect(server))[name]["state"] == "READY"
        with connect(server, taken.owner_token) as new_owner:
            np.testing.assert_array_equal(new_owner.run_model(name, X)["y"], X)
            new_owner.delete_model(name)


def _copy_db_only(source: Path, target: Path) -> None:
    for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"):
        (target / name).unlink(missing_ok=True)
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())


def test_rollback_of_the_whole_store(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    """What is and is not detected: the database alone put back -> refused; the database and
    the epoch file put back together -> NOT detected (the revoked key works again), unless
    the epoch file sits on a medium the host did not roll back (--epoch-file)."""
    medium = tmp_path / "medium"
    medium.mkdir()
    for epoch_args in ((), ("--epoch-file", str(medium / "epoch"))):
        for process in servers:
            process.stop()
        shutil.rmtree(store_dir, ignore_errors=True)
        server, client = restart(servers, tmp_path, store_dir, *epoch_args)
        with client:
            owned = client.upload_model(model_bytes("m"), name="m", public=False)
            key_id, run_key = client.create_run_key("m", token=owned.owner_token)
            client.upload_model(model_bytes("kept"), name="kept", public=True)
        server.stop()
        old = tmp_path / f"old-{len(epoch_args)}"
        _copy_db(store_dir, old)
        server, client = restart(servers, tmp_path, store_dir, *epoch_args)
        with client:
            client.revoke_run_key("m", key_id, token=owned.owner_token)
        server.stop()
        if not epoch_args:
            _copy_db_only(old, store_dir)
            before = snapshot(store_dir)
            with pytest.raises(RuntimeError, match="older copy of its database"):
                serve(tmp_path, store_dir)
            assert snapshot(store_dir) == before  # refused; no model lost
            _copy_db(old, store_dir)  # now the epoch file too
            server, client = restart(servers, tmp_path, store_dir)
            with client:  # NOT detected: the documented limit of a counter on the host's disk
                np.testing.assert_array_equal(run_as(server, run_key, "m"), X)
        else:
            _copy_db(old, store_dir)  # the whole store folder, with its own (unused) files
            with pytest.raises(RuntimeError, match="older copy of its database"):
                serve(tmp_path, store_dir, *epoch_args)
            # An operator restoring this backup on purpose says so, loudly.
            server, client = restart(
                servers, tmp_path, store_dir, *epoch_args, "--unsafe-reset-store-epoch"
            )
            assert "UNSAFE: --unsafe-reset-store-epoch" in server.log()
            with client:
                np.testing.assert_array_equal(run_as(server, run_key, "m"), X)
            server, client = restart(servers, tmp_path, store_dir, *epoch_args)
            client.close()


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        (
            "CREATE TRIGGER leak AFTER UPDATE ON models BEGIN UPDATE models SET public = 1; END",
            "trigger 'leak'",
        ),
        ("CREATE VIEW peek AS SELECT name, owner_token_sha256 FROM models", "view 'peek'"),
    ],
)
def test_planted_schema_objects_refuse_the_store_and_lose_nothing(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess], statement: str, named: str
) -> None:
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        client.upload_model(model_bytes("a"), name="a", public=True)
        b = client.upload_model(model_bytes("b"), name="b", public=False)
    server.stop()
    with sqlite3.connect(store_dir / DB_FILE) as db:
        db.execute(statement)
    before = snapshot(store_dir)
    with pytest.raises(RuntimeError, match="does not have the schema this server creates") as err:
        serve(tmp_path, store_dir)
    assert named in str(err.value)
    assert snapshot(store_dir) == before
    with sqlite3.connect(store_dir / DB_FILE) as db:  # the operator removes it
        kind, object_name = named.split(" ")
        db.execute(f"DROP {kind.upper()} {object_name.strip(chr(39))}")
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        listed = index(client, b.owner_token)
        assert {row["state"] for row in listed.values()} == {"READY"}
        assert set(listed) == {"a", "b"}


# --- a stored model is held once in memory: restart copies come from the sealed blob ---


@pytest.mark.skipif(not memfd_available(), reason="memfd is Linux only")
def test_a_stored_model_is_held_once_and_its_worker_restarts_from_the_store(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    """With --store the front keeps no second copy of a model in memory: once the model is
    durable its sealed memfd is closed, and a worker that dies is restarted from the store's
    blob (unsealed for that start only). The same after a restart of the server."""
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        before = model_workers(server.process.pid)
        client.upload_model(matmul_model(64), name="held", public=True)
        assert model_memfds(server.process.pid) == []
        x = np.ones((1, 64), np.float32)
        expected = client.run_model("held", x)["y"]
        kill_worker_of(server, before)
        np.testing.assert_array_equal(client.run_model("held", x)["y"], expected)
        assert model_memfds(server.process.pid) == []
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        assert model_memfds(server.process.pid) == []
        np.testing.assert_array_equal(client.run_model("held", x)["y"], expected)
        kill_worker_of(server, set())
        np.testing.assert_array_equal(client.run_model("held", x)["y"], expected)


@pytest.mark.skipif(not memfd_available(), reason="memfd is Linux only")
def test_a_blob_changed_under_a_running_model_fails_its_restart_clearly(
    tmp_path: Path, store_dir: Path, servers: list[ServerProcess]
) -> None:
    """A hostile host edits a served model's blob, then the model's worker dies: the
    restart refuses the blob with a 503 naming the problem and what to do, no other model
    is affected, and uploading the model again heals it."""
    victim_bytes, good_bytes = model_bytes("victim-live"), model_bytes("good-live")
    server, client = restart(servers, tmp_path, store_dir)
    with client:
        before = model_workers(server.process.pid)
        victim = client.upload_model(victim_bytes, name="victim", public=True)
        known = model_workers(server.process.pid)
        client.upload_model(good_bytes, name="good", public=True)
        np.testing.assert_array_equal(client.run_model("victim", X)["y"], X)
        _damage_blob(store_dir, sha(victim_bytes), "flip", victim_bytes)
        kill_worker_of(server, before | (model_workers(server.process.pid) - known))
        with pytest.raises(blindfold.ServerError) as refused:
            client.run_model("victim", X)
        assert refused.value.status == 503
        assert "must be reloaded from the model store" in refused.value.message
        assert "upload it again" in refused.value.message
        assert victim_bytes.hex()[:64] not in server.log()
        np.testing.assert_array_equal(client.run_model("good", X)["y"], X)
        client.upload_model(victim_bytes, name="victim", token=victim.owner_token, public=True)
        np.testing.assert_array_equal(client.run_model("victim", X)["y"], X)
