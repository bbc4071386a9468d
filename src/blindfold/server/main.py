"""Starting the server: choose the TEE provider, make the attested identity, build the app,
and run uvicorn with a TLS context that holds the key in memory only."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import socket
import ssl
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from blindfold.attestation.deployment import Endorsement, load_operator_public_key, operator_key_id
from blindfold.errors import ConfigurationError
from blindfold.server import blindai_compat, cluster, logs
from blindfold.server.app import ServerState, create_app
from blindfold.server.blindai_compat import DEFAULT_PORTS as DEFAULT_BLINDAI_PORTS
from blindfold.server.connections import GuardedProtocol, GuardedServer
from blindfold.server.hpke_keys import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_ROTATION_SECONDS,
)
from blindfold.server.identity import ServerIdentity
from blindfold.server.limits import ConnectionLimits, Limits
from blindfold.server.model_record import token_hash
from blindfold.server.models import new_token
from blindfold.server.pools import Pools
from blindfold.server.runtime import InferenceRunner
from blindfold.server.service import ModelService
from blindfold.server.store import ModelStore
from blindfold.server.tee.base import TeeProvider
from blindfold.server.tee.kds import AMD_KDS_URL

logger = logging.getLogger("blindfold.server")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    hostnames: list[str] = field(default_factory=list)
    tee: str = "simulation"
    allow_simulation_fallback: bool = False
    limits: Limits = field(default_factory=Limits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    upload_key_file: Path | None = None
    open_upload: bool = False
    open_upload_if_simulation: bool = False  # else a generated upload key (bin/serve default)
    intra_op_threads: int = 0
    pccs_url: str | None = None
    encrypted_models_dir: Path | None = None
    collateral_cache: Path | None = None
    amd_kds_url: str | None = AMD_KDS_URL  # None: never fetch a VCEK
    access_log: bool = False
    store: Path | None = None  # sealed persistent model store; None: models in memory only
    simulation_evidence_lifetime: int | None = None  # None: simulation evidence never expires
    epoch_file: Path | None = None  # where the store's epoch is kept; None: inside the store
    unsafe_reset_store_epoch: bool = False  # accept the store as it is, without rollback check
    admin_key_file: Path | None = None  # operator keys that may take over refused rows
    store_journal: str = "auto"  # "wal", "delete", or "auto": delete under Gramine SGX
    deployment_id: str = ""  # simulation only: stands in for SNP host_data / TDX mr_config_id
    deployment_operator_keys: list[Path] = field(default_factory=list)  # PEM public keys
    hpke_rotation_seconds: float = DEFAULT_ROTATION_SECONDS  # a new OHTTP key this often
    hpke_grace_seconds: float = DEFAULT_GRACE_SECONDS  # the replaced key is accepted this long
    blindai_compat: bool = False  # also listen as BlindAI 0.6 did (blindai_compat.py)
    blindai_ports: tuple[int, int, int] = DEFAULT_BLINDAI_PORTS  # unattested, run, management
    unsafe_blindai_upload_without_key: bool = False  # BlindAI uploads despite an upload key
    log_format: str = "text"  # or "json": one JSON object per stderr line (logs.py)
    cluster_policy: Path | None = None  # accept joining replicas (and join) under this policy
    join: str | None = None  # an existing replica's URL: take its service identity and models
    join_or_bootstrap: bool = False  # no peer reachable at all: start a new identity instead
    bootstrap_replica: str | None = None  # the only replica name that may start one
    replica_name: str | None = None  # this replica's name; None: the host name
    join_wait: float = 300.0  # seconds a replica that may not bootstrap keeps trying to join
    advertise_url: str | None = None  # how other replicas reach this one (default host:port)
    # Simulation only, for tests: claim another measurement (as other code would have).
    unsafe_simulation_measurement: str | None = None


def make_provider(config: ServerConfig) -> TeeProvider:
    kind = config.tee
    if kind == "auto":
        from blindfold.server.tee.detect import detect_tee

        kind = detect_tee(config.allow_simulation_fallback)
    if config.simulation_evidence_lifetime is not None and kind != "simulation":
        raise ConfigurationError(
            "--simulation-evidence-lifetime applies only to --tee simulation; hardware evidence "
            "expires with its collateral or certificate"
        )
    if kind == "simulation":
        from blindfold.server.tee.simulation import SimulationProvider

        # With a store, the (insecure) simulation sealing key file lives in the store.
        return SimulationProvider(
            config.store,
            config.simulation_evidence_lifetime,
            config.deployment_id,
            config.unsafe_simulation_measurement,
        )
    if config.unsafe_simulation_measurement:
        raise ConfigurationError("--unsafe-simulation-measurement applies only to --tee simulation")
    if config.deployment_id:
        raise ConfigurationError(
            f"--deployment-id only exists for the simulation TEE; on {kind} the deployment is "
            "named at launch (SEV-SNP host_data, TDX mr_config_id) or by an operator "
            "endorsement (blindfold deployment endorse)"
        )
        return SimulationProvider(config.store, config.deployment_id)
    if config.deployment_id:
        raise ConfigurationError(
            f"--deployment-id only exists for the simulation TEE; on {kind} the deployment is "
            "named at launch (SEV-SNP host_data, TDX mr_config_id) or by an operator "
            "endorsement (blindfold deployment endorse)"
        )
    from blindfold.server.tee.detect import make_hardware_provider

    options: dict[str, Any] = {}
    if kind in ("sgx", "tdx"):  # Intel collateral comes from a PCS or a local PCCS
        if config.pccs_url:
            options["pccs_url"] = config.pccs_url
        if config.collateral_cache:
            options["cache_dir"] = config.collateral_cache
    if kind == "sev-snp" and config.amd_kds_url:  # the VCEK, when the host provides none
        from blindfold.server.tee.kds import KdsVcekFetcher

        options["kds"] = KdsVcekFetcher(config.amd_kds_url, cache_dir=config.collateral_cache)
    return make_hardware_provider(kind, **options)


# 128 bits in base64url, the densest encoding an operator is likely to paste.
MIN_UPLOAD_KEY_CHARS = 22
MAKE_A_KEY = "make one with `blindfold upload-key new`"


def new_upload_key() -> tuple[str, str]:
    """A fresh upload key (256 random bits) and its `sha256:` line for --upload-key-file."""
    key = new_token("bfu")
    return key, f"sha256:{token_hash(key)}"


def read_upload_keys(path: Path | None, what: str = "upload key file") -> frozenset[str]:
    if path is None:
        return frozenset()
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise ConfigurationError(f"{what} {path} holds no key (one per line)")
    plaintext = sum(1 for key in keys if not key.startswith("sha256:"))
    if plaintext:
        logger.warning(
            "%s %s holds %d key(s) in plaintext: whoever reads the file (the host, its "
            "backups) can use them. Store only `sha256:<hex>` lines (%s)",
            what,
            path,
            plaintext,
            MAKE_A_KEY,
        )
    return frozenset(_upload_key_hash(key, path) for key in keys)


def read_operator_keys(paths: list[Path]) -> frozenset[str]:
    """The ids of the operator keys allowed to endorse this server (PEM public key files)."""
    ids = set()
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read operator key {path}: {exc.strerror}") from None
        ids.add(operator_key_id(load_operator_public_key(data, str(path))))
    return frozenset(ids)


def _upload_key_hash(line: str, path: Path) -> str:
    """A line is a key, or `sha256:<hex>` of one: the hashed form lets the file sit on an
    untrusted host (or be measured into a TEE image) without revealing the key."""
    if not line.startswith("sha256:"):
        if len(line) < MIN_UPLOAD_KEY_CHARS:
            # Never echo the key itself, not even a prefix.
            raise ConfigurationError(
                f"upload key file {path} holds a key of {len(line)} characters; keys need at "
                f"least {MIN_UPLOAD_KEY_CHARS} (128 bits of base64url) so they cannot be "
                f"guessed: {MAKE_A_KEY}"
            )
        return token_hash(line)
    digest = line.removeprefix("sha256:").lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigurationError(f"upload key file {path}: a sha256: line is not sha256:<64 hex>")
    return digest


CHOOSE_UPLOAD = (
    "choose who may upload models: --upload-key-file FILE (one key per line) or "
    "--open-upload (anyone who attests the server may upload)"
)


@dataclass(frozen=True)
class UploadAccess:
    """Who may upload, decided once the TEE kind is known."""

    open_upload: bool
    key_hashes: frozenset[str]
    generated_key: str | None = None  # printed once at start, never stored


def decide_upload_access(config: ServerConfig, tee_kind: str) -> UploadAccess:
    """--open-upload-if-simulation (what bin/serve passes with no arguments) keeps the
    quickstart open only where nothing is protected anyway: on a hardware TEE it generates an
    upload key instead, so uploads are not open to everyone who can reach the port."""
    keys = read_upload_keys(config.upload_key_file)
    if config.open_upload or keys:
        return UploadAccess(config.open_upload, keys)
    if config.open_upload_if_simulation:
        if tee_kind == "simulation":
            return UploadAccess(True, frozenset())
        key, _ = new_upload_key()
        return UploadAccess(False, frozenset({token_hash(key)}), key)
    raise ConfigurationError(CHOOSE_UPLOAD)


class _AttestedConfig(uvicorn.Config):
    """uvicorn only loads TLS keys from files; hand it our in-memory context instead."""

    def __init__(self, app: Any, context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._context = context

    def load(self) -> None:
        super().load()
        self.ssl = self._context


def build_state(config: ServerConfig) -> tuple[ServerState, UploadAccess]:
    if not (config.open_upload or config.open_upload_if_simulation or config.upload_key_file):
        raise ConfigurationError(CHOOSE_UPLOAD)  # before probing any TEE
    check_limits(config.limits)
    if config.unsafe_blindai_upload_without_key and not config.blindai_compat:
        raise ConfigurationError("--unsafe-blindai-upload-without-key needs --blindai-compat")
    provider = make_provider(config)
    access = decide_upload_access(config, provider.kind)
    hostnames = sorted({config.host, "localhost", "127.0.0.1", *config.hostnames})
    if config.blindai_compat:
        hostnames.append(blindai_compat.CERTIFICATE_NAME)
    if config.hpke_rotation_seconds <= 0 or config.hpke_grace_seconds < 0:
        raise ConfigurationError(
            "--hpke-rotation-seconds must be positive and --hpke-grace-seconds not negative"
        )
    cluster_policy, joined = _join(config, provider)
    identity = ServerIdentity(
        provider,
        hostnames,
        read_operator_keys(config.deployment_operator_keys),
        None if joined is None else joined.identity,
        (config.hpke_rotation_seconds, config.hpke_grace_seconds),
    )
    if joined is not None and joined.endorsement is not None:
        # The operator endorsed the shared key on the peer; it holds here too.
        with contextlib.suppress(Exception):
            identity.endorse(Endorsement.from_json(joined.endorsement))
    admin_key_hashes = read_upload_keys(config.admin_key_file, "admin key file")
    store = None
    if config.store is not None:
        store = open_store(
            provider,
            config.store,
            epoch_file=config.epoch_file,
            unsafe_reset_epoch=config.unsafe_reset_store_epoch,
            journal=store_journal(config.store_journal, provider),
            # A replica seals under the service identity, not its machine: any replica of the
            # cluster (restarted, or replacing this one elsewhere) opens what it wrote, and the
            # machine key alone opens nothing.
            service_key=None if cluster_policy is None else identity.service.store_key(),
        )
    if config.limits.isolation and not hasattr(os, "memfd_create"):
        raise ConfigurationError(
            "model workers need memfd_create and descriptor passing, which this platform "
            "lacks (Gramine SGX enclaves do): start with --unsafe-no-isolation to run models "
            "inside the server process, next to its keys, knowing that an uploaded model is "
            "then confined only by the upload checks"
        )
    runner = InferenceRunner(config.limits, config.intra_op_threads)
    pools = Pools()
    service = ModelService(
        config.limits,
        runner,
        upload_key_hashes=access.key_hashes,
        admin_key_hashes=admin_key_hashes,
        open_upload=access.open_upload,
        store=store,
        loading=pools.loading,
    )
    try:
        service.restore()
        state = ServerState(identity, service, runner, config.encrypted_models_dir, pools)
        if cluster_policy is not None:
            replicator = cluster.Replicator(identity.service, service, _advertise_url(config))
            state.cluster = (
                cluster.JoinDesk(cluster_policy, identity.service, replicator),
                replicator,
            )
            if joined is not None:
                state.join_sync = (joined.peer_url, joined.members)
        return state, access
    except BaseException:
        service.close()
        runner.shutdown()
        pools.shutdown()
        raise


def _advertise_url(config: ServerConfig) -> str:
    if config.advertise_url:
        return config.advertise_url.rstrip("/")
    return f"https://{config.host}:{config.port}"


def _join(
    config: ServerConfig, provider: TeeProvider
) -> tuple[cluster.ClusterPolicy | None, cluster.Joined | None]:
    """With --join: the service identity from an attested peer (or, with
    --join-or-bootstrap, for the one replica --bootstrap-replica names and no peer reachable
    at all, none: this replica starts a new one)."""
    if config.cluster_policy is None:
        if config.join:
            raise ConfigurationError(
                "--join needs --cluster-policy: the policy the peer must pass, and this "
                "replica with it"
            )
        return None, None
    may_bootstrap = _may_bootstrap(config)
    policy = cluster.ClusterPolicy.load(config.cluster_policy)
    if not config.join:
        return policy, None
    delay, deadline = JOIN_RETRY_FIRST, time.monotonic() + config.join_wait
    while True:
        try:
            joined = cluster.join_cluster(config.join, policy, provider, _advertise_url(config))
            break
        except cluster.PeerUnreachable as exc:
            if may_bootstrap:
                logger.warning(
                    "no replica answers at %s (%s): starting a NEW service identity "
                    "(--join-or-bootstrap, this replica is --bootstrap-replica %s); clients "
                    "pinned to an older one must attest again",
                    config.join,
                    exc,
                    config.bootstrap_replica,
                )
                return policy, None
            if not config.join_or_bootstrap or time.monotonic() + delay > deadline:
                logger.error("join failed: %s", exc)
                raise
            logger.warning(
                "no replica answers at %s yet (%s); retrying in %.1f s. Only replica %r "
                "starts a new service identity, so this one (%r) waits to join",
                config.join,
                exc,
                delay,
                config.bootstrap_replica,
                _replica_name(config),
            )
            time.sleep(delay)
            delay = min(delay * 2, JOIN_RETRY_MAX)
        except cluster.JoinRefused as exc:
            logger.error("join refused: %s", exc)
            raise
    logger.info("joined the cluster through %s; members: %s", config.join, joined.members)
    return policy, joined


JOIN_RETRY_FIRST = 0.5  # seconds before the first retry of an unreachable peer; doubles
JOIN_RETRY_MAX = 10.0


def _replica_name(config: ServerConfig) -> str:
    return config.replica_name or socket.gethostname()


def _may_bootstrap(config: ServerConfig) -> bool:
    """Whether this replica may start a new service identity when no peer answers. Exactly
    one replica may (a deterministic rule): two replicas starting together would otherwise
    both find nobody and start two identities."""
    if not config.join_or_bootstrap:
        if config.bootstrap_replica:
            raise ConfigurationError("--bootstrap-replica applies only with --join-or-bootstrap")
        return False
    if not config.join:
        raise ConfigurationError("--join-or-bootstrap needs --join URL (the peers to join)")
    if not config.bootstrap_replica:
        raise ConfigurationError(
            "--join-or-bootstrap needs --bootstrap-replica NAME: the one replica that may start "
            "a new service identity when no peer answers (e.g. the StatefulSet's first pod, "
            "blindfold-0); every other replica waits to join, so replicas starting together "
            "never make two identities"
        )
    if config.join_wait <= 0:
        raise ConfigurationError("--join-wait must be a positive number of seconds")
    return _replica_name(config) == config.bootstrap_replica


def check_limits(limits: Limits) -> None:
    budget = limits.inflight_body_bytes()
    for flag, value in (
        ("--max-model-bytes", limits.max_model_bytes),
        ("--max-request-bytes", limits.max_request_bytes),
    ):
        if value > budget:
            raise ConfigurationError(
                f"--max-inflight-body-bytes {budget} is smaller than {flag} {value}: such a "
                "request could never be admitted; raise the budget or lower the limit"
            )


def _raise_open_files_limit(connections: ConnectionLimits) -> None:
    """Lets the process hold --max-connections sockets plus its own files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            logger.warning(
                "the open-files limit (%d) is below --max-connections %d plus the server's "
                "own files; connections beyond it will be refused by the kernel",
                target,
                connections.max_connections,
            )


