"""A restricted model is invisible to whoever holds no token for it: the repository index
does not list it, and its metadata, readiness and inference routes answer exactly as for a
model that does not exist (same status, same message), by name and by hash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from blindfold.client.client import Client

from conftest import ServerProcess, start_server
from helpers import connect
from onnx_models import identity_model
from transports import send

pytestmark = pytest.mark.filterwarnings("ignore:SIMULATION TEE")

UPLOAD_KEY = "visibility-upload-key-" + "v" * 24
X = np.ones((1, 3), np.float32)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("visibility")
    key_file = directory / "keys.txt"
    key_file.write_text(UPLOAD_KEY + "\n")
    process = start_server(directory, "--upload-key-file", str(key_file))
    yield process
    process.stop()


def _answer(client: Client, method: str, path: str, token: str | None) -> tuple[int, str]:
    body = b"{}" if method == "POST" else None
    response = send(client, method, path, body, token=token or client.token)
    assert response.status >= 400, (method, path, response.status)
    message: str = json.loads(response.body)["error"]
    return response.status, message


def test_restricted_model_is_indistinguishable_from_a_missing_one(
    keyed: ServerProcess, tmp_path: Path
) -> None:
    with connect(keyed, UPLOAD_KEY) as uploader:
        public = uploader.upload_model(
            identity_model(TensorProto.FLOAT, name="vis-pub"), name="vis-public", public=True
        )
        secret = uploader.upload_model(
            identity_model(TensorProto.FLOAT, name="vis-priv"), name="vis-secret", public=False
        )
        other = uploader.upload_model(
            identity_model(TensorProto.FLOAT, ["N", 5], name="vis-other"),
            name="vis-other",
            public=False,
        )
    assert secret.owner_token and other.owner_token
    with connect(keyed, secret.owner_token) as owner:
        _, run_key = owner.create_run_key("vis-secret")
    _, other_run_key = connect(keyed, other.owner_token).create_run_key("vis-other")

    outsiders = [None, "bfr_guessed-run-key", other_run_key, other.owner_token, UPLOAD_KEY]
    references = {"vis-secret": "vis-missing", f"sha256:{secret.sha256}": f"sha256:{'0' * 64}"}
    with connect(keyed) as anonymous:
        for token in outsiders:
            for hidden, missing in references.items():
                for suffix, method in (("", "GET"), ("/ready", "GET"), ("/infer", "POST")):
                    seen = _answer(anonymous, method, f"/v2/models/{hidden}{suffix}", token)
                    absent = _answer(anonymous, method, f"/v2/models/{missing}{suffix}", token)
                    assert seen[0] == absent[0] == 404, (token, hidden, suffix, seen)
                    assert seen[1].replace(hidden, "?") == absent[1].replace(missing, "?")
            with connect(keyed, token) as holder:
                names = {row["name"] for row in holder.list_models()}
            assert "vis-secret" not in names
            assert secret.sha256 not in str(names)
            assert "vis-public" in names
            assert ("vis-other" in names) == (token in (other_run_key, other.owner_token))

    # The owner and a run-key holder still see and run it.
    for token in (secret.owner_token, run_key):
        with connect(keyed, token) as holder:
            rows = {row["name"]: row for row in holder.list_models()}
            assert rows["vis-secret"]["sha256"] == secret.sha256
            assert "vis-other" not in rows
            assert holder.model_metadata("vis-secret")["sha256"] == secret.sha256
            np.testing.assert_array_equal(holder.run_model("vis-secret", X)["y"], X)
            np.testing.assert_array_equal(holder.run_model(secret.sha256, X)["y"], X)
    assert public.sha256
