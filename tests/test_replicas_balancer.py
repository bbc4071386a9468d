"""Issue 11 section 4: three replicas (simulation TEE, separate processes) behind a real
HAProxy doing round-robin TCP passthrough; one client uploads through it, eight run the model
through it while one replica is killed, a fourth joins later, and other code is refused."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import blindfold

from helpers import connect
from onnx_models import matmul_model
from server_process import (
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
