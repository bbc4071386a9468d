"""Replicas that share one attested service identity, without an outside key service
(issue 11, section 2; README "Scaling out").

Owns three things:

- **the cluster policy** (`ClusterPolicy`): an ordinary client policy file (the same `Policy`
  objects and verifiers clients use) plus a `[cluster]` table; the simulation TEE is
  accepted only with `[cluster] unsafe_allow_simulation = true`.
- **the join** (`join_cluster` on the joiner, `JoinDesk` on the existing replica): the
  joiner attests the peer under the cluster policy (fresh nonce, `client.attest.attest`),
  then asks the peer for a nonce of its own and answers with evidence whose report data is
  `join_key_binding(X25519 key) || peer nonce`. The peer verifies that evidence under the
  same cluster policy and only then releases the `ServiceIdentity` sealed to that X25519
  key. A refusal is logged with its reason on both sides, and the joiner gets nothing.
- **replication** (`Replicator`): every change made through one replica's API (upload,
  delete, access rule, run keys) is pushed to every other member over TLS pinned to the
  shared certificate, authenticated with the replication key the identity derives; a
  joiner first copies every existing model from its peer. The higher model version wins.
  Members also find each other's standing evidence by hash (`Replicator.find_evidence`), so
  a receipt signed by one replica verifies through whichever replica the client reaches.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import re
import secrets
import struct
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.attestation.verify import verify_evidence
from blindfold.client.attest import attest
from blindfold.client.transport import Endpoint, Transport, pinned_context
from blindfold.errors import (
    AttestationError,
    BlindfoldError,
    ConfigurationError,
    EvidenceError,
    RequestRejected,
)
from blindfold.server.model_bytes import ModelBytes, return_freed_memory
from blindfold.server.model_record import ModelRecord
from blindfold.server.scheduler import DEFAULT, SchedulingOptions
from blindfold.server.service import Change, ModelService
from blindfold.server.service_identity import ServiceIdentity, join_key_binding, open_sealed
from blindfold.server.tee.base import TeeProvider

logger = logging.getLogger("blindfold.cluster")

REPLICATION_HEADER = "blindfold-replication"
CHALLENGE_LIFETIME = 120.0  # seconds a join nonce stays valid
MAX_CHALLENGES = 256  # outstanding join nonces; beyond it new ones are refused (429)
MAX_JOIN_BODY = 4 << 20  # evidence with collateral is tens of KiB
MEMBER_GIVE_UP = 30.0  # seconds a peer may stay unreachable before it is dropped
EVIDENCE_TIMEOUT = 5.0  # seconds to wait for a member's standing evidence
MAX_EVIDENCE_KEPT = 64  # other members' standing evidence remembered (members x renewals)
MAX_EVIDENCE_LOOKUPS = 4  # concurrent lookups of other members' evidence; beyond: 503
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class JoinRefused(BlindfoldError):
    """The peer, or this replica, refused the join; the message says why."""


class PeerUnreachable(JoinRefused):
    """Nothing answered at the peer's address (no refusal: nobody is there)."""


# --- the cluster policy ---


