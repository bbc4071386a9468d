"""The in-memory model registry: names, versions, SHA-256 identities, access rules, and the
sharing of one onnxruntime session between every name that holds identical bytes.

Visibility: a restricted model exists only for callers holding its owner token or a run key;
for everyone else lookups answer exactly as for a missing model."""

from __future__ import annotations

import re
import secrets
import threading

from blindfold.server.model_record import ModelRecord
from blindfold.server.refusals import Conflict, InvalidRequest, ModelNotFound
from blindfold.server.runtime import Session

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
HASH_PREFIX = "sha256:"


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


OWNER_SECRET_HEADER = "X-Blindfold-Owner-Token"  # noqa: S105 (a header's name, not a secret)
MIN_SECRET_BITS = 128
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def check_owner_secret(secret: str) -> None:
    """An owner token the client chose (tritonclient cannot read the one the server mints)
    must be as hard to guess as a minted one. Its strength is estimated from its length and
    alphabet (hex: 4 bits a character, anything else: at most 6), and a secret of fewer than
    8 distinct characters is refused outright. The message never quotes the secret."""
    bits_per_char = 4 if set(secret) <= HEX_DIGITS else 6
    if len(secret) * bits_per_char < MIN_SECRET_BITS or len(set(secret)) < 8:
        raise InvalidRequest(
            f"the owner token chosen by the client is too weak: it needs at least "
            f"{MIN_SECRET_BITS} random bits ({MIN_SECRET_BITS // 6 + 1} base64url or "
            f"{MIN_SECRET_BITS // 4} hex characters), e.g. secrets.token_urlsafe(32); "
            f"this one has {len(secret)} characters",
        )


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)",
        )


class ModelRegistry:
    def __init__(self, max_models: int) -> None:
        self._max_models = max_models
        self._entries: dict[str, ModelRecord] = {}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def session_for(self, sha256: str) -> Session | None:
        """The live session for these bytes, so identical uploads share one."""
        with self._lock:
            return self._sessions.get(sha256)

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def check_capacity(self, name: str) -> None:
        with self._lock:
            if name not in self._entries and len(self._entries) >= self._max_models:
                raise Conflict(
                    f"the server already holds its maximum of {self._max_models} models "
                    "(--max-models); unload one first",
                )

    def put(self, entry: ModelRecord) -> ModelRecord | None:
        """Adds or replaces the entry for entry.name; returns the replaced entry."""
        with self._lock:
            previous = self._entries.get(entry.name)
            if previous is None and len(self._entries) >= self._max_models:
                raise Conflict(
                    f"the server already holds its maximum of {self._max_models} models "
                    "(--max-models); unload one first",
                )
            self._entries[entry.name] = entry
            self._sessions[entry.sha256] = entry.loaded()
            if previous is not None:
                self._release(previous.sha256)
            return previous

    def remove(self, name: str) -> ModelRecord:
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                raise _not_found(name)
            self._release(entry.sha256)
            return entry

    def _release(self, sha256: str) -> None:
        """Closes the session (ending its worker) once no name refers to its bytes."""
        if not any(e.sha256 == sha256 for e in self._entries.values()):
            session = self._sessions.pop(sha256, None)
            if session is not None:
                session.close()

    def close_sessions(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()

    def get(self, name: str) -> ModelRecord:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise _not_found(name)
        return entry

    def get_for_run(self, reference: str, version: str | None, token: str | None) -> ModelRecord:
        """Resolves a name or `sha256:<hex>` the caller may run (an entry granting access)."""
        if reference.startswith(HASH_PREFIX):
            digest = reference[len(HASH_PREFIX) :].lower()
            with self._lock:
                candidates = [e for e in self._entries.values() if e.sha256 == digest]
            if not candidates:
                raise _not_found(reference)
            allowed = [e for e in candidates if e.may_run(token)]
            if not allowed:
                raise _not_found(reference)
            return allowed[0]
        entry = self.get(reference)
        if not entry.may_run(token):
            # Answered exactly like a missing model, so no one learns a restricted name.
            raise _not_found(reference)
        if version is not None and version != str(entry.version):
            raise ModelNotFound(
                f"model {reference!r} has no version {version!r}; it serves version "
                f"{entry.version}",
            )
        return entry

    def entries(self) -> list[ModelRecord]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)


def _not_found(reference: str) -> ModelNotFound:
    """Also the answer for a restricted model the caller may not run: the two must not differ."""
    return ModelNotFound(
        f"unknown model {reference!r}; list models with POST /v2/repository/index (a "
        "restricted model is visible only with its owner token or a run key, sent as "
        "'Authorization: Bearer <token>')",
    )
