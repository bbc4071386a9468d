"""Model management behind the HTTP routes: upload (check, hash, dedupe, session),
replacement, unload, access rules and run keys. Tokens are compared by hash only."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from blindfold.errors import RequestRejected
from blindfold.server.limits import Limits
from blindfold.server.models import (
    ModelEntry,
    ModelRegistry,
    check_name,
    new_token,
    token_hash,
)
from blindfold.server.onnx_check import check_model
from blindfold.server.runtime import InferenceRunner, Session

logger = logging.getLogger("blindfold.models")


@dataclass(frozen=True)
class LoadResult:
    entry: ModelEntry
    owner_token: str | None  # only when the model is new: the server keeps just its hash
    replaced: bool


class ModelService:
    def __init__(
        self,
        limits: Limits,
        runner: InferenceRunner,
        *,
        upload_key_hashes: frozenset[str] = frozenset(),
        open_upload: bool = False,
        intra_op_threads: int = 0,
    ) -> None:
        self.limits = limits
        self.registry = ModelRegistry(limits.max_models)
        self._runner = runner
        self._upload_key_hashes = upload_key_hashes
        self._open_upload = open_upload
        self._intra_op_threads = intra_op_threads

    # --- authorization ---

    def _check_upload_right(self, name: str, token: str | None) -> ModelEntry | None:
        """New names need an upload key; existing ones need their owner token."""
        try:
            existing = self.registry.get(name)
        except RequestRejected:
            existing = None
        if existing is not None:
            self.require_owner(existing, token, "replace")
            return existing
        if self._open_upload:
            return None
        if token is None:
            raise RequestRejected(
                401,
                "uploading needs the deployment's upload key: send it as "
                "'Authorization: Bearer <key>' (blindfold --token / Client(token=...))",
            )
        digest = token_hash(token)
        if not any(hmac.compare_digest(digest, known) for known in self._upload_key_hashes):
            raise RequestRejected(403, "the token sent is not an upload key of this server")
        return None

    @staticmethod
    def require_owner(entry: ModelEntry, token: str | None, action: str) -> None:
        if token is None:
            raise RequestRejected(
                401,
                f"to {action} model {entry.name!r} send its owner token as "
                "'Authorization: Bearer <owner token>'",
            )
        if not entry.is_owner(token):
            raise RequestRejected(
                403,
                f"the token sent is not the owner token of model {entry.name!r}; "
                f"only its owner may {action} it",
            )

    # --- lifecycle ---

    async def load(
        self, name: str, data: bytes, token: str | None, *, public: bool | None = None
    ) -> LoadResult:
        check_name(name)
        existing = self._check_upload_right(name, token)
        self.registry.check_capacity(name)
        if len(data) > self.limits.max_model_bytes:
            raise _too_large(len(data), self.limits.max_model_bytes)
        sha256 = hashlib.sha256(data).hexdigest()
        session = self.registry.session_for(sha256)
        if session is None:
            session = await self._runner.call(self._new_session, data, sha256)
        owner_token = None if existing else new_token("bfo")
        entry = ModelEntry(
            name=name,
            version=existing.version + 1 if existing else 1,
            session=session,
            owner_token_sha256=existing.owner_token_sha256
            if existing
            else token_hash(owner_token or ""),
            public=(existing.public if existing else True) if public is None else public,
            run_keys=dict(existing.run_keys) if existing else {},
        )
        self.registry.put(entry)
        logger.info("model %r version %d loaded (sha256 %s)", name, entry.version, sha256)
        return LoadResult(entry, owner_token, existing is not None)

    def _new_session(self, data: bytes, sha256: str) -> Session:
        check_model(data, self.limits)
        return Session(data, sha256, self._intra_op_threads)

    def unload(self, name: str, token: str | None) -> ModelEntry:
        entry = self.registry.get(name)
        self.require_owner(entry, token, "unload")
        removed = self.registry.remove(name)
        logger.info("model %r unloaded", name)
        return removed

    def set_public(self, name: str, token: str | None, public: bool) -> ModelEntry:
        entry = self.registry.get(name)
        self.require_owner(entry, token, "change access to")
        entry.public = public
        return entry

    def create_run_key(self, name: str, token: str | None) -> tuple[str, str]:
        entry = self.registry.get(name)
        self.require_owner(entry, token, "issue run keys for")
        run_key = new_token("bfr")
        key_id = hashlib.sha256(run_key.encode()).hexdigest()[:16]
        entry.run_keys[key_id] = token_hash(run_key)
        return key_id, run_key

    def revoke_run_key(self, name: str, token: str | None, key_id: str) -> None:
        entry = self.registry.get(name)
        self.require_owner(entry, token, "revoke run keys of")
        if entry.run_keys.pop(key_id, None) is None:
            raise RequestRejected(404, f"model {name!r} has no run key with id {key_id!r}")


def _too_large(size: int, limit: int) -> RequestRejected:
    return RequestRejected(
        413,
        f"the model is {size} bytes, more than the server's limit of {limit} (--max-model-bytes)",
    )
