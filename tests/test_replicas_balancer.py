"""Issue 11 section 4: three replicas (simulation TEE, separate processes) behind a real
HAProxy doing round-robin TCP passthrough; one client uploads through it, eight run the model
through it while one replica is killed, a fourth joins later, and other code is refused."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import blindfold

from helpers import connect
from onnx_models import matmul_model
from server_process import (
    ServerProcess,
    inferences_served,
    run_replica_expecting_failure,
    start_balancer,
    start_replica,
    write_cluster_policy,
)

CLIENTS = 8


def wait_until(check, what: str, within: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.1)


def test_three_replicas_behind_a_balancer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="blindfold.client")
    policy = write_cluster_policy(tmp_path)
    first = start_replica(tmp_path, policy)
    replicas = [first]
    balancer = None
    try:
        replicas += [start_replica(tmp_path, policy, join=first) for _ in range(2)]
        balancer = start_balancer(tmp_path, [r.port for r in replicas])
        model = matmul_model(16, seed=3)
        weights = np.frombuffer(model.graph.initializer[0].raw_data, np.float32).reshape(16, 16)

        with connect(balancer.url) as uploader:
            uploaded = uploader.upload_model(model.SerializeToString(), name="mm", public=True)
        # Acknowledged by one replica, served by every replica within a bounded time.
        direct = [connect(r.url) for r in replicas]
        for client in direct:
            wait_until(lambda c=client: _serves(c, uploaded.sha256), "every replica serves it")
        before = [inferences_served(r) for r in replicas]

        done = [0] * CLIENTS
        failures: list[BaseException] = []
        stop = threading.Event()

        def run(index: int) -> None:
            rng = np.random.default_rng(index)
            try:
                with connect(balancer.url) as client:
                    while not stop.is_set():
                        x = rng.standard_normal((2, 16)).astype(np.float32)
                        y = client.run_model(f"sha256:{uploaded.sha256}", x)["y"]
                        np.testing.assert_allclose(y, x @ weights, rtol=1e-5, atol=1e-5)
                        done[index] += 1  # acknowledged: an answer the client checked
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: sum(done) >= 80 or bool(failures), "clients running", 120)
            # Every replica served some (round-robin spreads the clients' connections).
            wait_until(
                lambda: all(
                    inferences_served(r) > b for r, b in zip(replicas, before, strict=True)
                ),
                "each replica served some requests",
                60,
            )
            killed = replicas[1]
            killed.stop(signal.SIGKILL)  # mid-run, without warning
            at_kill = sum(done)
            wait_until(lambda: sum(done) >= at_kill + 80 or bool(failures), "after the kill", 120)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        assert not failures, f"a request failed: {failures[0]!r}"
        assert all(count > 0 for count in done)
        # The kill cut live connections: the clients on it retried elsewhere.
        assert "retrying POST" in caplog.text

        # A fourth replica joining later (through the first) serves the same models.
        fourth = start_replica(tmp_path, policy, join=first)
        replicas.append(fourth)
        with connect(fourth.url) as client:
            assert _serves(client, uploaded.sha256)
            assert client.attestation.spki_sha256 == direct[0].attestation.spki_sha256

        # A replica running other code is refused at join.
        code, output = run_replica_expecting_failure(
            tmp_path, policy, first, "--unsafe-simulation-measurement", "ef" * 32
        )
        assert code != 0 and "join refused" in output
        for client in direct:
            client.close()
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()


def _serves(client: blindfold.Client, sha256: str) -> bool:
    try:
        client.run_model(f"sha256:{sha256}", np.zeros((1, 16), np.float32))
        return True
    except blindfold.BlindfoldError:
        return False


def test_receipts_through_the_balancer_verify_whichever_replica_signed(tmp_path: Path) -> None:
    """Every replica signs receipts with the shared key but keeps its own chain and standing
    evidence: one client whose connections the balancer spreads over the replicas verifies
    every receipt, and each saved receipt verifies offline as for a single server."""
    from blindfold.attestation.verdict import Evidence
    from blindfold.receipts import SavedReceipt

    policy = write_cluster_policy(tmp_path)
    first = start_replica(tmp_path, policy)
    replicas = [first]
    balancer = None
    try:
        replicas.append(start_replica(tmp_path, policy, join=first))
        balancer = start_balancer(tmp_path, [r.port for r in replicas])
        model = matmul_model(16, seed=5)
        with connect(balancer.url) as client:
            uploaded = client.upload_model(model.SerializeToString(), name="mm", public=True)
            for replica in replicas:
                with connect(replica.url) as direct:
                    wait_until(lambda c=direct: _serves(c, uploaded.sha256), "replicated")

            saved: list[SavedReceipt] = []
            for index in range(12):
                x = np.full((1, 16), float(index), np.float32)
                outputs = client.run_model(f"sha256:{uploaded.sha256}", x, receipt=True)
                saved.append(outputs.receipt)  # verified on arrival, or run_model raised
                # The next request opens a new connection, which the round-robin balancer
                # sends to the other replica: one client, receipts of two chains interleaved.
                client._transport.close()
        signers = {s.receipt.evidence_sha256 for s in saved}
        assert len(signers) == len(replicas), "both replicas should have signed some"
        # Any replica finds the standing evidence another replica's receipts name (where a
        # client's next connection lands is the balancer's choice).
        for replica in replicas:
            for digest in signers:
                document = _get_json(replica, f"/v2/cluster/evidence/{digest}")
                evidence = Evidence.from_json(document)
                assert hashlib.sha256(evidence.evidence).hexdigest() == digest
        assert _get_status(first, "/v2/cluster/evidence/" + "ab" * 32) == 404
        # Offline, as an auditor would: one receipt of each replica through the CLI.
        for number, digest in enumerate(sorted(signers)):
            path = tmp_path / f"receipt-{number}.json"
            next(s for s in saved if s.receipt.evidence_sha256 == digest).save(path)
            command = [sys.executable, "-m", "blindfold", "receipt", "verify", str(path)]
            result = subprocess.run(
                [*command, "--allow-simulation"], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stderr
            assert '"verified": true' in result.stdout
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()


def _get_status(server: ServerProcess, path: str) -> int:
    try:
        _get_json(server, path)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def _get_json(server: ServerProcess, path: str) -> dict[str, object]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(server.url + path, context=context, timeout=30) as answer:  # noqa: S310 (https)
        document = json.loads(answer.read())
    assert isinstance(document, dict)
    return document