_NO_SEALING_KEY = {
    "tdx": (
        "Intel TDX offers no sealing key: the TDX module derives no key bound to the TD's "
        "measurement, so sealed storage on TDX needs a key broker (a KMS that releases a "
        "store key only after verifying the TD's attestation)"
    ),
    "nitro": (
        "the Nitro NSM offers no sealing key: sealed storage on Nitro needs a key broker "
        "(AWS KMS with an attestation-bound key policy)"
    ),
}


CLUSTER_KEY_CHANGES = (
    "a cluster replica seals its store under the service identity's store key, and this store "
    "was written under another service identity (a cluster whose replicas all stopped, or "
    "written before this replica joined a cluster, or by a replica that started a new "
    "identity). Join a live replica of the cluster that wrote it (--join), or start with "
    "another --store directory: the models reach this replica from its peers"
)


def store_journal(choice: str, provider: TeeProvider) -> str:
    """SQLite's WAL needs a shared-memory index, which Gramine cannot map from host files:
    under SGX (always Gramine here) `auto` picks the rollback journal instead."""
    if choice != "auto":
        return choice
    return "delete" if provider.kind == "sgx" else "wal"


def open_store(
    provider: TeeProvider,
    directory: Path,
    *,
    epoch_file: Path | None = None,
    unsafe_reset_epoch: bool = False,
    journal: str = "wal",
    service_key: bytes | None = None,
) -> ModelStore:
    """The sealed store in `directory`, under the provider's measurement-bound sealing key,
    or, for a cluster replica, under `service_key` (the service identity's store key, which
    only TEEs passing the cluster policy ever hold). A deployment with a monotonic counter
    the host cannot rewind passes it here as `ModelStore(..., external_counter=...)` (see
    `blindfold.server.store.EpochCounter`)."""
    if service_key is not None:
        return ModelStore(
            directory,
            service_key,
            epoch_file=epoch_file,
            unsafe_reset_epoch=unsafe_reset_epoch,
            journal=journal,
            key_changes=CLUSTER_KEY_CHANGES,
        )
    key = provider.sealing_key()
    if key is None:
        reason = _NO_SEALING_KEY.get(
            provider.kind, f"the {provider.kind} TEE provider offers no sealing key"
        )
        raise ConfigurationError(
            f"--store {directory} is refused: {reason}. Blindfold has no key broker "
            "integration yet; run without --store (models are then kept in memory only and "
            "must be uploaded again after a restart)"
        )
    return ModelStore(
        directory,
        key,
        epoch_file=epoch_file,
        unsafe_reset_epoch=unsafe_reset_epoch,
        journal=journal,
    )


