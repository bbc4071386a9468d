"""The sealed persistent model store behind `blindfold serve --store DIR`.

Layout of DIR::

    store.db, store.db-wal, store.db-shm   SQLite (WAL, synchronous=FULL): models, run keys
                                           (journal "delete": store.db-journal instead)
    blobs/<sha256>.sealed                  model bytes sealed under the TEE's sealing key
    blobs/.tmp-*                           blobs being written (removed at the next start)
    store.lock                             flock: one server process per store
    INSECURE-simulation-sealing.key        simulation TEE only: the key, in the clear

Model bytes are sealed with `blindfold.sealing` (AES-256-GCM, chunked) under the key that only
a TEE with the same measurement derives, with the label `blindfold-store-model:<sha256>`: a
blob moved under another model's row, truncated, modified or sealed under another key does
not authenticate. Identical bytes share one blob; a blob is deleted when no row references it.

The host owns the disk, so the metadata is authenticated too: every model row carries an
HMAC (under a key derived from the sealing key) over the name, version, hash, size, owner
token hash, access flag and run keys. A row edited outside the server (say, to make a model
public or to add a run key) no longer authenticates and its model is refused. What the MAC
cannot stop is a rollback of the whole store to an older copy (for example, reinstating a
revoked run key); that needs a monotonic counter the TEEs here do not offer.

Crash safety: a model becomes visible only after it is durable. Writing is
temp file -> fsync -> rename to `<sha256>.sealed` -> fsync the directory -> SQLite transaction
(row + run keys) -> commit. A crash before the commit leaves at most a temp file or an
unreferenced blob, both removed by `recover()` at the next start; after the commit the model
is fully there. Deleting is the reverse: the row goes first, then the blob.

`BLINDFOLD_TEST_CRASH_POINT` (test-only) makes the process SIGKILL itself at one of
`CRASH_POINTS`, so tests can check the store after a crash at each step.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindfold.errors import BlindfoldError, ConfigurationError, SealError
from blindfold.sealing import KEY_SIZE, seal_into, unseal_to_bytes

logger = logging.getLogger("blindfold.store")

DB_FILE = "store.db"
BLOB_DIR = "blobs"
LOCK_FILE = "store.lock"
BLOB_SUFFIX = ".sealed"
TEMP_PREFIX = ".tmp-"
SCHEMA_VERSION = 1
BLOB_LABEL_PREFIX = "blindfold-store-model:"
_MAC_INFO = b"blindfold-store/metadata-mac/v1"
_KEY_CHECK_MESSAGE = b"blindfold-store/key-check/v1"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

CRASH_ENV = "BLINDFOLD_TEST_CRASH_POINT"
CRASH_POINTS = frozenset(
    {
        "after_blob_write",  # temp file written and fsynced, not renamed
        "after_rename",  # blob in place, no row yet
        "before_db_commit",  # row inserted inside the open transaction
        "after_db_commit",  # row committed, the server has not answered yet
        "after_delete_commit",  # row deleted, blob not yet removed
    }
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    owner_token_sha256 TEXT NOT NULL,
    public INTEGER NOT NULL,
    created REAL NOT NULL,
    mac TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_keys (
    model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
    key_id TEXT NOT NULL,
    token_sha256 TEXT NOT NULL,
    PRIMARY KEY (model, key_id)
);
CREATE INDEX IF NOT EXISTS models_sha256 ON models(sha256);
"""


class StoreError(BlindfoldError):
    """The store cannot be opened or written (disk full, permissions, another server)."""


class ModelUnavailable(BlindfoldError):
    """A stored model cannot be served; the message names it and says why, never its bytes."""

    def __init__(self, name: str, sha256: str, reason: str) -> None:
        self.name = name
        self.sha256 = sha256
        self.reason = reason
        super().__init__(f"stored model {name!r} (sha256 {sha256}) is unavailable: {reason}")


