"""What operators expect, against real server processes: Prometheus metrics (parsed with
prometheus-client's own parser), request ids, and JSON log lines that never hold payloads,
tokens or tensor values."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto
from prometheus_client.parser import text_string_to_metric_families

import blindfold

from conftest import ServerProcess, start_server
from helpers import connect
from onnx_models import identity_model
from transports import send

FLOAT_SENTINEL = 8765.4321  # a recognisable tensor value: it must never reach logs or metrics
BYTES_SENTINEL = "TENSOR-SENTINEL-qz7"


def scrape(
    client: blindfold.Client,
) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The raw text and every sample by (name, sorted labels)."""
    response = send(client, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.body.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("metrics"), "--open-upload")
    yield process
    process.stop()


def test_metrics_count_real_requests(metrics_server: ServerProcess) -> None:
    owner = secrets.token_urlsafe(32)
    restricted_name = f"secret-project-{secrets.token_hex(4)}"
    with connect(metrics_server, token=owner) as client:
        _, before = scrape(client)
        connect(metrics_server).close()  # one more attestation, with a fresh nonce
        model = identity_model(TensorProto.FLOAT, name="m")
        client.upload_model(model, name="public-identity", public=True)
        client.upload_model(identity_model(TensorProto.FLOAT, name="r"), name=restricted_name)
        x = np.full((2, 3), FLOAT_SENTINEL, np.float32)
        for _ in range(3):
            client.run_model("public-identity", x)
        client.run_model(restricted_name, x)
        # A wrong datatype (sent raw: the SDK would refuse it itself) is a rejected inference.
        wrong = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]}
        refused = send(
            client, "POST", "/v2/models/public-identity/infer", json.dumps(wrong).encode()
        )
        assert refused.status == 400
        text, after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("blindfold_inferences_total", model="public-identity", outcome="ok") == 3
    assert grew("blindfold_inferences_total", model="public-identity", outcome="rejected") == 1
    assert grew("blindfold_inferences_total", model="(restricted)", outcome="ok") == 1
    assert grew("blindfold_inference_duration_seconds_count", model="public-identity") == 3
    assert grew("blindfold_inference_queue_seconds_count", model="(restricted)") == 1
    infer_route = "/v2/models/{name}/infer"
    assert grew("blindfold_requests_total", route=infer_route, method="POST", code="200") == 4
    assert grew("blindfold_request_duration_seconds_count", route=infer_route) >= 5
    assert grew("blindfold_request_body_bytes_total", route=infer_route) >= 4 * x.nbytes
    assert grew("blindfold_response_body_bytes_total", route=infer_route) >= 4 * x.nbytes
    assert grew("blindfold_attestation_requests_total", evidence="fresh", outcome="ok") >= 1
    assert value(after, "blindfold_models") == value(before, "blindfold_models") + 2
    assert value(after, "blindfold_model_memory_bytes", model="public-identity") > 0
    assert value(after, "blindfold_model_memory_bytes", model="(restricted)") > 0
    assert value(after, "blindfold_tee_info", kind="simulation") == 1
    assert value(after, "blindfold_evidence_age_seconds") >= 0
    # Whoever scrapes learns neither the restricted model's name nor any tensor value, and
    # sees no token.
    assert restricted_name not in text
    assert owner not in text
    # (As a number of its own: counters and timestamps may hold the digits 8765 by chance.)
    assert not re.search(r"(?<![\d.])8765\.43", text)


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("json-logs")
    key = f"upload-key-{secrets.token_urlsafe(24)}"
    (directory / "keys.txt").write_text(key + "\n")
    process = start_server(
        directory,
        "--upload-key-file",
        str(directory / "keys.txt"),
        "--log-format",
        "json",
        "--access-log",
    )
    yield process
    process.stop()