def banner(state: ServerState, config: ServerConfig, access: UploadAccess) -> str:
    kind = state.identity.provider.kind
    lines = [
        f"Blindfold serving on https://{config.host}:{config.port} (TEE: {kind})",
        f"  TLS public key SHA-256: {state.identity.spki_sha256.hex()}",
    ]
    measurement = getattr(state.identity.provider, "measurement", None)
    if measurement:
        lines.append(f"  measurement: {measurement}")
    if config.deployment_id:
        lines.append(f"  simulation deployment id: {config.deployment_id}")
    if state.identity.operator_key_ids:
        keys = ", ".join(sorted(state.identity.operator_key_ids))
        lines.append(f"  deployment endorsements accepted from: {keys}")
    if kind == "simulation":
        lines.insert(0, "!" * 78)
        lines.insert(1, "!! SIMULATION TEE: NO HARDWARE PROTECTION. The host can read every model")
        lines.insert(2, "!! and every tensor. Clients must pass allow_simulation=True to connect.")
        lines.insert(3, "!" * 78)
    if config.limits.isolation:
        lines.append(
            "  models: each in a confined worker process (memory limit "
            f"{config.limits.max_inference_memory >> 20} MiB beyond the model, timeout "
            f"{config.limits.inference_timeout:g} s)"
        )
    else:
        lines.append(
            "  models: UNSAFE --unsafe-no-isolation: models run next to every secret of this "
            "process, with no memory or time limit (for benchmarks only)"
        )
    if config.limits.ort_extensions:
        lines.append(
            "  custom operators: onnxruntime-extensions (domain ai.onnx.contrib) "
            "(--no-ort-extensions to refuse them)"
        )
    if access.open_upload:
        lines.append("  uploads: OPEN (anyone who attests this server may upload models)")
    if config.blindai_compat:
        unattested, attested, management = config.blindai_ports
        uploads = (
            "open"
            if access.open_upload
            else "UNSAFE: open despite the upload key (--unsafe-blindai-upload-without-key)"
            if config.unsafe_blindai_upload_without_key
            else "refused (this server needs an upload key)"
        )
        lines.append(
            f"  BlindAI 0.6 compatibility (no tokens, for migration): certificate on "
            f"http://{config.host}:{unattested}, /run on port {attested}, /upload and /delete "
            f"on port {management} ({uploads})"
        )
    if access.generated_key is not None:
        lines.append(
            f"  upload key (generated for this run, shown only now): {access.generated_key}\n"
            "    uploads need it as 'Authorization: Bearer <key>' (blindfold upload --token).\n"
            "    Whoever reads this console holds it: for production pass --upload-key-file\n"
            "    with sha256: lines (blindfold upload-key new)"
        )
    store = state.service.store
    if store is None:
        lines.append("  model store: none (models are kept in memory only, lost at exit)")
    else:
        ready = len(state.service.registry.entries())
        unavailable = len(state.service.registry.unavailable)
        if config.cluster_policy is not None:
            note = " under the service identity's store key"
        else:
            note = " -- INSECURE simulation sealing key file" if kind == "simulation" else ""
        lines.append(
            f"  model store: {store.directory} (sealed; epoch {store.epoch}; {ready} models "
            f"restored, {unavailable} unavailable){note}"
        )
    return "\n".join(lines)


