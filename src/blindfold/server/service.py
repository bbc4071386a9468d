"""Model management behind the HTTP routes: upload (check, hash, dedupe, session),
replacement, unload, access rules and run keys. Tokens are compared by hash only.

With a `ModelStore` (`blindfold serve --store DIR`) every change is made durable before it
becomes visible in memory, and `restore()` brings the stored models back at start; a stored
model that cannot be served (blob or metadata refused) is kept as UNAVAILABLE with its reason.
One whose row is damaged can be replaced or deleted only by the owner the store's manifest
still names, or by an operator admin key (`--admin-key-file`): never by a plain upload key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from blindfold.server.limits import Limits
from blindfold.server.model_bytes import ModelBytes, ModelData
from blindfold.server.model_record import ModelRecord, token_hash
from blindfold.server.models import (
    HASH_PREFIX,
    ModelRegistry,
    check_name,
    check_owner_secret,
    new_token,
)
from blindfold.server.onnx_check import check_model
from blindfold.server.pools import Pool
from blindfold.server.refusals import (
    AccessDenied,
    AuthenticationRequired,
    Conflict,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    Refusal,
    Unavailable,
)
from blindfold.server.runtime import InferenceRunner, Session
from blindfold.server.scheduler import DEFAULT, SchedulingOptions
from blindfold.server.store import ModelStore, ModelUnavailable, StoreError

logger = logging.getLogger("blindfold.models")


class ServiceRegistry(ModelRegistry):
    """The registry, plus the stored models that could not be loaded: running one of those
    is refused as not ready, with the reason, instead of "unknown model"."""

    def __init__(self, max_models: int, is_uploader: Callable[[str | None], bool]) -> None:
        super().__init__(max_models)
        self.unavailable: dict[str, ModelRecord] = {}  # each one UNAVAILABLE
        self._is_uploader = is_uploader

    def reveals(self, model: ModelRecord, token: str | None) -> bool:
        """Who learns that it exists: whoever could run it, and for a row whose metadata did
        not authenticate (so its access rule is unknown) whoever may take its name over."""
        return model.may_run(token) or (not model.metadata_trusted and self._is_uploader(token))

    def get_for_run(self, reference: str, version: str | None, token: str | None) -> ModelRecord:
        if not reference.startswith(HASH_PREFIX):
            broken = self.unavailable.get(reference)
            if broken is not None and self.reveals(broken, token):
                raise _unavailable(broken)
        return super().get_for_run(reference, version, token)


def _unavailable(model: ModelRecord) -> ModelNotReady:
    return model.not_ready()


@dataclass(frozen=True)
class Change:
    """One change of the model set, as replicas send it to each other: `put` (with the
    bytes and the owner's scheduling options), `rules` (access rule and run keys of that
    version) or `delete`."""

    op: str
    record: ModelRecord
    data: bytes = b""
    scheduling: SchedulingOptions = DEFAULT


@dataclass(frozen=True)
class LoadResult:
    entry: ModelRecord
    owner_token: str | None  # only when the server made it: it keeps just its hash
    replaced: bool
    owner_chosen: bool = False  # the new model's owner token is the one the client sent
    warmup: str | None = None  # the configured warm-up's outcome; None: none configured


@dataclass(frozen=True)
class LoadCredentials:
    """Who a load request is: `token` authorizes it (upload key, or the owner token of the
    model it replaces) and `owner_secret`, for a new model, becomes its owner token."""

    token: str | None
    owner_secret: str | None


class ModelService:
    def __init__(
        self,
        limits: Limits,
        runner: InferenceRunner,
        *,
        upload_key_hashes: frozenset[str] = frozenset(),
        admin_key_hashes: frozenset[str] = frozenset(),
        open_upload: bool = False,
        store: ModelStore | None = None,
        loading: Pool | None = None,
    ) -> None:
        self.limits = limits
        self.registry = ServiceRegistry(limits.max_models, self._is_uploader)
        self.store = store
        self._runner = runner
        # Checking a model and creating its session must not queue behind inferences.
        self._load_pool = loading
        self._upload_key_hashes = upload_key_hashes
        self._admin_key_hashes = admin_key_hashes
        self._open_upload = open_upload
        # Uploads of the same bytes that arrive together wait for one session.
        self._loading: dict[str, asyncio.Future[Session]] = {}
        # Serializes every change of the store and the registry together, so memory never
        # shows what the disk does not hold.
        self._lock = threading.Lock()
        # Told of every change made through this replica's API (never of changes it applied
        # from a peer), so `server.cluster` can copy it to the other replicas.
        self.on_change: Callable[[Change], None] | None = None

    def close(self) -> None:
        self.registry.close_sessions()
        if self.store is not None:
            self.store.close()

    # --- lookups ---

    def _current(self, name: str) -> ModelRecord | None:
        try:
            return self.registry.get(name)
        except ModelNotFound:
            return self.registry.unavailable.get(name)

    def _available(self, name: str) -> ModelRecord:
        broken = self.registry.unavailable.get(name)
        if broken is not None:
            raise _unavailable(broken)
        return self.registry.get(name)

    def resolve(self, reference: str, version: str | None, token: str | None) -> ModelRecord:
        """The model a name or `sha256:<hex>` (and version) names that `token` may run;
        refused exactly as for a missing model when `token` may not learn it exists."""
        return self.registry.get_for_run(reference, version, token)

    def check_capacity(self, name: str) -> None:
        """Refuses a new name when the server holds its maximum of models (before the upload's
        body is read; `load` checks again)."""
        self.registry.check_capacity(name)

    def index(self, token: str | None) -> list[dict[str, Any]]:
        """The repository index as `token` may see it: served models READY, stored but refused
        ones UNAVAILABLE. Restricted models appear only for their owner token or run keys;
        stored rows whose metadata did not authenticate only for upload-key holders (who
        may take their names over)."""
        rows: list[dict[str, Any]] = [
            {
                "name": e.name,
                "version": str(e.version),
                "state": e.state.value,
                "sha256": e.sha256,
                "public": e.public,
            }
            for e in self.registry.entries()
            if e.may_run(token)
        ]
        rows.extend(
            {
                "name": m.name,
                "version": str(m.version),
                "state": m.state.value,
                "sha256": m.sha256,
                "public": m.public,
                "reason": m.reason,
            }
            for m in list(self.registry.unavailable.values())
            if self.registry.reveals(m, token)
        )
        return sorted(rows, key=lambda row: row["name"])

    # --- authorization ---

    def authorize_load(
        self, name: str, bearer: str | None, owner_header: str | None = None
    ) -> LoadCredentials:
        """Raises unless the request may load `name`; for work to do before reading any bytes.

        A client may choose the new model's owner token (tritonclient discards the answer
        that carries a minted one): the `X-Blindfold-Owner-Token` header, or, where uploads
        are open and no upload key is needed, the Bearer token itself. For a name that exists
        the owner token is the credential, in either header."""
        check_name(name)
        if self._current(name) is not None:
            token = owner_header if owner_header is not None else bearer
            self._check_upload_right(name, token)
            return LoadCredentials(token, None)
        if owner_header is not None:
            check_owner_secret(owner_header)
            self._require_upload_key(bearer)
            return LoadCredentials(bearer, owner_header)
        if self._open_upload and bearer is not None and not self._is_upload_key(bearer):
            # (An upload key, shared by a team, never becomes an owner token.)
            check_owner_secret(bearer)
            return LoadCredentials(bearer, bearer)
        self._require_upload_key(bearer)
        return LoadCredentials(bearer, None)

    def _check_upload_right(self, name: str, token: str | None) -> ModelRecord | None:
        """New names need an upload key; existing ones need their owner token."""
        existing = self._current(name)
        if existing is not None and not existing.metadata_trusted:
            self._require_owner_or_admin(existing, token, "replace")
            return existing
        if existing is not None:
            self.require_owner(existing, token, "replace")
            return existing
        self._require_upload_key(token)
        return None

    def _is_uploader(self, token: str | None) -> bool:
        return self._open_upload or self._is_upload_key(token)

    def _is_upload_key(self, token: str | None) -> bool:
        if token is None:
            return False
        digest = token_hash(token)
        return any(hmac.compare_digest(digest, known) for known in self._upload_key_hashes)

    def _require_upload_key(self, token: str | None) -> None:
        if self._is_uploader(token):
            return
        if token is None:
            raise AuthenticationRequired(
                "uploading needs the deployment's upload key: send it as "
                "'Authorization: Bearer <key>' (blindfold --token / Client(token=...))",
            )
        raise AccessDenied("the token sent is not an upload key of this server")

    def _require_owner_or_admin(self, model: ModelRecord, token: str | None, action: str) -> None:
        """For a model whose row the store refused: neither an upload key nor open upload may
        take its name, or the host could hand any uploader a model by damaging its row."""
        if token is None:
            raise AuthenticationRequired(
                f"model {model.name!r} is unavailable ({model.reason}); to {action} it send its "
                "owner token or an operator admin key as 'Authorization: Bearer <token>'",
            )
        digest = token_hash(token)
        if model.is_owner(token) or any(
            hmac.compare_digest(digest, known) for known in self._admin_key_hashes
        ):
            return
        raise AccessDenied(
            f"model {model.name!r} is unavailable because its row in the store was refused; "
            f"only its owner token or an operator admin key (--admin-key-file) may {action} it",
        )

    @staticmethod
    def require_owner(entry: ModelRecord, token: str | None, action: str) -> None:
        if token is None:
            raise AuthenticationRequired(
                f"to {action} model {entry.name!r} send its owner token as "
                "'Authorization: Bearer <owner token>'",
            )
        if entry.owner_token_sha256 == "":
            raise AccessDenied(
                f"model {entry.name!r} was uploaded through the BlindAI compatibility port and "
                f"has no owner token, so no token may {action} it; a BlindAI /delete of its "
                "model_id removes it",
            )
        if not entry.is_owner(token):
            raise AccessDenied(
                f"the token sent is not the owner token of model {entry.name!r}; "
                f"only its owner may {action} it",
            )

    # --- restoring the store ---

    def restore(self) -> None:
        """Loads every stored model; one that cannot be served is marked UNAVAILABLE, logged
        with its name and reason, and the others still load. Its row and blob are kept: a
        wrong key (another build) is often an operator's mistake that must not destroy data;
        the owner can delete or re-upload it."""
        if self.store is None:
            return
        self.store.recover()
        outcomes: dict[str, Session | str] = {}
        for loaded in self.store.records():
            record = loaded.record
            if loaded.problem is not None:
                self._mark_unavailable(record, loaded.problem, metadata_trusted=False)
                continue
            outcome = outcomes.get(record.sha256)
            if outcome is None:
                outcome = self._restore_session(record)
                outcomes[record.sha256] = outcome
            if isinstance(outcome, str):
                self._mark_unavailable(record, outcome, metadata_trusted=True)
                continue
            try:
                self.registry.put(_loaded(record, outcome))
            except Refusal as exc:
                self._mark_unavailable(record, exc.message, metadata_trusted=True)
                continue
        logger.info(
            "model store %s: %d models restored, %d unavailable",
            self.store.directory,
            len(self.registry.entries()),
            len(self.registry.unavailable),
        )

    def _restore_session(self, record: ModelRecord) -> Session | str:
        if self.store is None:  # restore() calls this only with a store
            return "the server has no model store to restore the model from"
        data: ModelData | None = None
        try:
            data = self.store.open_model(record, self.limits.max_model_bytes)
            session = self._new_session(data, record.sha256)
            session.reopen_from(self._reopener(self.store, record))
            return session
        except ModelUnavailable as exc:
            return exc.reason
        except Refusal as exc:
            return f"the server now refuses its bytes: {exc.message}"
        finally:
            if isinstance(data, ModelBytes):
                data.close()  # the session keeps its own descriptor

    def _mark_unavailable(
        self, record: ModelRecord, reason: str, *, metadata_trusted: bool
    ) -> None:
        logger.error(
            "stored model %r (version %d, sha256 %s) is UNAVAILABLE: %s",
            record.name,
            record.version,
            record.sha256,
            reason,
        )
        self.registry.unavailable[record.name] = replace(
            record, session=None, reason=reason, metadata_trusted=metadata_trusted
        )

    # --- lifecycle ---

    async def load(
        self,
        name: str,
        data: ModelData,
        token: str | None,
        *,
        public: bool | None = None,
        sha256: str | None = None,
        owner_secret: str | None = None,
        scheduling: SchedulingOptions | None = None,
    ) -> LoadResult:
        """Loads `data` as model `name`; `sha256` is its hash when the caller computed it
        while the bytes arrived (hashing a large model here would stall the event loop).
        `owner_secret` (from `authorize_load`) becomes a new model's owner token; a model
        that exists meanwhile keeps its owner and needs `token` to be that owner's.
        `scheduling` (batching, concurrency) None keeps a replaced model's options."""
        check_name(name)
        existing = self._check_upload_right(name, token)
        if existing is not None:
            owner_secret = None
        return await self._load(
            name, data, existing, token, public, sha256, owner_secret, scheduling
        )

    async def load_unowned(self, name: str, data: bytes, sha256: str | None = None) -> LoadResult:
        """A public model no token owns: BlindAI 0.6's uploads, which carry no credential
        (`blindai_compat`). The caller decides whether such uploads are allowed; the name must
        be new. Only `unload_unowned` removes it: no Blindfold token can replace or unload it."""
        check_name(name)
        if self._current(name) is not None:
            raise Conflict(f"model {name!r} already exists")
        return await self._load(name, data, None, None, True, sha256, None, None, owned=False)

    async def _load(
        self,
        name: str,
        data: ModelData,
        existing: ModelRecord | None,
        token: str | None,
        public: bool | None,
        sha256: str | None,
        owner_secret: str | None,
        scheduling: SchedulingOptions | None,
        *,
        owned: bool = True,
    ) -> LoadResult:
        self.registry.check_capacity(name)
        if len(data) > self.limits.max_model_bytes:
            raise _too_large(len(data), self.limits.max_model_bytes)
        if isinstance(data, ModelBytes):
            sha256 = data.sha256  # hashed as it streamed in
        elif sha256 is None:
            sha256 = hashlib.sha256(data).hexdigest()
        session = await self._session_for(data, sha256)
        # A stored model whose row was refused keeps only its owner (when the manifest names
        # it and the owner is the one replacing it): default access, no run keys. Taken over
        # by an admin key it gets a fresh owner token.
        takeover = existing is not None and not existing.metadata_trusted
        inherit = None if takeover else existing
        keeps_owner = inherit is not None or (existing is not None and existing.is_owner(token))
        owner_token = None if keeps_owner or not owned else owner_secret or new_token("bfo")
        record = ModelRecord(
            name=name,
            version=existing.version + 1 if existing else 1,
            sha256=sha256,
            size=len(data),
            owner_token_sha256=existing.owner_token_sha256
            if existing is not None and keeps_owner
            else (token_hash(owner_token) if owner_token else ""),  # "": nobody owns it
            # New models are restricted unless the owner opts into public.
            public=(inherit.public if inherit else False) if public is None else public,
            run_keys=_run_keys(inherit),
            # None keeps a replaced model's options (an untrusted row's are the defaults)
            scheduling=scheduling
            if scheduling is not None
            else (inherit.scheduling if inherit else DEFAULT),
        )
        scheduling = record.scheduling
        entry = _loaded(record, session)
        try:
            scheduling.check_model(session)
            warmup = await self._warm_up(record, session)
            if self.store is None:
                self._commit_load(existing, record, entry, data)
            else:
                await asyncio.to_thread(self._commit_load, existing, record, entry, data)
        except BaseException:
            if self.registry.session_for(sha256) is not session:
                session.close()  # made for this upload only: end its worker
            raise
        logger.info(
            "model %r version %d loaded (sha256 %s)",
            name,
            entry.version,
            sha256,
            extra={"model": name, "model_sha256": sha256},
        )
        if self.on_change is not None:
            # Replicas read the bytes from the session's own copy when it keeps one; only
            # a session without one (no isolation) needs them copied here.
            kept = session.keeps_model_bytes
            self._notify(Change("put", record, b"" if kept else _copy(data), scheduling))
        chosen = owner_token is not None and owner_token == owner_secret
        return LoadResult(
            entry,
            None if chosen else owner_token,
            existing is not None,
            owner_chosen=chosen,
            warmup=warmup,
        )

    async def _warm_up(self, record: ModelRecord, session: Session) -> str | None:
        """Runs the owner's configured warm-up (`warmup_shapes`, Triton's `model_warmup`)
        once, as a request through the scheduler, so that onnxruntime's first-run cost for
        the shapes users send is paid before the model is reported ready. Returns "ok", or
        "failed: " and the refusal (its message never quotes tensor values); None when none
        is configured. A failed warm-up does not refuse the model: some models need
        particular values, not zeros."""
        options = record.scheduling
        if not options.warmup_shapes:
            return None
        # Off the loop: zeros of up to WARMUP_INPUT_LIMIT (for BYTES, one object each).
        feeds = await asyncio.to_thread(options.warmup_feeds, session)
        if feeds is None:
            return None
        # Only the dimensions: input names come from the model, and are not logged.
        shapes = options.warmup_dimensions()
        try:
            await self._runner.run(session, session.output_names, feeds)
        except Refusal as exc:
            logger.warning(
                "model %r (sha256:%s) failed its configured warm-up (warmup_shapes %s): %s; "
                "it loads, and its first requests pay onnxruntime's first-run cost",
                record.name,
                record.sha256,
                shapes,
                exc.message,
            )
            return f"failed: {exc.message}"
        finally:
            del feeds
        session.remember_warmup(options)
        logger.info(
            "model %r (sha256:%s) warmed up on its configured warmup_shapes %s before ready",
            record.name,
            record.sha256,
            shapes,
        )
        return "ok"

    async def warm_up_restored(self) -> None:
        """The configured warm-ups of the models `restore()` brought back: run by the app's
        start-up, on the event loop that serves them, before the server listens."""
        for entry in self.registry.entries():
            if entry.scheduling.warmup_shapes and entry.session is not None:
                try:
                    await self._warm_up(entry, entry.session)
                except Refusal as exc:  # shapes that no longer fit: only the warm-up is lost
                    logger.warning(
                        "model %r: its configured warm-up was not run: %s", entry.name, exc.message
                    )

    def _notify(self, change: Change) -> None:
        if self.on_change is not None:
            self.on_change(change)

    # --- changes replicated from a peer replica (`server.cluster`): no token, the peer
    # authenticated with the replication key; the higher version wins ---

    async def apply_put(
        self, record: ModelRecord, data: bytes, scheduling: SchedulingOptions = DEFAULT
    ) -> bool:
        """Installs a peer's model version, with the scheduling options its owner chose,
        unless this replica already holds it or a newer one; returns whether anything
        changed."""
        check_name(record.name)
        existing = self._current(record.name)
        if existing is not None and existing.version >= record.version:
            return False
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise InvalidRequest(f"replicated model {record.name!r}: bytes do not match")
        session = await self._session_for(data, record.sha256)
        record = replace(record, scheduling=scheduling)
        entry = _loaded(record, session)
        try:
            scheduling.check_model(session)
            await self._warm_up(record, session)
            if self.store is None:
                self._commit_load(existing, record, entry, data)
            else:
                await asyncio.to_thread(self._commit_load, existing, record, entry, data)
        except BaseException:
            if self.registry.session_for(record.sha256) is not session:
                session.close()
            raise
        logger.info("model %r version %d replicated from a peer", record.name, record.version)
        return True

    def apply_rules(self, record: ModelRecord) -> bool:
        with self._lock:
            current = self._current(record.name)
            if current is None or current.unavailable or current.version != record.version:
                return False
            self._persist_rules(current, record.public, record.run_keys)
            current.public = record.public
            current.run_keys = dict(record.run_keys)
        return True

    def apply_delete(self, name: str, version: int) -> bool:
        with self._lock:
            current = self._current(name)
            if current is None or current.version > version:
                return False
            self._remove(current)
        logger.info("model %r unloaded by a peer replica", name)
        return True

    def snapshot(self) -> list[tuple[ModelRecord, SchedulingOptions]]:
        """What a joining replica copies: every servable model's record and options."""
        with self._lock:
            return [(_stored(e), e.scheduling) for e in self.registry.entries()]

    def _commit_load(
        self,
        existing: ModelRecord | None,
        record: ModelRecord,
        entry: ModelRecord,
        data: ModelData,
    ) -> None:
        """Durable first (blob, then row), visible second. Runs off the event loop."""
        with _storing():
            self._commit_load_storing(existing, record, entry, data)

    def _commit_load_storing(
        self,
        existing: ModelRecord | None,
        record: ModelRecord,
        entry: ModelRecord,
        data: ModelData,
    ) -> None:
        store = self.store
        staged = None
        try:
            if store is not None:
                # Even when a blob of these bytes exists: sessions reopen their model from it
                # (`Session.reopen_from`), and the upload is the chance to replace a blob the
                # host damaged since.
                staged = store.stage_blob(record.sha256, data)  # slow: outside the lock
            with self._lock:
                if self._current(record.name) is not existing:
                    raise Conflict(
                        f"model {record.name!r} changed while this upload was in progress; "
                        "upload again",
                    )
                self.registry.check_capacity(record.name)
                if entry.loaded().closed:
                    raise Conflict(
                        f"model {record.name!r} changed while this upload was in progress; "
                        "upload again",
                    )
                if store is not None:
                    store.commit_model(record, staged)
                    staged = None
                    entry.loaded().reopen_from(self._reopener(store, record))
                self.registry.put(entry)
                self.registry.unavailable.pop(record.name, None)
                self._heal(entry.sha256, entry.loaded())
        finally:
            if store is not None:
                store.discard(staged)

    def _heal(self, sha256: str, session: Session) -> None:
        """Stored models refused at start for their blob serve again once the same bytes
        are uploaded (and sealed) anew."""
        for broken in list(self.registry.unavailable.values()):
            if broken.sha256 != sha256 or not broken.metadata_trusted:
                continue
            try:
                self.registry.put(_loaded(replace(broken, reason=""), session))
            except Refusal:
                continue
            del self.registry.unavailable[broken.name]
            logger.info("stored model %r is available again", broken.name)

    async def _session_for(self, data: ModelData, sha256: str) -> Session:
        """The live session for these bytes, or a new one; concurrent uploads of identical
        bytes share the one being made."""
        session = self.registry.session_for(sha256)
        if session is not None and not session.closed:
            return session
        pending = self._loading.get(sha256)
        if pending is not None:
            return await asyncio.shield(pending)
        pending = asyncio.get_running_loop().create_future()
        self._loading[sha256] = pending
        try:
            if self._load_pool is not None:
                session = await self._load_pool.call(self._new_session, data, sha256)
            else:
                session = await self._runner.call(self._new_session, data, sha256)
            pending.set_result(session)
            return session
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._loading[sha256]

    def _reopener(self, store: ModelStore, record: ModelRecord) -> Callable[[], ModelData]:
        """Gets a stored model's bytes back from its sealed blob, for a session that lets go
        of its own copy (`Session.reopen_from`): to restart its worker after a crash, or to
        send the model to a joining replica. A blob the host removed or changed meanwhile is
        a 503 naming the problem; the model serves again once it is uploaded again."""
        limit = self.limits.max_model_bytes

        def reopen() -> ModelData:
            try:
                return store.open_model(record, limit)
            except ModelUnavailable as exc:
                raise Unavailable(
                    f"model {record.name!r} must be reloaded from the model store, but "
                    f"{exc.reason}; upload it again"
                ) from None

        return reopen

    def _new_session(self, data: ModelData, sha256: str) -> Session:
        if isinstance(data, ModelBytes):
            # Checked through a mapping of the memfd, with no copy of the weights: the checker
            # walks the mapping and hands protobuf only the model's skeleton, so protobuf
            # never keeps the mapping referenced (it could, after a failed parse of the
            # mapping itself: a BufferError at close, a 500 instead of the 400).
            with data.view() as view:
                check_model(view, self.limits)
        else:
            check_model(data, self.limits)
        return self._runner.new_session(data, sha256)

    def unload(self, name: str, token: str | None) -> ModelRecord:
        with self._lock:
            current = self._current(name)
            if current is None:
                raise ModelNotFound(
                    f"unknown model {name!r}; list models with POST /v2/repository/index"
                )
            if not current.metadata_trusted:
                self._require_owner_or_admin(current, token, "delete")
            else:
                self.require_owner(current, token, "unload")
            self._remove(current)
        logger.info(
            "model %r unloaded", name, extra={"model": name, "model_sha256": current.sha256}
        )
        self._notify(Change("delete", _stored(current)))
        return current

    def unload_unowned(self, name: str) -> ModelRecord:
        """Removes a model nobody owns (`load_unowned`): as in BlindAI 0.6, knowing its name
        is the only right needed. Owned models answer as missing."""
        with self._lock:
            current = self._current(name)
            if current is None or current.owner_token_sha256 != "" or not current.metadata_trusted:
                raise ModelNotFound(f"no model uploaded through BlindAI has model_id {name!r}")
            self._remove(current)
        logger.info("model %r (no owner) unloaded", name)
        self._notify(Change("delete", _stored(current)))
        return current

    def _remove(self, current: ModelRecord) -> None:
        """Deletes durably, then from memory; the caller holds the lock and checked rights."""
        if self.store is not None:
            with _storing():
                self.store.delete_model(current.name)
        if current.unavailable:
            del self.registry.unavailable[current.name]
        else:
            self.registry.remove(current.name)

    def _persist_rules(self, entry: ModelRecord, public: bool, run_keys: dict[str, str]) -> None:
        """Writes a change of access rules to the store (before memory shows it)."""
        if self.store is None:
            return
        record = replace(_stored(entry), public=public, run_keys=dict(run_keys))
        with _storing():
            self.store.update_rules(record)

    def set_public(self, name: str, token: str | None, public: bool) -> ModelRecord:
        with self._lock:
            entry = self._available(name)
            self.require_owner(entry, token, "change access to")
            self._persist_rules(entry, public, entry.run_keys)
            entry.public = public
        self._notify(Change("rules", _stored(entry)))
        return entry

    def create_run_key(self, name: str, token: str | None) -> tuple[str, str]:
        with self._lock:
            entry = self._available(name)
            self.require_owner(entry, token, "issue run keys for")
            run_key = new_token("bfr")
            key_id = hashlib.sha256(run_key.encode()).hexdigest()[:16]
            digest = token_hash(run_key)
            self._persist_rules(entry, entry.public, {**entry.run_keys, key_id: digest})
            entry.run_keys[key_id] = digest
        self._notify(Change("rules", _stored(entry)))
        return key_id, run_key

    def revoke_run_key(self, name: str, token: str | None, key_id: str) -> None:
        with self._lock:
            entry = self._available(name)
            self.require_owner(entry, token, "revoke run keys of")
            if key_id not in entry.run_keys:
                raise NotFound(f"model {name!r} has no run key with id {key_id!r}")
            remaining = {k: v for k, v in entry.run_keys.items() if k != key_id}
            self._persist_rules(entry, entry.public, remaining)
            entry.run_keys.pop(key_id, None)
        self._notify(Change("rules", _stored(entry)))


@contextlib.contextmanager
def _storing() -> Iterator[None]:
    """The store's failures (disk full, I/O errors) as a clear refusal to retry later;
    nothing was changed."""
    try:
        yield
    except StoreError as exc:
        raise Unavailable(f"the model store cannot save this change: {exc}") from None


def _run_keys(existing: ModelRecord | None) -> dict[str, str]:
    if existing is None or not existing.metadata_trusted:
        return {}
    return dict(existing.run_keys)


def _loaded(record: ModelRecord, session: Session) -> ModelRecord:
    """The live record serving `record` (which stays what the store and replicas are given)."""
    return replace(record, run_keys=dict(record.run_keys), session=session)


def _stored(model: ModelRecord) -> ModelRecord:
    """A copy of what the store keeps of `model`, as replicas are told of it: no session, no
    state, and run keys of its own (the live record's change after this)."""
    return replace(model, run_keys=dict(model.run_keys), session=None, reason="")


def _copy(data: ModelData) -> bytes:
    if isinstance(data, ModelBytes):
        with data.view() as view:
            return bytes(view)
    return bytes(data)


def _too_large(size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the model is {size} bytes, more than the server's limit of {limit} (--max-model-bytes)",
    )