def test_json_logs_request_ids_and_no_secrets(json_server: ServerProcess) -> None:
    key = (json_server.log_path.parent / "keys.txt").read_text().strip()
    owner = secrets.token_urlsafe(32)
    wrong = f"wrong-token-{secrets.token_urlsafe(16)}"
    with connect(json_server, token=key) as client:

        def post(path: str, token: str, headers: dict[str, str] | None = None) -> int:
            return send(client, "POST", path, b"{}", headers, token=token).status

        # A sane incoming id is echoed and logged; an insane one is replaced.
        echoed = send(client, "GET", "/v2/health/live", headers={"X-Request-Id": "trace-42"})
        assert echoed.headers["x-request-id"] == "trace-42"
        replaced = send(
            client, "GET", "/v2/health/live", headers={"X-Request-Id": "bad id\twith spaces"}
        )
        assert len(replaced.headers["x-request-id"]) == 32
        assert replaced.headers["x-request-id"] != "bad id\twith spaces"
        model = identity_model(TensorProto.STRING, name="s")
        uploaded = client.upload_model(model, name="json-logged", token=key)
        client.run_model(
            "json-logged",
            np.array([[BYTES_SENTINEL, "b", "c"]], dtype=object),
            token=uploaded.owner_token,
        )
        floats = identity_model(TensorProto.FLOAT, name="f")
        client.upload_model(floats, name="json-floats", public=True)
        client.run_model("json-floats", np.full((1, 3), FLOAT_SENTINEL, np.float32))
        # Bad tokens: a wrong owner token to unload, a wrong upload key, a weak chosen secret.
        assert post("/v2/repository/models/json-logged/unload", wrong) == 403
        assert post("/v2/repository/models/new-name/load", wrong) == 403
        # No model in the body (400), after the chosen secret was accepted.
        with_owner = {"X-Blindfold-Owner-Token": owner}
        assert post("/v2/repository/models/with-owner/load", key, with_owner) == 400
        client.delete_model("json-logged", token=uploaded.owner_token)
        assert uploaded.owner_token
    records = []
    for line in json_server.log().splitlines():
        record = json.loads(line)  # every line, the banner included
        assert {"timestamp", "level", "logger", "message"} <= set(record), record
        records.append(record)
    assert any(r.get("request_id") == "trace-42" for r in records), records
    loaded = [r for r in records if "loaded" in r["message"] and r.get("model") == "json-logged"]
    assert loaded and len(loaded[0]["model_sha256"]) == 64 and loaded[0].get("request_id")
    text = json_server.log()
    for secret in (key, owner, wrong, uploaded.owner_token, BYTES_SENTINEL, "8765.43"):
        assert secret not in text


def test_sdk_token_becomes_the_owner_token_on_open_uploads(
    metrics_server: ServerProcess,
) -> None:
    """On an open server a Client's token owns what it uploads: the server says so without
    echoing it, the SDK reports it as the owner token, and another client cannot delete it."""
    mine = secrets.token_urlsafe(32)
    with connect(metrics_server, token=mine) as client:
        uploaded = client.upload_model(identity_model(TensorProto.FLOAT, name="o"), "sdk-owned")
        assert uploaded.owner_token == mine
        with (
            connect(metrics_server, token=secrets.token_urlsafe(32)) as other,
            pytest.raises(blindfold.BlindfoldError),
        ):
            other.delete_model("sdk-owned")
        client.delete_model("sdk-owned")


def test_an_upload_key_never_becomes_an_owner_token(tmp_path: Path) -> None:
    """Open uploads beside upload keys: a load carrying a (team-shared) upload key gets an
    owner token of its own, so other holders of the key cannot unload the model."""
    key = f"team-upload-key-{secrets.token_urlsafe(24)}"
    (tmp_path / "keys.txt").write_text(key + "\n")
    process = start_server(
        tmp_path, "--open-upload", "--upload-key-file", str(tmp_path / "keys.txt")
    )
    try:
        with connect(process, token=key) as alice, connect(process, token=key) as bob:
            uploaded = alice.upload_model(identity_model(TensorProto.FLOAT, name="t"), "team")
            assert uploaded.owner_token and uploaded.owner_token != key
            with pytest.raises(blindfold.BlindfoldError):
                bob.delete_model("team")
            alice.delete_model("team")
    finally:
        process.stop()