@dataclass(frozen=True)
class ClusterPolicy:
    policy: Policy
    allow_simulation: bool = False

    @classmethod
    def load(cls, path: Path) -> ClusterPolicy:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigurationError(f"cannot read cluster policy {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"cluster policy {path} is not valid TOML: {exc}") from None
        section = data.pop("cluster", {})
        if not isinstance(section, dict) or set(section) - {"unsafe_allow_simulation"}:
            raise ConfigurationError(
                f"{path}: [cluster] takes only unsafe_allow_simulation = true|false"
            )
        allow = section.get("unsafe_allow_simulation", False)
        if not isinstance(allow, bool):
            raise ConfigurationError(f"{path}: [cluster] unsafe_allow_simulation must be a bool")
        policy = Policy.from_dict(data, source=str(path))
        if "simulation" in policy.kinds and not allow:
            raise ConfigurationError(
                f"{path}: the cluster policy accepts the simulation TEE, which protects "
                "nothing: anyone could join and receive the service identity. Only for tests, "
                "add [cluster] unsafe_allow_simulation = true"
            )
        if policy.deployment is not None and {"operator_keys", "names"} & set(
            policy.deployment.values
        ):
            raise ConfigurationError(
                f"{path}: a cluster policy cannot pin operator_keys or names: a joining "
                "replica has no endorsement yet. Pin the launch-time field instead (host_data, "
                "mr_config_id, simulation_deployment_id)"
            )
        return cls(policy, allow)

    def verify_joiner(self, evidence: Evidence, join_key: bytes, nonce: bytes) -> Verdict:
        """The peer side: `evidence` must be genuine, pass the policy (code and deployment)
        and bind `join_key` and this peer's `nonce`. Raises an AttestationError naming why."""
        if evidence.kind == "simulation" and not self.allow_simulation:
            raise JoinRefused("simulation evidence, and the cluster policy does not allow it")
        verdict = verify_evidence(evidence)
        public = x25519.X25519PublicKey.from_public_bytes(join_key)
        if verdict.report_data[:32] != join_key_binding(public):
            raise JoinRefused("the evidence does not bind the join key the joiner sent")
        if not hmac.compare_digest(verdict.report_data[32:64], nonce):
            raise JoinRefused("the evidence does not carry this replica's join nonce")
        self.policy.verify(verdict)
        if self.policy.deployment is not None:
            self.policy.deployment.verify(verdict, None)
        return verdict


# --- the joiner ---


@dataclass(frozen=True)
class Joined:
    identity: ServiceIdentity
    peer_url: str
    members: list[str]
    endorsement: dict[str, Any] | None


def join_cluster(
    peer_url: str, cluster: ClusterPolicy, provider: TeeProvider, advertise_url: str
) -> Joined:
    """Attests the peer, is attested by it, and returns the service identity it released."""
    endpoint = Endpoint.parse(peer_url)
    try:
        peer = attest(endpoint, cluster.policy, allow_simulation=cluster.allow_simulation)
    except AttestationError as exc:
        if str(exc).startswith("cannot fetch attestation"):  # attest's words for OSError
            raise PeerUnreachable(str(exc)) from None
        raise JoinRefused(f"the peer {peer_url} fails the cluster policy: {exc}") from None
    transport = Transport(endpoint, pinned_context(peer.certificate_pem), peer.spki_sha256, 60.0)
    try:
        challenge = _json_answer(transport.request("POST", "/v2/cluster/challenge", b"{}"))
        nonce = bytes.fromhex(str(challenge["nonce"]))
        join_key = x25519.X25519PrivateKey.generate()
        binding = join_key_binding(join_key.public_key())
        evidence = provider.evidence(binding + nonce)
        raw_key = join_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        request = {
            "evidence": evidence.to_json(),
            "join_key": raw_key.hex(),
            "nonce": nonce.hex(),
            "advertise_url": advertise_url,
        }
        answer = _json_answer(
            transport.request(
                "POST",
                "/v2/cluster/join",
                json.dumps(request).encode(),
                {"Content-Type": "application/json"},
            )
        )
    finally:
        transport.close()
    identity = open_sealed(answer.get("identity"), join_key, binding + nonce)
    if _spki(identity) != peer.spki_sha256:
        raise JoinRefused(
            "the peer released an identity other than the one its evidence binds; refusing it"
        )
    members = [str(url) for url in answer.get("members", []) if isinstance(url, str)]
    return Joined(identity, peer_url, members, answer.get("endorsement"))


def _json_answer(response: Any) -> dict[str, Any]:
    try:
        document = json.loads(response.body)
    except ValueError:
        document = {}
    if response.status != 200:
        reason = document.get("error") if isinstance(document, dict) else None
        raise JoinRefused(
            f"the peer refused: {reason or response.body[:300].decode(errors='replace')}"
        )
    if not isinstance(document, dict):
        raise JoinRefused("the peer answered something other than a JSON object")
    return document


def _spki(identity: ServiceIdentity) -> bytes:
    from blindfold.attestation.binding import public_key_sha256

    return public_key_sha256(identity.tls_key.public_key())


# --- the existing replica: nonces and releases ---


class JoinDesk:
    """Hands out join nonces and releases the identity to joiners that pass the policy."""

    def __init__(
        self, cluster: ClusterPolicy, identity: ServiceIdentity, replicator: Replicator
    ) -> None:
        self.cluster = cluster
        self.identity = identity
        self.replicator = replicator
        self._challenges: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def challenge(self) -> bytes:
        """A fresh join nonce. Anyone may ask, so the nonces kept are bounded: expired ones
        are forgotten, and when MAX_CHALLENGES are outstanding the request is refused (429)
        rather than evicting one, which would let a flood void every honest joiner's nonce."""
        nonce = secrets.token_bytes(32)
        now = time.monotonic()
        with self._lock:
            # Insertion order is issue order: the expired ones are at the front.
            while self._challenges:
                oldest, issued = next(iter(self._challenges.items()))
                if now - issued <= CHALLENGE_LIFETIME:
                    break
                del self._challenges[oldest]
            if len(self._challenges) >= MAX_CHALLENGES:
                wait = CHALLENGE_LIFETIME - (now - next(iter(self._challenges.values())))
                logger.warning(
                    "join nonce refused: %d outstanding, the most this replica keeps "
                    "(a flood of join attempts?)",
                    MAX_CHALLENGES,
                )
                raise RequestRejected(
                    429,
                    f"this replica already holds {MAX_CHALLENGES} unanswered join nonces, the "
                    "most it keeps; retry after the Retry-After seconds (unanswered nonces "
                    f"expire {CHALLENGE_LIFETIME:.0f} s after they are issued)",
                    {"Retry-After": str(max(1, int(wait) + 1))},
                )
            self._challenges[nonce] = now
        return nonce

    def release(self, document: Any, source: str, endorsement: Any) -> dict[str, Any]:
        """Verifies a join request (blocking: runs in the attestation pool) and returns the
        sealed identity; raises JoinRefused with the reason, which is logged here too."""
        try:
            if not isinstance(document, dict):
                raise JoinRefused("the join request is not a JSON object")
            try:
                nonce = bytes.fromhex(str(document["nonce"]))
                join_key = bytes.fromhex(str(document["join_key"]))
                evidence = Evidence.from_json(document["evidence"])
                advertise = str(document.get("advertise_url", ""))
            except (KeyError, ValueError, TypeError, EvidenceError) as exc:
                raise JoinRefused(f"the join request is malformed ({exc})") from None
            with self._lock:
                issued = self._challenges.pop(nonce, None)
            if issued is None or time.monotonic() - issued > CHALLENGE_LIFETIME:
                raise JoinRefused("unknown or expired join nonce; ask for a new challenge")
            if len(join_key) != 32:
                raise JoinRefused("the join key must be a 32-byte X25519 public key")
            try:
                verdict = self.cluster.verify_joiner(evidence, join_key, nonce)
            except AttestationError as exc:
                raise JoinRefused(f"its evidence fails the cluster policy: {exc}") from None
        except JoinRefused as exc:
            logger.warning("refused a replica joining from %s: %s", source, exc)
            raise
        binding = join_key_binding(x25519.X25519PublicKey.from_public_bytes(join_key))
        sealed = self.identity.seal_for(
            x25519.X25519PublicKey.from_public_bytes(join_key), binding + nonce
        )
        members = self.replicator.members()
        if advertise:
            self.replicator.add_member(advertise)
        logger.info(
            "released the service identity to a replica joining from %s (%s, measurement %s)",
            advertise or source,
            verdict.kind,
            _measurement(verdict),
        )
        return {
            "identity": sealed,
            "members": [self.replicator.self_url, *members],
            "endorsement": endorsement,
        }


def _measurement(verdict: Verdict) -> str:
    for name in ("measurement", "mr_enclave", "mr_td", "pcr0"):
        if name in verdict.measurements:
            return str(verdict.measurements[name])
    return "?"


# --- replication ---


def encode_change(change: Change) -> bytes:
    """`u32 header length || JSON header || model bytes` (bytes only for `put`)."""
    document: dict[str, Any] = {"op": change.op, "record": _record_json(change.record)}
    if change.op == "put":
        document["scheduling"] = change.scheduling.to_json()
    header = json.dumps(document).encode()
    return struct.pack(">I", len(header)) + header + change.data


def decode_change(body: bytes | bytearray) -> Change:
    try:
        (length,) = struct.unpack_from(">I", body)
        header = json.loads(bytes(body[4 : 4 + length]))
        op = header["op"]
        record = _record_from_json(header["record"])
        options = header.get("scheduling", {})
        if not isinstance(options, dict):
            raise TypeError("scheduling is not an object")
        data = bytes(body[4 + length :])
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise RequestRejected(400, f"malformed replicated change ({exc})") from None
    if op not in ("put", "rules", "delete"):
        raise RequestRejected(400, f"unknown replicated change {op!r}")
    # Checked as an upload's options are (a 400 naming the option).
    scheduling = SchedulingOptions.parse(options) or DEFAULT
    return Change(op, record, data, scheduling)


def _record_json(record: ModelRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "version": record.version,
        "sha256": record.sha256,
        "size": record.size,
        "owner_token_sha256": record.owner_token_sha256,
        "public": record.public,
        "created": record.created,
        "run_keys": dict(record.run_keys),
    }


def _record_from_json(data: dict[str, Any]) -> ModelRecord:
    run_keys = data.get("run_keys", {})
    if not isinstance(run_keys, dict):
        raise TypeError("run_keys is not an object")
    return ModelRecord(
        name=str(data["name"]),
        version=int(data["version"]),
        sha256=str(data["sha256"]),
        size=int(data["size"]),
        owner_token_sha256=str(data["owner_token_sha256"]),
        public=bool(data["public"]),
        created=float(data.get("created", time.time())),
        run_keys={str(k): str(v) for k, v in run_keys.items()},
    )


@dataclass
class _Member:
    url: str
    # (route, body, what) to post, in order; None stops the sender. A body that is a put
    # Change without bytes is framed when sent, from the model's memfd: a member that is
    # down does not make this replica hold a copy of every model uploaded meanwhile.
    pending: queue.Queue[tuple[str, bytes | Change, str] | None] = field(
        default_factory=queue.Queue
    )
    thread: threading.Thread | None = None


class Replicator:
    """This replica's view of the cluster: its members, and how to reach the bytes of every
    model it serves for snapshots: the sealed memfd of the model's isolated session, or, for
    sessions that keep none (`--unsafe-no-isolation`, Gramine), a copy kept here."""

    def __init__(self, identity: ServiceIdentity, service: ModelService, self_url: str) -> None:
        self.identity = identity
        self.service = service
        self.self_url = self_url
        self._key = identity.replication_key()
        self._members: dict[str, _Member] = {}
        self._blobs: dict[str, bytes] = {}  # only for sessions without their own copy
        # Other members' standing evidence by hash (`find_evidence`), oldest first.
        self._evidence: dict[str, dict[str, Any]] = {}
        self._lookups = threading.BoundedSemaphore(MAX_EVIDENCE_LOOKUPS)
        self._lock = threading.Lock()
        self._stopped = False
        self.synced = threading.Event()
        service.on_change = self._local_change

    # members

    def members(self) -> list[str]:
        with self._lock:
            return list(self._members)

    def add_member(self, url: str) -> None:
        if url == self.self_url:
            return
        with self._lock:
            if url in self._members or self._stopped:
                return
            member = _Member(url)
            member.thread = threading.Thread(
                target=self._send_loop, args=(member,), name="replicate", daemon=True
            )
            self._members[url] = member
        member.thread.start()
        logger.info("cluster member %s added", url)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            members = list(self._members.values())
        for member in members:
            member.pending.put(None)

    def authorized(self, request: Request) -> None:
        """Replication routes: the caller must hold the service identity's replication key."""
        presented = request.headers.get(REPLICATION_HEADER, "")
        if not hmac.compare_digest(presented.encode(), self._key.hex().encode()):
            raise RequestRejected(401, "replication routes are for replicas of this service")

    # outgoing

    def _local_change(self, change: Change) -> None:
        self._keep(change)
        what = f"{change.op} of model {change.record.name!r}"
        deferred = change.op == "put" and not change.data
        self._push(("/v2/cluster/apply", change if deferred else encode_change(change), what))

    def share_endorsement(self, endorsement: dict[str, Any]) -> None:
        """An operator endorsement posted here: it binds the shared key, so it holds for
        every replica."""
        self._push(("/v2/cluster/endorsement", json.dumps(endorsement).encode(), "endorsement"))

    def _push(self, item: tuple[str, bytes | Change, str]) -> None:
        with self._lock:
            members = list(self._members.values())
        for member in members:
            member.pending.put(item)

    def _keep(self, change: Change) -> None:
        session = self.service.registry.session_for(change.record.sha256)
        kept = session is not None and session.keeps_model_bytes
        with self._lock:
            if change.op == "put" and not kept:
                self._blobs[change.record.sha256] = change.data
            elif change.op == "delete":
                live = {e.sha256 for e in self.service.registry.entries()}
                for digest in [d for d in self._blobs if d not in live]:
                    del self._blobs[digest]

    def _transport(self, url: str, timeout: float | None = None) -> Transport:
        certificate = self.identity.certificate.public_bytes(serialization.Encoding.PEM).decode()
        context = pinned_context(certificate)
        if timeout is None:
            return Transport(Endpoint.parse(url), context, _spki(self.identity))
        return Transport(Endpoint.parse(url), context, _spki(self.identity), timeout)

    def _headers(self) -> dict[str, str]:
        return {REPLICATION_HEADER: self._key.hex(), "Content-Type": "application/octet-stream"}

    def _send_loop(self, member: _Member) -> None:
        transport = self._transport(member.url)
        while True:
            item = member.pending.get()
            if item is None:
                transport.close()
                return
            route, content, what = item
            del item  # the body (a model, for a put) is freed once sent, not when the next comes
            failing_since: float | None = None
            while True:
                body = None
                try:
                    if failing_since is not None or not isinstance(content, bytes):
                        # A cheap request first: a model's frame is a copy of it, made only
                        # for a member that answers.
                        transport.request("GET", "/v2/health/live", None, self._headers())
                    body = self._framed(content)
                    if body is None:
                        logger.info("%s not sent to %s: the model is gone", what, member.url)
                        break
                    response = transport.request("POST", route, body, self._headers())
                except OSError as exc:
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if now - failing_since > MEMBER_GIVE_UP:
                        logger.warning(
                            "cluster member %s unreachable for %.0f s (%s); dropped",
                            member.url,
                            MEMBER_GIVE_UP,
                            type(exc).__name__,
                        )
                        with self._lock:
                            self._members.pop(member.url, None)
                        transport.close()
                        return
                    body = None
                    time.sleep(0.25)
                    continue
                if response.status != 200:
                    logger.warning(
                        "cluster member %s refused the %s: %s",
                        member.url,
                        what,
                        response.body[:300].decode(errors="replace"),
                    )
                break
            put = not isinstance(content, bytes)
            del content, body
            if put:
                return_freed_memory()

    # incoming

    async def apply(self, change: Change) -> bool:
        if change.op == "put":
            changed = await self.service.apply_put(change.record, change.data, change.scheduling)
            if changed:
                self._keep(change)
            return changed
        if change.op == "rules":
            return self.service.apply_rules(change.record)
        changed = self.service.apply_delete(change.record.name, change.record.version)
        self._keep(change)
        return changed

    def _framed(self, content: bytes | Change) -> bytes | None:
        """The body to post: `content`, or a deferred put framed with its model's bytes as
        they are now (None when the model has been unloaded since: its delete follows)."""
        if isinstance(content, bytes):
            return content
        held = self._held(content.record.sha256)
        if held is None:
            return None
        try:
            with held.view() as view:
                return encode_change(content) + view
        finally:
            held.close()

    def _held(self, sha256: str) -> ModelBytes | None:
        """The model's bytes as its live session keeps them, if it does."""
        session = self.service.registry.session_for(sha256)
        return session.model_bytes() if session is not None else None

    def snapshot(self) -> Iterator[bytes]:
        """Every model this replica serves, as `u64 length || change` frames."""
        for record, scheduling in self.service.snapshot():
            frame = self._framed(Change("put", record, b"", scheduling))
            if frame is not None:  # read from the model's memfd
                yield struct.pack(">Q", len(frame)) + frame
                continue
            data = self._blobs.get(record.sha256)
            if data is None and self.service.store is not None:
                data = self.service.store.read_model(record, self.service.limits.max_model_bytes)
            if data is None:
                logger.warning("no bytes kept for model %r; not in the snapshot", record.name)
                continue
            frame = encode_change(Change("put", record, data, scheduling))
            yield struct.pack(">Q", len(frame)) + frame
        return_freed_memory()

    async def sync_from(self, peer_url: str, members: list[str]) -> int:
        """A joiner's first step: copy every model from its peer, then announce itself to
        every member so their changes reach it."""
        import asyncio

        for url in members:
            self.add_member(url)
        transport = self._transport(peer_url)
        try:
            response = await asyncio.to_thread(
                transport.request, "GET", "/v2/cluster/snapshot", None, self._headers()
            )
        finally:
            transport.close()
        if response.status != 200:
            raise JoinRefused(f"the peer refused its snapshot: {response.body[:300]!r}")
        body, offset, copied = response.body, 0, 0
        while offset < len(body):
            (length,) = struct.unpack_from(">Q", body, offset)
            change = decode_change(body[offset + 8 : offset + 8 + length])
            offset += 8 + length
            if await self.apply(change):
                copied += 1
        for url in members:
            if url != peer_url:
                await asyncio.to_thread(self._announce, url)
        self.synced.set()
        return copied

    def find_evidence(self, sha256: str) -> dict[str, Any] | None:
        """Another member's standing evidence with that hash (what its receipts name), asked
        of every member in turn; remembered, since clients ask again for each receipt."""
        with self._lock:
            known = self._evidence.get(sha256)
        if known is not None:
            return known
        # Anyone may ask, and each miss asks every member: a few lookups at a time, no more.
        if not self._lookups.acquire(blocking=False):
            raise RequestRejected(
                503,
                "this replica is already looking up other replicas' evidence; retry shortly",
                {"Retry-After": "1"},
            )
        try:
            return self._ask_members_for_evidence(sha256)
        finally:
            self._lookups.release()

    def _ask_members_for_evidence(self, sha256: str) -> dict[str, Any] | None:
        for url in self.members():
            transport = self._transport(url, EVIDENCE_TIMEOUT)
            try:
                response = transport.request(
                    "GET", f"/v2/cluster/evidence/{sha256}", None, self._headers()
                )
            except OSError:
                continue
            finally:
                transport.close()
            if response.status != 200:
                continue
            try:
                document = json.loads(response.body)
                evidence = Evidence.from_json(document)
            except (ValueError, EvidenceError):
                continue
            if hashlib.sha256(evidence.evidence).hexdigest() != sha256:
                continue
            with self._lock:
                while len(self._evidence) >= MAX_EVIDENCE_KEPT:
                    del self._evidence[next(iter(self._evidence))]
                self._evidence[sha256] = document
            return dict(document)
        return None

    def _announce(self, url: str) -> None:
        transport = self._transport(url)
        try:
            body = json.dumps({"url": self.self_url}).encode()
            transport.request("POST", "/v2/cluster/members", body, self._headers())
        except OSError as exc:
            logger.warning("cannot announce this replica to %s (%s)", url, type(exc).__name__)
        finally:
            transport.close()


# --- routes (registered by `server.app` when the server takes part in a cluster) ---


def _cluster_of(request: Request) -> tuple[JoinDesk, Replicator]:
    cluster = request.app.state.blindfold.cluster
    if cluster is None:
        raise RequestRejected(404, "this server is not a cluster replica (--cluster-policy)")
    desk, replicator = cluster
    return desk, replicator


async def challenge(request: Request) -> Response:
    desk, _ = _cluster_of(request)
    return JSONResponse({"nonce": desk.challenge().hex()})


async def join(request: Request) -> Response:
    from blindfold.server import oip
    from blindfold.server.admission import read_body

    state = request.app.state.blindfold
    desk, _ = _cluster_of(request)
    body = await read_body(request, state.body_budget, MAX_JOIN_BODY, "join request", "fixed")
    document = oip.parse_json(body, "send a join request made by `blindfold serve --join`")
    source = request.client.host if request.client else "?"
    endorsement = state.identity.endorsement
    try:
        answer = await state.pools.attestation.call(
            desk.release,
            document,
            source,
            None if endorsement is None else endorsement.to_json(),
        )
    except JoinRefused as exc:
        raise RequestRejected(403, f"join refused: {exc}") from None
    return JSONResponse(answer)


async def members(request: Request) -> Response:
    from blindfold.server import oip
    from blindfold.server.admission import read_body

    state = request.app.state.blindfold
    _, replicator = _cluster_of(request)
    replicator.authorized(request)
    body = await read_body(request, state.body_budget, 1 << 12, "request", "fixed")
    document = oip.parse_json(body, "send {'url': ...}")
    url = document.get("url") if isinstance(document, dict) else None
    if not isinstance(url, str) or not url.startswith("https://"):
        raise RequestRejected(400, "members need an https:// url")
    replicator.add_member(url)
    return JSONResponse({"members": replicator.members()})


async def apply(request: Request) -> Response:
    from blindfold.server.admission import read_body

    state = request.app.state.blindfold
    _, replicator = _cluster_of(request)
    replicator.authorized(request)
    limit = state.service.limits.max_model_bytes + (1 << 20)
    body = await read_body(request, state.body_budget, limit, "change", "--max-model-bytes")
    changed = await replicator.apply(decode_change(body))
    return JSONResponse({"changed": changed})


async def endorsement(request: Request) -> Response:
    from blindfold.attestation.deployment import Endorsement
    from blindfold.server import oip
    from blindfold.server.admission import read_body

    state = request.app.state.blindfold
    _, replicator = _cluster_of(request)
    replicator.authorized(request)
    body = await read_body(request, state.body_budget, 1 << 16, "request", "fixed")
    document = oip.parse_json(body, "send an endorsement")
    try:
        endorsed = Endorsement.from_json(document)
    except (ValueError, EvidenceError) as exc:
        raise RequestRejected(400, f"malformed endorsement: {exc}") from None
    state.identity.endorse(endorsed)  # verifies it against the shared key, as the route does
    logger.info("deployment %r endorsement copied from a peer replica", endorsed.deployment)
    return JSONResponse({"deployment": endorsed.deployment})


async def snapshot(request: Request) -> Response:
    import asyncio

    _, replicator = _cluster_of(request)
    replicator.authorized(request)
    frames = await asyncio.to_thread(lambda: b"".join(replicator.snapshot()))
    return Response(frames, media_type="application/octet-stream")


async def standing_evidence(request: Request) -> Response:
    """The standing evidence of any replica of this service, by hash: receipts name the
    evidence of the replica that signed them, and behind a balancer the client's next request
    may reach another one. Evidence is public (clients verify it against the pinned key). A
    replica asking (with the replication key) gets only the answering replica's own."""
    import asyncio

    state = request.app.state.blindfold
    _, replicator = _cluster_of(request)
    digest = str(request.path_params["sha256"])
    if not _SHA256_HEX.fullmatch(digest):
        raise RequestRejected(400, "name the evidence by its SHA-256: 64 lowercase hex digits")
    own = await asyncio.to_thread(state.identity.standing)  # may make evidence: blocking
    if hashlib.sha256(own.evidence.evidence).hexdigest() == digest:
        return JSONResponse(own.to_json())
    if REPLICATION_HEADER in request.headers:
        replicator.authorized(request)
        document = None  # a peer asks only for this replica's own: no asking around
    else:
        document = await asyncio.to_thread(replicator.find_evidence, digest)
    if document is None:
        raise RequestRejected(
            404,
            f"no replica of this service holds standing evidence {digest}: the replica that "
            "signed the receipt renewed its evidence or stopped; run the request again",
        )
    return JSONResponse(document)


ROUTES = [
    Route("/v2/cluster/challenge", challenge, methods=["POST"]),
    Route("/v2/cluster/join", join, methods=["POST"]),
    Route("/v2/cluster/members", members, methods=["POST"]),
    Route("/v2/cluster/apply", apply, methods=["POST"]),
    Route("/v2/cluster/snapshot", snapshot, methods=["GET"]),
    Route("/v2/cluster/endorsement", endorsement, methods=["POST"]),
    Route("/v2/cluster/evidence/{sha256}", standing_evidence, methods=["GET"]),
]
