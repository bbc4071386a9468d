"""The sealed persistent model store behind `blindfold serve --store DIR`.

Layout of DIR::

    store.db, store.db-wal, store.db-shm   SQLite (WAL, synchronous=FULL): models, run keys,
                                           and the manifest that binds them together
    epoch.sealed                           the last epoch this server committed (sealed);
                                           `--epoch-file PATH` keeps it elsewhere
                                           (journal "delete": store.db-journal, no -wal/-shm)
    blobs/<sha256>.sealed                  model bytes sealed under the TEE's sealing key
    blobs/.tmp-*                           blobs being written (removed at the next start)
    store.lock                             flock: one server process per store
    INSECURE-simulation-sealing.key        simulation TEE only: the key, in the clear

Model bytes are sealed with `blindfold.sealing` (AES-256-GCM, chunked) under the key that only
a TEE with the same measurement derives, with the label `blindfold-store-model:<sha256>`: a
blob moved under another model's row, truncated, modified or sealed under another key does
not authenticate. Identical bytes share one blob; a blob is deleted when no row references it.

The host owns the disk, so the metadata is authenticated as a whole, not row by row. Every
row carries an HMAC (under a key derived from the sealing key), and one HMAC'd **manifest**
records, for every model, the digest of its current row, its blob hash and its owner-token
hash, together with the store's **epoch**, which grows by one with every committed change.
At start:

- a store sealed under another key, with a schema the server did not create, without a valid
  manifest, or whose epoch is lower than the last one the server committed (kept in
  `epoch.sealed` and, optionally, an external `EpochCounter`) is refused as a whole, before
  anything is changed or deleted;
- a row that does not match the manifest (edited, put back from an older copy, planted, or
  deleted) makes that one model UNAVAILABLE; the manifest still names its owner, so its owner
  token (or an operator admin key) can replace or delete it.

What this does not stop: a host that rolls back the database *and* the epoch file together
to an older copy. Only a monotonic counter the host cannot rewind (an `EpochCounter` backed
by a TPM NV counter, a replicated service, or at least a file on another medium) closes that.

SQLite is opened defensively (`trusted_schema=OFF`, `SQLITE_DBCONFIG_DEFENSIVE` where Python
exposes it, `cell_size_check`, no mmap), and a database whose schema is not exactly the one
this server creates (a planted trigger, view or index) is refused before any row is read.

Crash safety: a model becomes visible only after it is durable. Writing is
temp file -> fsync -> rename to `<sha256>.sealed` -> fsync the directory -> SQLite transaction
(row + run keys + manifest at epoch N+1) -> commit -> epoch file advanced to N+1 (temp file,
fsync, rename). A crash before the commit leaves at most a temp file or an unreferenced blob,
both removed by `recover()` at the next start; after the commit the model is fully there, and
a database one epoch ahead of the epoch file is accepted (the file catches up). Deleting is
the reverse: row and manifest entry first, then the blob.

`BLINDFOLD_TEST_CRASH_POINT` (test-only) makes the process SIGKILL itself at one of
`CRASH_POINTS`, so tests can check the store after a crash at each step.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindfold.errors import BlindfoldError, ConfigurationError, SealError
from blindfold.sealing import KEY_SIZE, seal, seal_into, seal_reader, unseal, unseal_into
from blindfold.server.model_bytes import (
    ModelBytes,
    ModelBytesWriter,
    ModelData,
    memfd_available,
)
from blindfold.server.model_record import ModelRecord
from blindfold.server.refusals import Refusal
from blindfold.server.scheduler import DEFAULT, SchedulingOptions

logger = logging.getLogger("blindfold.store")

DB_FILE = "store.db"
EPOCH_FILE = "epoch.sealed"
BLOB_DIR = "blobs"
LOCK_FILE = "store.lock"
BLOB_SUFFIX = ".sealed"
TEMP_PREFIX = ".tmp-"
# 2: rows bound together by the manifest. Version 1 stores (rows MAC'd one by one) are
# refused: nothing in them tells a replayed row from a current one.
# 3: each model's scheduling options (batching, concurrency) in its row. Version 2 stores are
# migrated when opened read-write (see `_MIGRATIONS`).
SCHEMA_VERSION = 3
OLDEST_MIGRATED_VERSION = 2
BLOB_LABEL_PREFIX = "blindfold-store-model:"
EPOCH_LABEL = b"blindfold-store-epoch/v1"
_MAC_INFO = b"blindfold-store/metadata-mac/v1"
_KEY_CHECK_MESSAGE = b"blindfold-store/key-check/v1"
_MANIFEST_PREFIX = b"blindfold-store/manifest/v1\n"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_MAX_EPOCH_FILE_BYTES = 4096

CRASH_ENV = "BLINDFOLD_TEST_CRASH_POINT"
CRASH_POINTS = frozenset(
    {
        "after_blob_write",  # temp file written and fsynced, not renamed
        "after_rename",  # blob in place, no row yet
        "before_db_commit",  # any change and the manifest written, transaction still open
        "after_manifest_commit",  # any change committed, the epoch file not yet advanced
        "epoch_file_staged",  # the new epoch sealed into a temp file, not renamed
        "after_epoch_update",  # the epoch file advanced
        "after_db_commit",  # upload committed and epoch advanced, the server has not answered
        "after_delete_commit",  # row deleted, blob not yet removed
    }
)

# The schema of version 2, the oldest this server opens; created in one transaction, so a
# crash leaves either all of it or none. Compared object by object with sqlite_master at
# every start.
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE models ("
    "name TEXT PRIMARY KEY, version INTEGER NOT NULL, sha256 TEXT NOT NULL, "
    "size INTEGER NOT NULL, owner_token_sha256 TEXT NOT NULL, public INTEGER NOT NULL, "
    "created REAL NOT NULL, mac TEXT NOT NULL)",
    "CREATE TABLE run_keys ("
    "model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE, key_id TEXT NOT NULL, "
    "token_sha256 TEXT NOT NULL, PRIMARY KEY (model, key_id))",
    "CREATE INDEX models_sha256 ON models(sha256)",
)
# What takes a store from the version before to this one. A new store is made by the same
# statements, so a migrated store's sqlite_master reads exactly like a new one's (ALTER TABLE
# rewrites the stored CREATE statement).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    3: ("ALTER TABLE models ADD COLUMN scheduling TEXT NOT NULL DEFAULT '{}'",),
}
_SchemaObject = tuple[str, str, str, str | None]


def _statements(version: int) -> tuple[str, ...]:
    """The statements that create a store of `version`."""
    migrations = (_MIGRATIONS[v] for v in range(OLDEST_MIGRATED_VERSION + 1, version + 1))
    return _SCHEMA + tuple(statement for steps in migrations for statement in steps)


@functools.cache
def _expected_schema(version: int = SCHEMA_VERSION) -> frozenset[_SchemaObject]:
    """sqlite_master as a store of `version` has it (with SQLite's own automatic indexes)."""
    db = sqlite3.connect(":memory:")
    try:
        for statement in _statements(version):
            db.execute(statement)
        return frozenset(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        db.close()


def _schema_version(schema: frozenset[_SchemaObject]) -> int | None:
    """The version whose schema `schema` is exactly; None for any other."""
    for version in range(SCHEMA_VERSION, OLDEST_MIGRATED_VERSION - 1, -1):
        if schema == _expected_schema(version):
            return version
    return None


MEASUREMENT_KEY_CHANGES = (
    "the TEE measurement changed (a new server build, or another enclave signer) or the "
    "simulation key file was replaced. Serve it with the build that created it, or start this "
    "build with another --store directory and upload the models again"
)


class StoreError(BlindfoldError):
    """The store cannot be opened or written (disk full, permissions, another server), or is
    refused as a whole (tampered schema or manifest, rolled back, sealed under another key)."""


class ModelUnavailable(BlindfoldError):
    """A stored model cannot be served; the message names it and says why, never its bytes."""

    def __init__(self, name: str, sha256: str, reason: str) -> None:
        self.name = name
        self.sha256 = sha256
        self.reason = reason
        super().__init__(f"stored model {name!r} (sha256 {sha256}) is unavailable: {reason}")


@dataclass(frozen=True)
class LoadedRecord:
    """A row read at start; `problem` says why its metadata cannot be trusted (None: fine).

    When `problem` is set, `record` holds only what the manifest authenticates (name, version,
    hash, size, owner-token hash; restricted, no run keys), or, for a row the manifest does not
    know, its name with no owner at all (`owner_token_sha256` empty)."""

    record: ModelRecord
    problem: str | None


@dataclass(frozen=True)
class ManifestEntry:
    """What the manifest authenticates about one model."""

    row: str  # SHA-256 of the row's canonical form
    sha256: str
    size: int
    version: int
    owner_token_sha256: str

    @classmethod
    def of(cls, record: ModelRecord) -> ManifestEntry:
        return cls(
            record.digest(), record.sha256, record.size, record.version, record.owner_token_sha256
        )

    def untrusted_record(self, name: str) -> ModelRecord:
        """The model as far as the manifest vouches for it: no access rules to believe."""
        return ModelRecord(
            name=name,
            version=self.version,
            sha256=self.sha256,
            size=self.size,
            owner_token_sha256=self.owner_token_sha256,
            public=False,
            created=0.0,
        )


class EpochCounter(Protocol):
    """Where the store's epoch is kept outside its database, so that an older copy of the
    database is recognized. Implement this with a counter the host cannot rewind (a TPM NV
    counter, a replicated or attested service) and pass it as `ModelStore(...,
    external_counter=...)`: that is real rollback protection, which a file on the host's disk
    (`SealedEpochFile`) is not."""

    description: str

    def read(self) -> int | None:
        """The last epoch advanced to; None when this store never wrote one."""
        ...

    def advance(self, epoch: int) -> None:
        """Records `epoch` (always higher than the last one) durably."""
        ...


class SealedEpochFile:
    """The epoch in a file sealed under the store's key and bound to the store's id: the host
    can neither forge a value nor move another store's file in, but it CAN put back an older
    copy of this file together with an older copy of the database."""

    def __init__(self, path: Path, key: bytes, store_id: str, crash: Callable[[str], None]) -> None:
        self.path = path
        self.description = f"the epoch file {path}"
        self._key = key
        self._store_id = store_id
        self._crash = crash

    def read(self) -> int | None:
        try:
            with open(self.path, "rb") as handle:
                blob = handle.read(_MAX_EPOCH_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.description}: {exc.strerror}") from None
        try:
            payload = json.loads(unseal(self._key, blob, label=EPOCH_LABEL))
            store_id, epoch = payload["store_id"], payload["epoch"]
        except (SealError, ValueError, TypeError, KeyError):
            raise StoreError(
                f"{self.description} does not authenticate: it was damaged, or written under "
                "another sealing key"
            ) from None
        if store_id != self._store_id or not isinstance(epoch, int) or epoch < 0:
            raise StoreError(
                f"{self.description} belongs to another store (the database was replaced, or "
                "--epoch-file names another store's file)"
            )
        return epoch

    def advance(self, epoch: int) -> None:
        payload = json.dumps({"store_id": self._store_id, "epoch": epoch}).encode()
        temp = self.path.with_name(f"{self.path.name}{TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(seal(self._key, payload, label=EPOCH_LABEL))
                handle.flush()
                os.fsync(handle.fileno())
            self._crash("epoch_file_staged")
            os.replace(temp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {self.description}: {exc.strerror}") from None

    def remove_temp_files(self) -> list[str]:
        removed = []
        for path in self.path.parent.glob(f"{self.path.name}{TEMP_PREFIX}*"):
            path.unlink(missing_ok=True)
            removed.append(path.name)
        return removed


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


@dataclass(frozen=True)
class _Verified:
    """What opening the store established."""

    store_id: str
    epoch: int
    manifest: dict[str, ManifestEntry]
    epoch_file: SealedEpochFile
    counters: list[EpochCounter]
    behind: list[EpochCounter]  # counters to bring up to `epoch`
    schema_version: int


_RESET_HINT = (
    "Nothing was changed. If you restored this store from a backup on purpose, start once "
    "with --unsafe-reset-store-epoch to accept it as the newest state"
)


class ModelStore:
    """Durable, sealed storage of models; every method is thread-safe.

    Opening it verifies the store as a whole (schema, sealing key, manifest, epoch) and raises
    StoreError, changing nothing, when it is refused."""

    def __init__(
        self,
        directory: Path,
        key: bytes,
        *,
        epoch_file: Path | None = None,
        external_counter: EpochCounter | None = None,
        unsafe_reset_epoch: bool = False,
        crash_point: str | None = None,
        journal: str = "wal",
        key_changes: str = MEASUREMENT_KEY_CHANGES,
    ) -> None:
        """`key_changes` says, for the refusal of a store sealed under another key, what
        makes this server's key differ (the measurement, or a cluster's service identity)."""
        self._key_changes = key_changes
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
        epoch_path = Path(epoch_file) if epoch_file is not None else self.directory / EPOCH_FILE
        if not epoch_path.parent.is_dir():
            raise StoreError(f"the folder of the epoch file {epoch_path} does not exist")
        self._lock_handle = self._take_lock()
        try:
            self._db, verified = self._open_db(epoch_path, external_counter, unsafe_reset_epoch)
        except BaseException:
            self._lock_handle.close()
            raise
        self._store_id, self._epoch = verified.store_id, verified.epoch
        self._manifest = verified.manifest
        self._epoch_file = verified.epoch_file
        self._counters = verified.counters
        if unsafe_reset_epoch:
            logger.warning(
                "UNSAFE: --unsafe-reset-store-epoch: the store %s is accepted at epoch %d "
                "without a rollback check",
                self.directory,
                self._epoch,
            )
        try:
            for counter in verified.behind:  # a crash can leave a counter one epoch behind
                counter.advance(self._epoch)
        except BaseException:
            self.close()
            raise

    @property
    def epoch(self) -> int:
        return self._epoch

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

    def _open_db(
        self, epoch_path: Path, external: EpochCounter | None, reset: bool
    ) -> tuple[sqlite3.Connection, _Verified]:
        """Verifies the store read-only first, so that a refused store is left exactly as it
        was (closing a read-write connection checkpoints the WAL), then opens it read-write
        and verifies again (the host may have swapped the file in between)."""
        path = self.directory / DB_FILE
        if path.exists() and path.stat().st_size > 0:
            reader = self._connect(f"file:{path}?mode=ro", uri=True)
            try:
                self._verify(reader, epoch_path, external, reset)
            finally:
                reader.close()
        db = self._connect(str(path))
        try:
            if self._journal == "delete":
                # No shared-memory index (Gramine has no shared mmap of host files): a rollback
                # journal, and the database lock held for the connection's lifetime.
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
                db.execute("PRAGMA journal_mode=DELETE")
            else:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            verified = self._verify(db, epoch_path, external, reset)
            if verified is None:
                self._create(db)
                verified = self._verify(db, epoch_path, external, reset)
                if verified is None:
                    raise StoreError(
                        f"the model store database {path} was created but reads back empty; "
                        "check that the directory is writable and not replaced underneath "
                        "the server"
                    )
            if verified.schema_version < SCHEMA_VERSION:
                self._migrate(db, verified.schema_version)
                verified = self._verify(db, epoch_path, external, reset)
                if verified is None or verified.schema_version != SCHEMA_VERSION:
                    raise StoreError(f"the store database {path} did not migrate; nothing lost")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"cannot open the store database {path}: {exc}") from None
        except BaseException:
            db.close()
            raise
        return db, verified

    def _connect(self, target: str, uri: bool = False) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(target, isolation_level=None, check_same_thread=False, uri=uri)
            _harden(db)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store database in {self.directory}: {exc}") from None
        return db

    def _verify(
        self,
        db: sqlite3.Connection,
        epoch_path: Path,
        external: EpochCounter | None,
        reset: bool,
    ) -> _Verified | None:
        """Everything that refuses the store as a whole; None for an empty database."""
        path = self.directory / DB_FILE
        try:
            schema = frozenset(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
            if not schema:
                if epoch_path.exists() and not reset:
                    raise StoreError(
                        f"the store database {path} is missing or empty, but {epoch_path} "
                        "says this store held models: the host deleted or replaced the "
                        f"database. {_RESET_HINT} (as a new, empty store)"
                    )
                return None
            version = _schema_version(schema)
            if version is None:
                raise StoreError(_schema_difference(path, schema))
            problems = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreError(
                    f"the store database {path} is corrupt ({'; '.join(problems[:3])}); "
                    "restore it from a backup or move the store aside"
                )
            meta = {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the store database {path}: {exc}") from None
        if meta.get("schema_version") != str(version):
            raise StoreError(
                f"the store {self.directory} has schema version "
                f"{meta.get('schema_version', 'none')}, this server reads versions "
                f"{OLDEST_MIGRATED_VERSION} to {SCHEMA_VERSION} only (version 1 stores do not "
                "bind their rows together, so replayed rows cannot be told apart); serve it "
                "with the build that wrote it, or move it aside and upload the models again"
            )
        if not hmac.compare_digest(meta.get("key_check", ""), self._key_check()):
            raise StoreError(
                f"the store {self.directory} was sealed under a different sealing key than "
                f"this server's: {self._key_changes}. None of its models or access rules can "
                "be verified, so the whole store is refused and nothing was changed"
            )
        store_id, epoch, manifest = self._read_manifest(meta)
        epoch_file = SealedEpochFile(epoch_path, self._key, store_id, self._crash)
        counters: list[EpochCounter] = [epoch_file]
        if external is not None:
            counters.append(external)
        behind = [
            counter
            for counter in counters
            if self._compare_epoch(counter, epoch, reset and counter is epoch_file)
        ]
        return _Verified(store_id, epoch, manifest, epoch_file, counters, behind, version)

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        """Brings a verified store of an older `version` to SCHEMA_VERSION in one
        transaction. Rows keep their MACs and the manifest its digests: a field a migration
        adds is in a row's canonical form only when it differs from its default."""
        db.execute("BEGIN IMMEDIATE")
        try:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        logger.info(
            "store: migrated %s from schema version %d to %d",
            self.directory,
            version,
            SCHEMA_VERSION,
        )

    def _create(self, db: sqlite3.Connection) -> None:
        """A new store: schema, identity and an empty manifest at epoch 0, all or nothing."""
        store_id = secrets.token_hex(16)
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(SCHEMA_VERSION):
                db.execute(statement)
            db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("key_check", self._key_check()),
                    ("store_id", store_id),
                    *self._manifest_rows(store_id, 0, {}),
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        logger.info("store: created a new store in %s", self.directory)

    def _key_check(self) -> str:
        return hmac.new(self._mac_key, _KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest()

    def _read_manifest(self, meta: dict[str, str]) -> tuple[str, int, dict[str, ManifestEntry]]:
        store_id, body = meta.get("store_id"), meta.get("manifest")
        expected = self._manifest_mac(body.encode()) if body is not None else ""
        if (
            store_id is None
            or body is None
            or not hmac.compare_digest(meta.get("manifest_mac", ""), expected)
        ):
            raise StoreError(
                f"the manifest of the store {self.directory} is missing or does not "
                "authenticate: its database was edited outside the server. The whole store is "
                "refused and nothing was changed; restore the database from a copy the server "
                "wrote, or move the store aside"
            )
        document = json.loads(body)
        if document["store_id"] != store_id:
            raise StoreError(
                f"the manifest of the store {self.directory} belongs to another store: the "
                "database was assembled from two stores outside the server"
            )
        models = {name: ManifestEntry(**entry) for name, entry in document["models"].items()}
        return store_id, int(document["epoch"]), models

    def _compare_epoch(self, counter: EpochCounter, epoch: int, reset: bool) -> bool:
        """Raises when the database (at `epoch`) is older than what `counter` recorded;
        returns whether the counter must be brought up to `epoch`."""
        if reset:
            return True
        try:
            last = counter.read()
        except StoreError as exc:
            raise StoreError(f"{exc}. {_RESET_HINT}") from None
        if last is None and epoch > 0:
            raise StoreError(
                f"the store {self.directory} is at epoch {epoch}, but {counter.description} "
                "holds none: it was deleted or moved, so a rollback cannot be excluded (if you "
                f"moved it, point --epoch-file at it). {_RESET_HINT}"
            )
        if last is not None and last > epoch:
            raise StoreError(
                f"the store {self.directory} is at epoch {epoch}, older than epoch {last} that "
                f"this server committed ({counter.description}): the host put back an older "
                "copy of its database, which could revive revoked run keys, former access "
                f"rules or deleted models. The whole store is refused. {_RESET_HINT}"
            )
        if last is not None and last + 1 < epoch:
            logger.warning(
                "store: %s was %d epochs behind the database (put back by the host?)",
                counter.description,
                epoch - last,
            )
        return last is None or last < epoch

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
        """Removes what a crash can leave behind: temp files and blobs that neither a row nor
        the manifest references. Returns the names of the files removed."""
        with self._lock:
            referenced = self._referenced()
            removed = self._epoch_file.remove_temp_files()
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
        """Every model the database or the manifest knows, with the reason its metadata is
        not trusted (None when its row is exactly the one the manifest records)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, version, sha256, size, owner_token_sha256, public, created, "
                "scheduling, mac FROM models ORDER BY name"
            ).fetchall()
            keys: dict[str, dict[str, str]] = {}
            for model, key_id, token_sha256 in self._db.execute(
                "SELECT model, key_id, token_sha256 FROM run_keys"
            ):
                keys.setdefault(str(model), {})[str(key_id)] = str(token_sha256)
            manifest = dict(self._manifest)
        loaded = []
        for name, version, sha256, size, owner, public, created, scheduling, mac in rows:
            options = _scheduling(scheduling)
            record = ModelRecord(
                name=str(name),
                version=int(version),
                sha256=str(sha256),
                size=int(size),
                owner_token_sha256=str(owner),
                public=bool(public),
                created=float(created),
                run_keys=keys.get(str(name), {}),
                scheduling=options or DEFAULT,
            )
            entry = manifest.pop(record.name, None)
            problem = None
            if options is None or not hmac.compare_digest(self._mac(record), str(mac)):
                problem = (
                    "its row (access rules, hash or tokens) was modified outside the server "
                    "and does not authenticate"
                )
            elif entry is None:
                problem = (
                    "its row is not in the store's manifest: it was added or put back outside "
                    "the server"
                )
            elif not hmac.compare_digest(entry.row, record.digest()):
                problem = (
                    "its row is not the one the store's manifest records: an older copy was "
                    "put back outside the server (it could revive a revoked run key or a "
                    "former access rule)"
                )
            if problem is not None:
                record = (
                    entry.untrusted_record(record.name)
                    if entry is not None
                    else ModelRecord(record.name, 0, "", 0, "", public=False, created=0.0)
                )
            loaded.append(LoadedRecord(record, problem))
        for name, entry in manifest.items():
            problem = "its row is missing from the store database (deleted outside the server)"
            loaded.append(LoadedRecord(entry.untrusted_record(name), problem))
        return sorted(loaded, key=lambda item: item.record.name)

    def read_model(self, record: ModelRecord, max_bytes: int) -> bytes:
        """Unseals and checks a model's bytes; raises ModelUnavailable saying why."""
        parts: list[bytes] = []
        self._unseal(record, max_bytes, parts.append)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        _check_unsealed(record, len(data), hashlib.sha256(data).hexdigest())
        return data

    def open_model(self, record: ModelRecord, max_bytes: int) -> ModelData:
        """`read_model` into a sealed memfd where the platform has them: restoring a model
        then holds its plaintext once (not the chunks, their join, and the worker's copy)."""
        if not memfd_available():
            return self.read_model(record, max_bytes)
        writer = ModelBytesWriter()
        try:
            self._unseal(record, max_bytes, writer.write)
            _check_unsealed(record, writer.size, writer.hexdigest())
            return writer.finish()
        finally:
            writer.abandon()  # (nothing left to free once finished)

    def _unseal(self, record: ModelRecord, max_bytes: int, sink: Callable[[bytes], object]) -> None:
        try:
            path = self.blob_path(record.sha256)
        except StoreError:
            raise _unavailable(record, "its row holds an invalid SHA-256") from None
        try:
            with open(path, "rb") as handle:
                unseal_into(
                    self._key, handle, sink, label=blob_label(record.sha256), max_bytes=max_bytes
                )
        except FileNotFoundError:
            raise _unavailable(
                record, f"its sealed blob {path.name} is missing from the store"
            ) from None
        except OSError as exc:
            raise _unavailable(
                record, f"its sealed blob {path.name} cannot be read ({exc.strerror})"
            ) from None
        except SealError as exc:
            raise _unavailable(record, f"its sealed blob {path.name} was refused: {exc}") from None

    # --- writing ---

    def stage_blob(self, sha256: str, data: ModelData) -> Path:
        """Seals `data` into a durable temp file in the blob directory (slow; no lock)."""
        _check_sha(sha256)
        temp = self.blob_dir / f"{TEMP_PREFIX}{sha256[:16]}-{secrets.token_hex(8)}"
        try:
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                if isinstance(data, ModelBytes):
                    with data.reader() as source:
                        seal_reader(self._key, source, handle, label=blob_label(sha256))
                else:
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

    def commit_model(self, record: ModelRecord, staged: Path | None) -> None:
        """Makes `record` durable: moves the staged blob (if any) into place, then writes the
        row, its run keys and the manifest in one transaction; then drops a blob it replaced,
        if unused."""
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
            previous = self._blobs_of(record.name)
            try:
                self._transaction(
                    lambda: self._write_row(record),
                    {record.name: ManifestEntry.of(record)},
                )
            except StoreError:
                self._collect([record.sha256])  # the blob just moved in may be unreferenced
                raise
            self._crash("after_db_commit")
            self._collect(previous - {record.sha256})

    def update_rules(self, record: ModelRecord) -> None:
        """Persists a change of access flag or run keys (and the row's new MAC)."""
        with self._lock:
            self._transaction(
                lambda: self._write_row(record), {record.name: ManifestEntry.of(record)}
            )

    def delete_model(self, name: str) -> None:
        with self._lock:
            blobs = self._blobs_of(name)
            if not blobs and name not in self._manifest:
                return

            def delete() -> None:
                self._db.execute("DELETE FROM run_keys WHERE model = ?", (name,))
                self._db.execute("DELETE FROM models WHERE name = ?", (name,))

            self._transaction(delete, {name: None})
            self._crash("after_delete_commit")
            self._collect(blobs)

    # --- internals ---

    def _mac(self, record: ModelRecord) -> str:
        return hmac.new(self._mac_key, record.canonical(), hashlib.sha256).hexdigest()

    def _manifest_mac(self, body: bytes) -> str:
        return hmac.new(self._mac_key, _MANIFEST_PREFIX + body, hashlib.sha256).hexdigest()

    def _manifest_rows(
        self, store_id: str, epoch: int, models: dict[str, ManifestEntry]
    ) -> list[tuple[str, str]]:
        body = json.dumps(
            {
                "store_id": store_id,
                "epoch": epoch,
                "models": {name: asdict(entry) for name, entry in sorted(models.items())},
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return [("manifest", body), ("manifest_mac", self._manifest_mac(body.encode()))]

    def _write_row(self, record: ModelRecord) -> None:
        self._db.execute(
            "INSERT INTO models(name, version, sha256, size, owner_token_sha256, public, "
            "created, scheduling, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET "
            "version = excluded.version, sha256 = excluded.sha256, size = excluded.size, "
            "owner_token_sha256 = excluded.owner_token_sha256, public = excluded.public, "
            "created = excluded.created, scheduling = excluded.scheduling, mac = excluded.mac",
            (
                record.name,
                record.version,
                record.sha256,
                record.size,
                record.owner_token_sha256,
                int(record.public),
                float(record.created),
                json.dumps(record.scheduling.to_json(), sort_keys=True, separators=(",", ":")),
                self._mac(record),
            ),
        )
        self._db.execute("DELETE FROM run_keys WHERE model = ?", (record.name,))
        self._db.executemany(
            "INSERT INTO run_keys(model, key_id, token_sha256) VALUES (?, ?, ?)",
            [(record.name, key_id, digest) for key_id, digest in sorted(record.run_keys.items())],
        )

    def _transaction(
        self,
        body: Callable[[], None],
        changes: dict[str, ManifestEntry | None],
    ) -> None:
        """Runs `body` and writes the manifest with `changes` at the next epoch, in one
        transaction; then advances the epoch counters. The manifest is built from the
        in-memory copy verified at start, never from rows on disk, so a row refused at start
        stays refused after unrelated changes."""
        manifest = dict(self._manifest)
        for name, entry in changes.items():
            if entry is None:
                manifest.pop(name, None)
            else:
                manifest[name] = entry
        epoch = self._epoch + 1
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                body()
                self._db.executemany(
                    "UPDATE meta SET value = ? WHERE key = ?",
                    [
                        (value, key)
                        for key, value in self._manifest_rows(self._store_id, epoch, manifest)
                    ],
                )
                self._crash("before_db_commit")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store database: {exc}") from None
        self._manifest, self._epoch = manifest, epoch
        self._crash("after_manifest_commit")
        self._advance_counters(epoch)
        self._crash("after_epoch_update")

    def _advance_counters(self, epoch: int) -> None:
        """The change is durable already; a counter left behind only weakens rollback
        detection for this one epoch, so its failure is logged, not raised."""
        for counter in self._counters:
            try:
                counter.advance(epoch)
            except Exception as exc:
                logger.error(
                    "store: cannot advance %s to epoch %d (%s): a rollback to the previous "
                    "epoch would go unnoticed until the next change",
                    counter.description,
                    epoch,
                    exc,
                )

    def _referenced(self) -> set[str]:
        rows = {str(row[0]) for row in self._db.execute("SELECT DISTINCT sha256 FROM models")}
        return rows | {entry.sha256 for entry in self._manifest.values()}

    def _blobs_of(self, name: str) -> set[str]:
        """The blob hashes `name` refers to, by its row or by the manifest."""
        row = self._db.execute("SELECT sha256 FROM models WHERE name = ?", (name,)).fetchone()
        found = set() if row is None else {str(row[0])}
        entry = self._manifest.get(name)
        return found | ({entry.sha256} if entry is not None else set())

    def _collect(self, hashes: Iterable[str]) -> None:
        """Deletes the blobs of `hashes` that no row and no manifest entry references."""
        referenced = self._referenced()
        for sha256 in hashes:
            if sha256 in referenced:
                continue
            try:
                path = self.blob_path(sha256)
            except StoreError:
                continue  # a tampered row's hash names no file of ours
            try:
                path.unlink(missing_ok=True)
                _fsync_dir(self.blob_dir)
            except OSError as exc:
                # Harmless: recover() removes unreferenced blobs at the next start.
                logger.warning("store: cannot remove unused blob %s (%s)", path.name, exc.strerror)


def _unavailable(record: ModelRecord, reason: str) -> ModelUnavailable:
    return ModelUnavailable(record.name, record.sha256, reason)


def _check_unsealed(record: ModelRecord, size: int, sha256: str) -> None:
    if size != record.size or sha256 != record.sha256:
        raise _unavailable(record, "its unsealed bytes do not match the SHA-256 recorded for it")


def _scheduling(stored: object) -> SchedulingOptions | None:
    """A row's scheduling options; None when they do not parse (only an edited row's)."""
    try:
        values = json.loads(str(stored))
        if not isinstance(values, dict):
            return None
        return SchedulingOptions.parse(values) or DEFAULT
    except (ValueError, Refusal):
        return None


def _harden(db: sqlite3.Connection) -> None:
    """SQLite's "defense against the dark arts" settings, before the schema is read."""
    if sys.version_info >= (3, 12):
        db.setconfig(sqlite3.SQLITE_DBCONFIG_DEFENSIVE, True)
        db.setconfig(sqlite3.SQLITE_DBCONFIG_TRUSTED_SCHEMA, False)
    # Python 3.11 has no Connection.setconfig, so SQLITE_DBCONFIG_DEFENSIVE cannot be set
    # there; what stands in for it: functions with side effects never run from the schema
    # (trusted_schema=OFF), the schema is compared with ours before any row is read,
    # writable_schema is never enabled, and quick_check rejects a corrupt file.
    db.execute("PRAGMA trusted_schema=OFF")
    db.execute("PRAGMA cell_size_check=ON")
    db.execute("PRAGMA mmap_size=0")


def _schema_difference(path: Path, found: frozenset[_SchemaObject]) -> str:
    expected = _expected_schema()
    planted = sorted(f"{kind} {name!r}" for kind, name, _, _ in found - expected)
    missing = sorted(f"{kind} {name!r}" for kind, name, _, _ in expected - found)
    parts = []
    if planted:
        parts.append(
            f"objects this server did not create or that were changed: {', '.join(planted)}"
        )
    if missing:
        parts.append(f"missing or changed: {', '.join(missing)}")
    return (
        f"the store database {path} does not have the schema this server creates "
        f"({'; '.join(parts)}): it was modified outside the server (a planted trigger or view "
        "would run inside the TEE). The whole store is refused and nothing was read or "
        "changed; restore the database from a copy the server wrote, or move the store aside"
    )
