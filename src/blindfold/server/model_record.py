"""The one record of a model on the server, shared by the store (its persisted fields are a
row), the registry and the model service (which add its state in this process): name,
version, SHA-256, access rules as token hashes, and whether it is LOADED (with its live
onnxruntime session) or UNAVAILABLE (stored, but refused at start, with the reason)."""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blindfold.server.refusals import ModelNotReady
from blindfold.server.scheduler import DEFAULT, SchedulingOptions

if TYPE_CHECKING:
    from blindfold.server.runtime import Session


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ModelState(enum.Enum):
    STORED = "STORED"  # a description only: read from the store or a peer, not yet loaded
    LOADED = "READY"  # its session serves it (the repository index calls this READY)
    UNAVAILABLE = "UNAVAILABLE"  # the server could not bring it back; `reason` says why


@dataclass
class ModelRecord:
    """One model. The first nine fields are what the store keeps (and MACs, `canonical`);
    the others are its state in this server and are never stored."""

    name: str
    version: int
    sha256: str
    size: int
    owner_token_sha256: str  # "": nobody owns it (BlindAI uploads, rows nothing vouches for)
    public: bool
    created: float = field(default_factory=time.time)
    run_keys: dict[str, str] = field(default_factory=dict)  # key id -> token SHA-256
    scheduling: SchedulingOptions = DEFAULT  # batching and concurrency, chosen at upload
    session: Session | None = field(default=None, compare=False, repr=False)
    reason: str = ""  # why it is UNAVAILABLE (never its bytes)
    # False: its stored row's access rules cannot be believed; the record then holds only
    # what the store's manifest authenticates (restricted, no run keys).
    metadata_trusted: bool = True

    @property
    def state(self) -> ModelState:
        if self.reason:
            return ModelState.UNAVAILABLE
        return ModelState.STORED if self.session is None else ModelState.LOADED

    @property
    def unavailable(self) -> bool:
        return self.state is ModelState.UNAVAILABLE

    def loaded(self) -> Session:
        """The session serving it; refused as not ready when it has none."""
        if self.session is None:
            raise self.not_ready()
        return self.session

    def not_ready(self) -> ModelNotReady:
        why = self.reason or "it is not loaded"
        return ModelNotReady(f"model {self.name!r} is in the store but unavailable: {why}")

    def is_owner(self, token: str | None) -> bool:
        return (
            token is not None
            and self.owner_token_sha256 != ""
            and hmac.compare_digest(token_hash(token), self.owner_token_sha256)
        )

    def may_run(self, token: str | None) -> bool:
        """Whether `token` may run it (for an UNAVAILABLE one: could, so may learn it exists)."""
        if not self.metadata_trusted:
            return False
        if self.public or self.is_owner(token):
            return True
        if token is None:
            return False
        digest = token_hash(token)
        return any(hmac.compare_digest(digest, known) for known in self.run_keys.values())

    def canonical(self) -> bytes:
        """The stored fields in one canonical form: what the store's MAC and manifest cover.
        Scheduling options appear only when not the defaults, so rows written before the
        store kept them (schema version 2) still authenticate."""
        fields = {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "owner_token_sha256": self.owner_token_sha256,
            "public": self.public,
            "created": repr(float(self.created)),
            "run_keys": sorted(self.run_keys.items()),
        }
        if self.scheduling != DEFAULT:
            fields["scheduling"] = self.scheduling.to_json()
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()