def _keep_secrets_out_of_reach() -> None:
    """No core dumps of the front process and no ptrace or /proc/PID/mem reads of it by
    processes of the same user (such as a model worker that lost its confinement): it holds
    the TLS, receipt and sealing keys."""
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


_PR_SET_DUMPABLE = 4


def serve(config: ServerConfig) -> None:
    logs.configure(config.log_format)
    _keep_secrets_out_of_reach()
    state, access = build_state(config)
    if config.log_format == "json" and access.generated_key is not None:
        state.runner.shutdown()
        state.pools.shutdown()
        state.service.close()
        raise ConfigurationError(
            "--log-format json never writes a token, so it cannot show the upload key this "
            "start would generate: pass --upload-key-file FILE (blindfold upload-key new)"
        )
    try:
        companions = _blindai_servers(state, config, access) if config.blindai_compat else []
    except BaseException:
        state.runner.shutdown()
        state.service.close()
        raise
    if config.log_format == "json":
        logger.info("%s", banner(state, config, access))  # one record: every line stays JSON
    else:
        print(banner(state, config, access), file=sys.stderr, flush=True)
    app = create_app(state)
    connections = config.connections
    _raise_open_files_limit(connections)
    uvicorn_config = _AttestedConfig(
        app,
        state.identity.ssl_context(),
        host=config.host,
        port=config.port,
        **_uvicorn_options(config),
    )
    try:
        _ServerWithCompanions(uvicorn_config, connections.tls_handshake_timeout, companions).run()
    finally:
        state.runner.shutdown()
        state.pools.shutdown()
        state.service.close()