@dataclass(frozen=True)
class StoredModel:
    """One row of the store: a model's identity and access rules (token hashes only)."""

    name: str
    version: int
    sha256: str
    size: int
    owner_token_sha256: str
    public: bool
    created: float = field(default_factory=time.time)
    run_keys: dict[str, str] = field(default_factory=dict)  # key id -> token SHA-256

    def canonical(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "sha256": self.sha256,
                "size": self.size,
                "owner_token_sha256": self.owner_token_sha256,
                "public": self.public,
                "created": repr(float(self.created)),
                "run_keys": sorted(self.run_keys.items()),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


@dataclass(frozen=True)
class LoadedRecord:
    """A row read at start; `problem` says why its metadata cannot be trusted (None: fine)."""

    record: StoredModel
    problem: str | None


def blob_label(sha256: str) -> bytes:
    return (BLOB_LABEL_PREFIX + sha256).encode()


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256_HEX.match(sha256):
        raise StoreError(f"not a SHA-256 hex digest: {sha256!r}")
    return sha256


# "wal": concurrent readers, needs a shared-memory index (store.db-shm). "delete": a rollback
# journal and an exclusive lock, no shared memory: what works inside Gramine SGX enclaves.
JOURNAL_MODES = ("wal", "delete")


class ModelStore:
    """Durable, sealed storage of models; every method is thread-safe."""

    def __init__(
        self,
        directory: Path,
        key: bytes,
        *,
        crash_point: str | None = None,
        journal: str = "wal",
    ) -> None:
        if journal not in JOURNAL_MODES:
            raise ConfigurationError(
                f"store journal {journal!r} is not one of {', '.join(JOURNAL_MODES)}"
            )
        self._journal = journal
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise ConfigurationError(f"the store's sealing key must be {KEY_SIZE} bytes")
        if crash_point is None:
            crash_point = os.environ.get(CRASH_ENV) or None
        if crash_point is not None and crash_point not in CRASH_POINTS:
            raise ConfigurationError(
                f"{CRASH_ENV}={crash_point!r} is not one of {', '.join(sorted(CRASH_POINTS))}"
            )
        if crash_point is not None:
            logger.warning("TEST ONLY: %s=%s: the server will kill itself", CRASH_ENV, crash_point)
        self.directory = Path(directory)
        self.blob_dir = self.directory / BLOB_DIR
        self._key = key
        self._mac_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO
        ).derive(key)
        self._crash_point = crash_point
        self._lock = threading.RLock()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.blob_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store directory {self.directory}: {exc}") from None
        self._lock_handle = self._take_lock()
        try:
            self._db = self._open_db()
            self.key_matches = self._check_key()
        except BaseException:
            self._lock_handle.close()
            raise

    # --- opening ---

    def _take_lock(self) -> Any:
        path = self.directory / LOCK_FILE
        handle = open(path, "a+b")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreError(
                f"the store {self.directory} is in use by another blindfold server process "
                f"(it holds {path}); give each server its own --store directory"
            ) from None
        return handle

    def _open_db(self) -> sqlite3.Connection:
        path = self.directory / DB_FILE
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            if self._journal == "delete":
                # No shared-memory index (Gramine has no shared mmap of host files): a rollback
                # journal, and the database lock held for the connection's lifetime.
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
                db.execute("PRAGMA journal_mode=DELETE")
            else:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(
                    f"the store {self.directory} has schema version {row[0]}, this server "
                    f"reads version {SCHEMA_VERSION}"
                )
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the store database {path}: {exc}") from None
        return db

    def _check_key(self) -> bool:
        """Records which key the store was created under; False if it was another one."""
        expected = hmac.new(self._mac_key, _KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest()
        row = self._db.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta(key, value) VALUES ('key_check', ?)", (expected,))
            return True
        if hmac.compare_digest(str(row[0]), expected):
            return True
        logger.error(
            "the store %s was created under a different sealing key than this server's: the "
            "TEE measurement changed (a new server build, or another enclave signer) or the "
            "simulation key file was replaced. Models sealed under the old key are "
            "UNAVAILABLE; serve them with the original build or upload them again.",
            self.directory,
        )
        return False

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lock_handle.close()

    # --- test hook ---

    def _crash(self, point: str) -> None:
        if self._crash_point == point:
            logger.error("TEST ONLY: crash point %s reached, killing the server", point)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    # --- paths ---

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / f"{_check_sha(sha256)}{BLOB_SUFFIX}"

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    # --- start-up ---

    def recover(self) -> list[str]:
        """Removes what a crash can leave behind: temp files and blobs no row references.
        Returns the names of the files removed."""
        with self._lock:
            referenced = {row[0] for row in self._db.execute("SELECT DISTINCT sha256 FROM models")}
            removed: list[str] = []
            for path in sorted(self.blob_dir.iterdir()):
                name = path.name
                if name.startswith(TEMP_PREFIX):
                    reason = "unfinished write"
                elif name.endswith(BLOB_SUFFIX) and _SHA256_HEX.match(name[: -len(BLOB_SUFFIX)]):
                    if name[: -len(BLOB_SUFFIX)] in referenced:
                        continue
                    reason = "no model references it"
                else:
                    logger.warning("store: leaving unknown file %s alone", path)
                    continue
                path.unlink(missing_ok=True)
                removed.append(name)
                logger.info("store: removed %s (%s)", name, reason)
            if removed:
                _fsync_dir(self.blob_dir)
            return removed

    def records(self) -> list[LoadedRecord]:
        """Every row, with the reason its metadata is not trusted (None when it is)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, version, sha256, size, owner_token_sha256, public, created, mac "
                "FROM models ORDER BY name"
            ).fetchall()
            keys: dict[str, dict[str, str]] = {}
            for model, key_id, token_sha256 in self._db.execute(
                "SELECT model, key_id, token_sha256 FROM run_keys"
            ):
                keys.setdefault(str(model), {})[str(key_id)] = str(token_sha256)
        loaded = []
        for name, version, sha256, size, owner, public, created, mac in rows:
            record = StoredModel(
                name=str(name),
                version=int(version),
                sha256=str(sha256),
                size=int(size),
                owner_token_sha256=str(owner),
                public=bool(public),
                created=float(created),
                run_keys=keys.get(str(name), {}),
            )
            problem = None
            if not hmac.compare_digest(self._mac(record), str(mac)):
                problem = (
                    "it was sealed under a different sealing key than this server's (another "
                    "TEE measurement, or a replaced simulation key file)"
                    if not self.key_matches
                    else "its metadata (access rules, hash or tokens) was modified outside "
                    "the server and does not authenticate"
                )
            loaded.append(LoadedRecord(record, problem))
        return loaded

    def read_model(self, record: StoredModel, max_bytes: int) -> bytes:
        """Unseals and checks a model's bytes; raises ModelUnavailable saying why."""

        def refuse(reason: str) -> ModelUnavailable:
            return ModelUnavailable(record.name, record.sha256, reason)

        try:
            path = self.blob_path(record.sha256)
        except StoreError:
            raise refuse("its row holds an invalid SHA-256") from None
        try:
            with open(path, "rb") as handle:
                data = unseal_to_bytes(
                    self._key, handle, label=blob_label(record.sha256), max_bytes=max_bytes
                )
        except FileNotFoundError:
            raise refuse(f"its sealed blob {path.name} is missing from the store") from None
        except OSError as exc:
            raise refuse(f"its sealed blob {path.name} cannot be read ({exc.strerror})") from None
        except SealError as exc:
            reason = (
                "its blob was sealed under a different sealing key than this server's"
                if not self.key_matches
                else f"its sealed blob {path.name} was refused: {exc}"
            )
            raise refuse(reason) from None
        if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.sha256:
            raise refuse("its unsealed bytes do not match the SHA-256 recorded for it")
        return data

    # --- writing ---

    def stage_blob(self, sha256: str, data: bytes) -> Path:
        """Seals `data` into a durable temp file in the blob directory (slow; no lock)."""
        _check_sha(sha256)
        temp = self.blob_dir / f"{TEMP_PREFIX}{sha256[:16]}-{secrets.token_hex(8)}"
        try:
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                seal_into(self._key, data, handle, label=blob_label(sha256))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StoreError(f"cannot write a model blob to the store: {exc.strerror}") from None
        self._crash("after_blob_write")
        return temp

    def discard(self, staged: Path | None) -> None:
        if staged is not None:
            staged.unlink(missing_ok=True)

    def commit_model(self, record: StoredModel, staged: Path | None) -> None:
        """Makes `record` durable: moves the staged blob (if any) into place, then writes the
        row and its run keys in one transaction; then drops a blob it replaced, if unused."""
        target = self.blob_path(record.sha256)
        with self._lock:
            try:
                if staged is not None:
                    os.replace(staged, target)
                    self._crash("after_rename")
                    _fsync_dir(self.blob_dir)
                elif not target.is_file():
                    raise StoreError(f"blob {target.name} is not in the store")
            except OSError as exc:
                self.discard(staged)
                raise StoreError(f"cannot move a model blob into place: {exc.strerror}") from None
            row = self._db.execute(
                "SELECT sha256 FROM models WHERE name = ?", (record.name,)
            ).fetchone()
            previous = None if row is None else str(row[0])
            try:
                self._transaction(lambda: self._write_row(record), "before_db_commit")
            except StoreError:
                self._collect(record.sha256)  # the blob just moved in may be unreferenced
                raise
            self._crash("after_db_commit")
            if previous is not None and previous != record.sha256:
                self._collect(previous)

    def update_rules(self, record: StoredModel) -> None:
        """Persists a change of access flag or run keys (and the row's new MAC)."""
        with self._lock:
            self._transaction(lambda: self._write_row(record))

    def delete_model(self, name: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT sha256 FROM models WHERE name = ?", (name,)).fetchone()
            if row is None:
                return

            def delete() -> None:
                self._db.execute("DELETE FROM run_keys WHERE model = ?", (name,))
                self._db.execute("DELETE FROM models WHERE name = ?", (name,))

            self._transaction(delete)
            self._crash("after_delete_commit")
            self._collect(str(row[0]))

    # --- internals ---

    def _mac(self, record: StoredModel) -> str:
        return hmac.new(self._mac_key, record.canonical(), hashlib.sha256).hexdigest()

    def _write_row(self, record: StoredModel) -> None:
        self._db.execute(
            "INSERT INTO models(name, version, sha256, size, owner_token_sha256, public, "
            "created, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
            "version = excluded.version, sha256 = excluded.sha256, size = excluded.size, "
            "owner_token_sha256 = excluded.owner_token_sha256, public = excluded.public, "
            "created = excluded.created, mac = excluded.mac",
            (
                record.name,
                record.version,
                record.sha256,
                record.size,
                record.owner_token_sha256,
                int(record.public),
                float(record.created),
                self._mac(record),
            ),
        )
        self._db.execute("DELETE FROM run_keys WHERE model = ?", (record.name,))
        self._db.executemany(
            "INSERT INTO run_keys(model, key_id, token_sha256) VALUES (?, ?, ?)",
            [(record.name, key_id, digest) for key_id, digest in sorted(record.run_keys.items())],
        )

    def _transaction(self, body: Any, crash_point: str | None = None) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                body()
                if crash_point is not None:
                    self._crash(crash_point)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store database: {exc}") from None

    def _collect(self, sha256: str) -> None:
        """Deletes the blob of `sha256` when no row references it any more."""
        try:
            path = self.blob_path(sha256)
        except StoreError:
            return  # a tampered row's hash names no file of ours
        row = self._db.execute("SELECT 1 FROM models WHERE sha256 = ? LIMIT 1", (sha256,))
        if row.fetchone() is not None:
            return
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(self.blob_dir)
        except OSError as exc:
            # Harmless: recover() removes unreferenced blobs at the next start.
            logger.warning("store: cannot remove unused blob %s (%s)", path.name, exc.strerror)
