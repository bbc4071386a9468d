"""Replicas sharing one attested service identity (README "Scaling out"): real server
processes on loopback, joining each other under a cluster policy."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

import blindfold
from blindfold.errors import BlindfoldError, ConfigurationError
from blindfold.server.cluster import ClusterPolicy

from helpers import connect
from onnx_models import add_mul_model, matmul_model, weights_model
from server_process import (
    ServerProcess,
    model_memfds,
    proc_field,
    run_replica_expecting_failure,
    start_replica,
    unverified_context,
    write_cluster_policy,
)

A = np.ones((1, 4), np.float32)
B = np.full((1, 4), 2.0, np.float32)


def eventually(check: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Polls `check` until it holds: replication is asynchronous, but bounded."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.1)


def operator_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def serves(client: blindfold.Client, model: str, token: str | None = None) -> bool:
    try:
        outputs = client.run_model(model, {"a": A, "b": B}, token=token)
    except BlindfoldError:
        return False
    return bool(np.allclose(outputs["sum"], A + B))


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cluster_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, policy: Path) -> Iterator[ServerProcess]:
    replica = start_replica(tmp_path_factory.mktemp("first"), policy)
    yield replica
    replica.stop()


def test_a_joiner_presents_the_same_identity_and_serves_every_change(
    tmp_path: Path, policy: Path, first: ServerProcess
) -> None:
    with connect(first) as on_first:
        early = on_first.upload_model(add_mul_model().SerializeToString(), name="early")
        second = start_replica(tmp_path, policy, join=first)
        try:
            with connect(second) as on_second:
                # One identity: the same pinned key, each replica with its own evidence.
                assert on_second.attestation.spki_sha256 == on_first.attestation.spki_sha256
                assert on_second.attestation.evidence != on_first.attestation.evidence
                # A replica that joins later gets the existing models, rules included:
                # restricted, so only the owner token runs it there too.
                assert serves(on_second, "early", token=early.owner_token)
                assert not serves(on_second, "early", token="bfo_not-the-owner")
                # Changes made on one replica reach the other, both ways.
                late = on_second.upload_model(add_mul_model().SerializeToString(), name="late")
                eventually(lambda: serves(on_first, "late", late.owner_token), "upload copied")
                on_first.set_public("early", True, token=early.owner_token)
                eventually(lambda: serves(on_second, "early"), "access rule copied")
                key_id, run_key = on_first.create_run_key("late", token=late.owner_token)
                eventually(lambda: serves(on_second, "late", run_key), "run key copied")
                on_second.revoke_run_key("late", key_id, token=late.owner_token)
                eventually(lambda: not serves(on_first, "late", run_key), "revocation copied")
                # A replaced model is replaced everywhere (the higher version wins).
                replaced = matmul_model(4).SerializeToString()
                on_first.upload_model(replaced, name="late", token=late.owner_token)
                digest = hashlib.sha256(replaced).hexdigest()

                def replaced_there() -> bool:
                    rows = on_second.list_models(token=late.owner_token)
                    return any(r["name"] == "late" and r["sha256"] == digest for r in rows)

                eventually(replaced_there, "replacement copied")
                # An operator endorsement posted to one replica holds on every replica.
                operator = operator_key()
                on_second.endorse_deployment(operator, "prod-eu")
                eventually(lambda: "endorsement copied" in first.log(), "endorsement copied")
                with connect(first) as fresh:
                    assert fresh.attestation.endorsement is not None
                    assert fresh.attestation.endorsement.deployment == "prod-eu"
                # A delete is honoured everywhere.
                on_second.delete_model("early", token=early.owner_token)
                eventually(lambda: not serves(on_first, "early"), "delete copied")
        finally:
            second.stop()
    assert "released the service identity to a replica" in first.log()


def test_replicas_keep_no_second_copy_of_a_model(
    tmp_path: Path, policy: Path, first: ServerProcess
) -> None:
    """A model's bytes live once per replica, in its worker's sealed memfd: neither the
    replica it was uploaded to nor the one it was copied to (by a change, or by a joiner's
    snapshot) keeps another copy in its front process to send on later."""
    size = 64
    second = start_replica(tmp_path, policy, join=first)
    try:
        before = {p.process.pid: front_rss(p) for p in (first, second)}
        with connect(first) as on_first, connect(second) as on_second:
            model = weights_model(size, seed=7).SerializeToString()
            big = on_first.upload_model(model, name="replicated-big")
            x = np.ones((1, 1024), np.float32)
            expected = on_first.run_model("replicated-big", x)["y"]

            def copied() -> bool:
                try:
                    got = on_second.run_model("replicated-big", x, token=big.owner_token)["y"]
                except BlindfoldError:
                    return False
                return bool(np.array_equal(got, expected))

            eventually(copied, "the big model copied", within=60)
            third = start_replica(tmp_path, policy, join=first)  # snapshot
            try:
                with connect(third) as on_third:
                    got = on_third.run_model("replicated-big", x, token=big.owner_token)["y"]
                    np.testing.assert_array_equal(got, expected)
            finally:
                third.stop()
        for replica in (first, second):
            grown = front_rss(replica) - before[replica.process.pid]
            assert grown < size * MIB // 2, (
                f"replica {replica.url} front grew by {grown >> 20} MiB for a {size} MiB model"
            )
        with connect(first) as on_first:
            on_first.delete_model("replicated-big", token=big.owner_token)
    finally:
        second.stop()


def front_rss(replica: ServerProcess) -> int:
    return proc_field(replica.process.pid, "status", "VmRSS")


MIB = 1 << 20


def test_a_replica_running_other_code_is_refused_and_gets_nothing(
    tmp_path: Path, policy: Path, first: ServerProcess
) -> None:
    code, output = run_replica_expecting_failure(
        tmp_path, policy, first, "--unsafe-simulation-measurement", "ab" * 32
    )
    assert code != 0
    assert "join refused" in output and "measurement" in output
    assert "Blindfold serving on" not in output  # it never served with the identity
    eventually(lambda: "refused a replica joining" in first.log(), "refusal logged by the peer")
    refusal = [line for line in first.log().splitlines() if "refused a replica joining" in line]
    assert "ab" * 32 in refusal[-1]  # the reason names the measurement it claimed


def test_a_replica_of_another_deployment_is_refused(tmp_path: Path) -> None:
    policy = write_cluster_policy(tmp_path, '\n[deployment]\nsimulation_deployment_id = ["prod"]\n')
    prod = start_replica(tmp_path, policy, "--deployment-id", "prod")
    try:
        code, output = run_replica_expecting_failure(
            tmp_path, policy, prod, "--deployment-id", "staging"
        )
        assert code != 0 and "join refused" in output and "staging" in output
        eventually(lambda: "refused a replica joining" in prod.log(), "refusal logged")
        # The same deployment is accepted.
        second = start_replica(tmp_path, policy, "--deployment-id", "prod", join=prod)
        second.stop()
    finally:
        prod.stop()


def test_a_joiner_refuses_a_peer_that_fails_its_policy(tmp_path: Path, policy: Path) -> None:
    """The other direction: the joiner attests the peer first and refuses other code."""
    other = start_replica(tmp_path, policy, "--unsafe-simulation-measurement", "cd" * 32)
    try:
        code, output = run_replica_expecting_failure(tmp_path, policy, other)
        assert code != 0
        assert "fails the cluster policy" in output and "cd" * 32 in output
        assert "released the service identity" not in other.log()
    finally:
        other.stop()


def test_the_cluster_policy_must_allow_simulation_by_name(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[simulation]\nmeasurement = ["' + "00" * 32 + '"]\n')
    with pytest.raises(ConfigurationError, match="unsafe_allow_simulation"):
        ClusterPolicy.load(path)
    path.write_text(
        '[simulation]\nmeasurement = ["' + "00" * 32 + '"]\n'
        '[deployment]\noperator_keys = ["sha256:' + "11" * 32 + '"]\n'
        "[cluster]\nunsafe_allow_simulation = true\n"
    )
    with pytest.raises(ConfigurationError, match="no endorsement yet"):
        ClusterPolicy.load(path)


# --- attacks on the cluster routes, as someone without the service identity would try ---


def _post(
    server: ServerProcess, path: str, body: bytes | None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    import http.client

    context = unverified_context()
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
    try:
        connection.request("POST" if body is not None else "GET", path, body, headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_replication_routes_refuse_anyone_without_the_replication_key(
    first: ServerProcess,
) -> None:
    from blindfold.server.cluster import encode_change
    from blindfold.server.model_record import ModelRecord
    from blindfold.server.service import Change

    data = add_mul_model().SerializeToString()
    record = ModelRecord("planted", 99, hashlib.sha256(data).hexdigest(), len(data), "", True)
    planted = encode_change(Change("put", record, data))
    for key in (None, "00" * 32):
        headers = {} if key is None else {"blindfold-replication": key}
        # Planting a model, registering oneself as a member (to be sent every model), and
        # reading every model's bytes are all refused.
        assert _post(first, "/v2/cluster/apply", planted, headers)[0] == 401
        assert _post(first, "/v2/cluster/members", b'{"url": "https://evil:1"}', headers)[0] == 401
        assert _post(first, "/v2/cluster/snapshot", None, headers)[0] == 401
    with connect(first) as client:
        assert not serves(client, "planted")


def test_join_evidence_must_bind_the_key_and_a_fresh_nonce(first: ServerProcess) -> None:
    """An attacker relaying a genuine joiner's evidence with its own key, or replaying a
    nonce, gets nothing (the simulation signer stands in for the joiner's TEE)."""
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    from blindfold.attestation.simulation import SimulationSigner
    from blindfold.attestation.verdict import Evidence
    from blindfold.server.service_identity import join_key_binding

    def raw(key: x25519.X25519PrivateKey) -> str:
        return (
            key.public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )

    status, body = _post(first, "/v2/cluster/challenge", b"{}")
    nonce = bytes.fromhex(json.loads(body)["nonce"])
    genuine, attacker = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    evidence = Evidence(
        "simulation",
        SimulationSigner().evidence(join_key_binding(genuine.public_key()) + nonce),
    )
    request = {"evidence": evidence.to_json(), "nonce": nonce.hex(), "advertise_url": ""}
    status, body = _post(
        first, "/v2/cluster/join", json.dumps({**request, "join_key": raw(attacker)}).encode()
    )
    assert status == 403 and b"does not bind the join key" in body
    assert b"identity" not in body
    # The nonce was used up by that attempt: replaying it, even with the right key, fails.
    status, body = _post(
        first, "/v2/cluster/join", json.dumps({**request, "join_key": raw(genuine)}).encode()
    )
    assert status == 403 and b"nonce" in body


def test_the_sealed_identity_opens_only_with_the_join_key_and_its_context() -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    from blindfold.errors import EvidenceError
    from blindfold.server.service_identity import ServiceIdentity, open_sealed

    identity = ServiceIdentity.create(["127.0.0.1"])
    joiner, other = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    sealed = identity.seal_for(joiner.public_key(), b"report data")
    opened = open_sealed(sealed, joiner, b"report data")
    assert opened.to_bytes() == identity.to_bytes()
    assert opened.replication_key() == identity.replication_key() != identity.store_key()
    with pytest.raises(EvidenceError, match="does not decrypt"):
        open_sealed(sealed, other, b"report data")  # someone else's key
    with pytest.raises(EvidenceError, match="does not decrypt"):
        open_sealed(sealed, joiner, b"other report data")  # released for another request


def test_a_flood_of_join_challenges_is_bounded_and_evicts_no_honest_nonce(
    tmp_path: Path, policy: Path
) -> None:
    """Anyone may ask for a join nonce: a flood must neither grow the replica's memory nor
    push out the nonce an honest joiner is about to answer. When the desk is full it answers
    429 with Retry-After; issued nonces stay valid until they expire or are used."""
    import http.client
    import json
    import ssl

    from blindfold.attestation.simulation import SimulationSigner
    from blindfold.attestation.verdict import Evidence
    from blindfold.server.cluster import MAX_CHALLENGES

    replica = start_replica(tmp_path, policy)  # its own: the flood fills its join desk
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", replica.port, context=context)

    def ask() -> tuple[int, bytes, str | None]:
        connection.request("POST", "/v2/cluster/challenge", b"{}")
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Retry-After")

    try:
        status, body, _ = ask()
        assert status == 200
        honest = json.loads(body)["nonce"]
        statuses = [ask()[0] for _ in range(MAX_CHALLENGES + 20)]
        assert statuses.count(200) <= MAX_CHALLENGES - 1  # the honest one holds a slot
        status, body, retry_after = ask()
        assert status == 429 and retry_after is not None
        assert b"join nonces" in body and b"retry" in body.lower()
        # The honest joiner's nonce was not evicted by the flood: answering it reaches the
        # evidence check (not "unknown or expired join nonce").
        evidence = Evidence("simulation", SimulationSigner().evidence(bytes(64)))
        request = {
            "evidence": evidence.to_json(),
            "nonce": honest,
            "join_key": "11" * 32,
            "advertise_url": "",
        }
        status, body = _post(replica, "/v2/cluster/join", json.dumps(request).encode())
        assert status == 403 and b"unknown or expired" not in body
        assert b"does not bind the join key" in body
    finally:
        connection.close()
        replica.stop()


def test_a_replica_store_is_sealed_under_the_service_key(
    tmp_path: Path, policy: Path, first: ServerProcess
) -> None:
    """Issue 11: a shared sealed store is sealed under the service identity's store key. A
    replica restarted (or replacing another, elsewhere) that joins again opens the store its
    cluster wrote; the host, holding only the machine's key, opens nothing."""
    import subprocess
    import sys

    from blindfold.server.store import ModelStore, StoreError
    from blindfold.server.tee.simulation import SimulationProvider

    store = tmp_path / "store"
    second = start_replica(tmp_path, policy, "--store", str(store), join=first)
    try:
        with connect(first) as on_first, connect(second) as on_second:
            model = on_first.upload_model(add_mul_model().SerializeToString(), name="kept")
            eventually(lambda: serves(on_second, "kept", model.owner_token), "copied")
    finally:
        second.stop()
    assert not (store / "INSECURE-simulation-sealing.key").exists()
    # The host's attack: the machine's own sealing key (for the simulation TEE, the key file
    # it would make next to the store) does not open it.
    machine_key = SimulationProvider(tmp_path / "machine").sealing_key()
    assert machine_key is not None
    with pytest.raises(StoreError, match="different sealing key"):
        ModelStore(store, machine_key)
    # A replacement replica joining the same cluster opens it: the model is restored from the
    # store itself (before any copy from the peer).
    third = start_replica(tmp_path, policy, "--store", str(store), join=first)
    try:
        restored = re.search(r"(\d+) models restored, 0 unavailable", third.log())
        assert restored is not None and int(restored.group(1)) >= 1
        with connect(third) as on_third:
            assert serves(on_third, "kept", model.owner_token)
        assert "model 'kept' version 1 replicated from a peer" not in third.log()
    finally:
        third.stop()
    # A replica that starts a new service identity cannot open it, and says why.
    command = [sys.executable, "-m", "blindfold", "serve", "--port", "0", "--open-upload"]
    result = subprocess.run(
        [*command, "--cluster-policy", str(policy), "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "another service identity" in result.stderr and "--join" in result.stderr


def test_scheduling_options_reach_every_replica(
    tmp_path: Path, policy: Path, first: ServerProcess
) -> None:
    """An owner's batching, concurrency and warm-up options travel with the model: to a
    replica that joins later (the snapshot) and to one that is already a member (the push),
    which warms it on the configured shapes before serving it."""
    options: dict[str, Any] = {
        "max_batch_size": 4,
        "max_queue_delay_us": 1500,
        "preferred_batch_sizes": [2, 4],
        "max_concurrency": 2,
        "warmup_shapes": {"x": [3, 4]},
    }
    x = np.ones((1, 4), np.float32)
    with connect(first) as on_first:
        early = on_first.upload_model(
            matmul_model(4).SerializeToString(), name="sched-early", **options
        )
        second = start_replica(tmp_path, policy, join=first)
        try:
            late = on_first.upload_model(
                matmul_model(4, seed=1).SerializeToString(), name="sched-late", **options
            )
            with connect(second) as on_second:
                for model in (early, late):

                    def copied(
                        name: str = model.name, token: str | None = model.owner_token
                    ) -> bool:
                        try:
                            on_second.run_model(name, x, token=token)
                        except BlindfoldError:
                            return False
                        return True

                    eventually(copied, f"{model.name} copied")
                    metadata = on_second.model_metadata(model.name, token=model.owner_token)
                    assert metadata.get("scheduling") == options, model.name
                    assert (
                        f"model {model.name!r} (sha256:{model.sha256}) warmed up on its "
                        "configured warmup_shapes 3x4 before ready" in second.log()
                    )
        finally:
            second.stop()


def test_replicas_starting_together_make_one_identity(tmp_path: Path, policy: Path) -> None:
    """Two replicas started together, each told to join the other with --join-or-bootstrap,
    both find nobody. Only the one --bootstrap-replica names starts an identity; the other
    keeps trying (and says so) until it can join it: one identity, not two."""
    import subprocess
    import sys

    from server_process import free_port, start_server

    first_port, second_port = free_port(), free_port()

    def args(name: str, peer_port: int) -> list[str]:
        return [
            *("--open-upload", "--cluster-policy", str(policy)),
            *("--join", f"https://127.0.0.1:{peer_port}", "--join-or-bootstrap"),
            *("--bootstrap-replica", "replica-0", "--replica-name", name),
        ]

    log_path = tmp_path / "waiting.log"
    with log_path.open("wb") as handle:
        command = [sys.executable, "-m", "blindfold", "serve", "--port", str(second_port)]
        process = subprocess.Popen(
            [*command, *args("replica-1", first_port)], stdout=handle, stderr=subprocess.STDOUT
        )
    waiting = ServerProcess(second_port, process, log_path)
    bootstrapped = None
    try:
        # It finds nobody, and is not the one that may bootstrap: it waits.
        eventually(lambda: "waits to join" in waiting.log(), "the other waits", 60)
        bootstrapped = start_server(tmp_path, *args("replica-0", second_port), port=first_port)
        assert "starting a NEW service identity" in bootstrapped.log()
        eventually(lambda: "joined the cluster" in waiting.log(), "the other joins", 90)
        assert "NEW service identity" not in waiting.log()
        eventually(lambda: _live(waiting), "the joiner serves", 60)
        with connect(bootstrapped) as a, connect(waiting) as b:
            assert a.attestation.spki_sha256 == b.attestation.spki_sha256
    finally:
        waiting.stop()
        if bootstrapped is not None:
            bootstrapped.stop()


def test_join_or_bootstrap_needs_the_one_replica_that_may_bootstrap(policy: Path) -> None:
    from blindfold.server.main import ServerConfig, _join
    from blindfold.server.tee.simulation import SimulationProvider

    config = ServerConfig(cluster_policy=policy, join="https://127.0.0.1:1", join_or_bootstrap=True)
    with pytest.raises(ConfigurationError, match="--bootstrap-replica NAME"):
        _join(config, SimulationProvider())


def _live(server: ServerProcess) -> bool:
    import ssl
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"{server.url}/v2/health/live", context=context) as answer:  # noqa: S310 (https to a replica it started)
            return bool(answer.status == 200)
    except OSError:
        return False


def test_a_replica_with_a_store_sends_models_from_its_sealed_blobs(
    tmp_path: Path, policy: Path
) -> None:
    """A replica with --store keeps no memfd of a stored model (its session reopens the
    model from the sealed blob when needed): a joiner still receives the model, read from
    that blob, and serves it."""
    origin = start_replica(tmp_path, policy, "--store", str(tmp_path / "origin-store"))
    try:
        with connect(origin) as on_origin:
            model = on_origin.upload_model(add_mul_model().SerializeToString(), name="from-blob")
        assert model_memfds(origin.process.pid) == []
        joiner = start_replica(tmp_path, policy, join=origin)
        try:
            with connect(joiner) as on_joiner:
                eventually(lambda: serves(on_joiner, "from-blob", model.owner_token), "received")
        finally:
            joiner.stop()
    finally:
        origin.stop()