def _uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """What every listening port of the server shares: the guarded protocol and its limits."""
    return {
        "access_log": config.access_log,
        "log_level": "info",
        "log_config": logs.uvicorn_log_config(config.log_format),
        "http": GuardedProtocol.with_limits(config.connections),
        "loop": "uvloop",
        "timeout_keep_alive": config.connections.keep_alive_timeout,
        # uvicorn's default trusts X-Forwarded-For/-Proto from loopback peers: any local
        # process (a relay, a sidecar) could then choose the client address the logs show.
        # The address is the TCP peer's; this also drops a middleware from every request.
        "proxy_headers": False,
    }


class _LeavesSignals:
    """For a server on another port of the same process, started and stopped by the main
    one, which alone handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # the same, for uvicorn before 0.29
        pass


class _CompanionServer(_LeavesSignals, GuardedServer):
    """A TLS port beside the main one."""


class _PlainCompanionServer(_LeavesSignals, uvicorn.Server):
    """The plain HTTP port (asyncio allows no TLS handshake deadline without TLS)."""


class _ServerWithCompanions(GuardedServer):
    """The main server, running its companions in the same event loop: they stop when it
    stops, and it stops if one of them ends."""

    def __init__(
        self, config: uvicorn.Config, tls_handshake_timeout: float, companions: list[_Companion]
    ) -> None:
        super().__init__(config, tls_handshake_timeout)
        self.companions = companions
        self._tasks: list[asyncio.Task[None]] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Their sockets already listen (bound at start), so nothing that connects early is lost.
        # One at a time: GuardedServer's startup briefly patches the shared event loop.
        for companion in self.companions:
            task = asyncio.create_task(companion.server.serve(sockets=[companion.socket]))
            task.add_done_callback(self._companion_ended)
            self._tasks.append(task)
            while not (companion.server.started or task.done()):
                await asyncio.sleep(0.01)

    def _companion_ended(self, task: asyncio.Task[None]) -> None:
        if not self.should_exit:
            failure = None if task.cancelled() else task.exception()
            logger.error(
                "a BlindAI compatibility port stopped serving (%s); the server stops",
                type(failure).__name__ if failure else "it ended",
            )
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for companion in self.companions:
            companion.server.should_exit = True
        await super().shutdown(sockets)
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class _Companion:
    server: uvicorn.Server
    socket: socket.socket


def _blindai_servers(
    state: ServerState, config: ServerConfig, access: UploadAccess
) -> list[_Companion]:
    """The three BlindAI 0.6 ports, bound now so that a port in use fails the start."""
    flags = ("--blindai-unattested-port", "--blindai-attested-port", "--blindai-management-port")
    if len({config.port, *config.blindai_ports}) != 4:
        raise ConfigurationError(
            f"the BlindAI ports {list(config.blindai_ports)} and --port {config.port} must be "
            f"four different ports; choose them with {', '.join(flags)}"
        )
    management = access.open_upload or config.unsafe_blindai_upload_without_key
    apps = blindai_compat.create_apps(state, management)
    companions = []
    try:
        for app, port, flag, tls in zip(
            (apps.unattested, apps.attested, apps.management),
            config.blindai_ports,
            flags,
            (False, True, True),
            strict=True,
        ):
            options = {**_uvicorn_options(config), "server_header": False}  # the app sets it
            uvicorn_config = (
                _AttestedConfig(app, state.identity.ssl_context(), **options)
                if tls
                else uvicorn.Config(app, **options)
            )
            sock = _listening_socket(config.host, port, flag)
            server = (
                _CompanionServer(uvicorn_config, config.connections.tls_handshake_timeout)
                if tls
                else _PlainCompanionServer(uvicorn_config)
            )
            companions.append(_Companion(server, sock))
    except BaseException:
        for companion in companions:
            companion.socket.close()
        raise
    return companions


def _listening_socket(host: str, port: int, flag: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port} for BlindAI compatibility: {exc.strerror}; "
            f"choose another port with {flag}"
        ) from None
    return sock
