"""Stock `tritonclient.http` against a real Blindfold server, trusting only the certificate
that `blindfold export-cert` wrote after verifying the server's attestation."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

import blindfold

from conftest import ServerProcess, start_server
from helpers import write_self_signed
from onnx_models import add_mul_model, identity_model
from transports import send

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.http import InferenceServerClient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

UPLOAD_KEYS = ("upload-key-triton-one-long", "upload-key-triton-two-long")


def server_policy(server: ServerProcess) -> blindfold.Policy:
    """Pins the measurement the server printed at start (the tree may change during tests)."""
    found = re.search(r"measurement: ([0-9a-f]{64})", server.log())
    assert found, server.log()
    return blindfold.Policy.simulation(found.group(1))


def export_cert(server: ServerProcess, out: Path) -> Path:
    policy = out.with_suffix(".policy.toml")
    policy.write_text(server_policy(server).to_toml())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blindfold",
            "export-cert",
            server.url,
            "--out",
            str(out),
            "--allow-simulation",
            "--policy",
            str(policy),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text().startswith("-----BEGIN CERTIFICATE-----")
    return out


def triton(server: ServerProcess, ca_file: Path, host: str = "127.0.0.1") -> InferenceServerClient:
    return InferenceServerClient(
        f"{host}:{server.port}",
        ssl=True,
        ssl_options={"ca_certs": str(ca_file)},
        connection_timeout=10.0,
        network_timeout=30.0,
    )


def sdk(server: ServerProcess, token: str | None = None) -> blindfold.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blindfold.connect(
            server.url, policy=server_policy(server), allow_simulation=True, token=token
        )


def model_bytes(model: object) -> bytes:
    return model.SerializeToString()  # type: ignore[attr-defined, no-any-return]


def config_for(name: str) -> str:
    return json.dumps({"name": name, "backend": "onnxruntime"})


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server where uploads need a key, so load/unload must carry Authorization headers."""
    directory = tmp_path_factory.mktemp("triton-keyed")
    key_file = directory / "upload-keys.txt"
    key_file.write_text("\n".join(UPLOAD_KEYS) + "\n")
    process = start_server(directory, "--upload-key-file", str(key_file))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def open_cert(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_cert(server, tmp_path_factory.mktemp("cert-open") / "cert.pem")


@pytest.fixture(scope="module")
def keyed_cert(keyed_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_cert(keyed_server, tmp_path_factory.mktemp("cert-keyed") / "cert.pem")


def test_exported_cert_is_the_attested_one(server: ServerProcess, open_cert: Path) -> None:
    with sdk(server) as client:
        assert open_cert.read_text().strip() == client.attestation.certificate_pem.strip()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_health_and_server_metadata(server: ServerProcess, open_cert: Path, host: str) -> None:
    with triton(server, open_cert, host) as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        metadata = client.get_server_metadata()
        assert metadata["name"] == "blindfold"
        assert "model_repository" in metadata["extensions"]
        assert "binary_tensor_data" in metadata["extensions"]


def test_load_infer_index_open_upload(server: ServerProcess, open_cert: Path) -> None:
    """load_model(files=...) as Triton users write it, then JSON and binary inference."""
    cases: list[tuple[str, int, str, np.ndarray]] = [
        ("triton-fp32", TensorProto.FLOAT, "FP32", np.arange(6, dtype=np.float32).reshape(2, 3)),
        ("triton-int64", TensorProto.INT64, "INT64", np.array([[1, -2, 3]], dtype=np.int64)),
        (
            "triton-bytes",
            TensorProto.STRING,
            "BYTES",
            np.array([[b"alpha", b"", "\u00e9t\u00e9".encode()]], dtype=object),
        ),
    ]
    with triton(server, open_cert) as client:
        for name, elem_type, datatype, data in cases:
            onnx_bytes = model_bytes(identity_model(elem_type, name=name))
            client.load_model(
                name,
                config=config_for(name),
                files={"file:1/model.onnx": onnx_bytes},
                query_params={"public": "true"},  # new models are restricted by default
            )
            assert client.is_model_ready(name)
            metadata = client.get_model_metadata(name)
            assert metadata["name"] == name
            assert metadata["inputs"][0]["name"] == "x"
            assert metadata["inputs"][0]["datatype"] == datatype
            assert metadata["outputs"][0]["datatype"] == datatype
            for binary in (False, True):
                tensor = tritonclient_http.InferInput("x", list(data.shape), datatype)
                tensor.set_data_from_numpy(data, binary_data=binary)
                requested = tritonclient_http.InferRequestedOutput("y", binary_data=binary)
                result = client.infer(name, [tensor], outputs=[requested])
                out = result.as_numpy("y")
                assert out is not None
                assert out.shape == data.shape
                if datatype == "BYTES":
                    found = [v.encode() if isinstance(v, str) else bytes(v) for v in out.flat]
                    assert found == list(data.flat)
                else:
                    assert out.dtype == data.dtype
                    np.testing.assert_array_equal(out, data)
        index = {entry["name"]: entry for entry in client.get_model_repository_index()}
        for name, *_ in cases:
            assert index[name]["state"] == "READY"
            assert len(index[name]["sha256"]) == 64


def test_load_with_dynamic_batching(server: ServerProcess, open_cert: Path) -> None:
    """Scheduling options travel as load query parameters; concurrent Triton requests of
    1 and 3 rows (4 = max_batch_size) run as one batch and each gets its own rows."""
    from concurrent.futures import ThreadPoolExecutor

    name = "triton-batched-identity"
    with triton(server, open_cert) as client:
        client.load_model(
            name,
            config=config_for(name),
            files={"file:1/model.onnx": model_bytes(identity_model(TensorProto.INT32, ["N", 2]))},
            query_params={"public": "true", "max_batch_size": "4", "max_queue_delay_us": "8000000"},
        )
        assert client.get_model_metadata(name)["scheduling"]["max_batch_size"] == 4

    def infer(data: np.ndarray) -> np.ndarray:
        with triton(server, open_cert) as own:
            tensor = tritonclient_http.InferInput("x", list(data.shape), "INT32")
            tensor.set_data_from_numpy(data, binary_data=True)
            out: np.ndarray | None = own.infer(name, [tensor]).as_numpy("y")
            assert out is not None
            return out

    requests = [np.array([[1, 2]], np.int32), np.arange(6, dtype=np.int32).reshape(3, 2)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(infer, requests))
    for data, out in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(out, data)


def test_multiple_inputs_and_outputs(server: ServerProcess, open_cert: Path) -> None:
    with triton(server, open_cert) as client:
        client.load_model(
            "triton-add-mul",
            config=config_for("triton-add-mul"),
            files={"file:1/model.onnx": model_bytes(add_mul_model())},
            query_params={"public": "true"},
        )
        a = np.arange(8, dtype=np.float32).reshape(2, 4)
        b = np.full((2, 4), 2.0, dtype=np.float32)
        inputs = []
        for name, array in (("a", a), ("b", b)):
            tensor = tritonclient_http.InferInput(name, [2, 4], "FP32")
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        result = client.infer(
            "triton-add-mul",
            inputs,
            outputs=[
                tritonclient_http.InferRequestedOutput("sum", binary_data=False),
                tritonclient_http.InferRequestedOutput("product", binary_data=True),
            ],
        )
        np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
        np.testing.assert_array_equal(result.as_numpy("product"), a * b)


def test_keyed_load_and_owner_unload(keyed_server: ServerProcess, keyed_cert: Path) -> None:
    """With --upload-key-file: tritonclient loads with the upload key in a header; the owner
    token (which tritonclient cannot see, it is in the load answer's body) comes from the SDK
    and tritonclient unloads with it."""
    onnx_bytes = model_bytes(identity_model(TensorProto.FLOAT, name="keyed"))
    with triton(keyed_server, keyed_cert) as client:
        with pytest.raises(InferenceServerException) as missing:
            client.load_model(
                "keyed-triton", config=config_for("x"), files={"file:1/model.onnx": onnx_bytes}
            )
        assert "401" in str(missing.value.status()) or "upload key" in str(missing.value)
        client.load_model(
            "keyed-triton",
            config=config_for("keyed-triton"),
            files={"file:1/model.onnx": onnx_bytes},
            headers={"Authorization": f"Bearer {UPLOAD_KEYS[0]}"},
            query_params={"public": "true"},
        )
        assert client.is_model_ready("keyed-triton")

        with sdk(keyed_server, token=UPLOAD_KEYS[1]) as owner_client:
            uploaded = owner_client.upload_model(onnx_bytes, name="keyed-sdk", public=True)
        assert uploaded.owner_token
        names = {entry["name"] for entry in client.get_model_repository_index()}
        assert {"keyed-triton", "keyed-sdk"} <= names

        # No token, an upload key, the other model's... none of them is the owner token.
        for headers in (None, {"Authorization": f"Bearer {UPLOAD_KEYS[1]}"}):
            with pytest.raises(InferenceServerException):
                client.unload_model("keyed-sdk", headers=headers)
        assert client.is_model_ready("keyed-sdk")

        client.unload_model(
            "keyed-sdk", headers={"Authorization": f"Bearer {uploaded.owner_token}"}
        )
        names = {entry["name"] for entry in client.get_model_repository_index()}
        assert "keyed-sdk" not in names and "keyed-triton" in names
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("keyed-sdk")
        assert not client.is_model_ready("keyed-sdk")


def test_other_ca_file_cannot_connect(server: ServerProcess, tmp_path: Path) -> None:
    with (
        triton(server, write_self_signed(tmp_path, "someone-else")[0]) as client,
        pytest.raises(ssl.SSLError) as failure,
    ):
        client.is_server_live()
    assert (
        "CERTIFICATE_VERIFY_FAILED" in str(failure.value)
        or "certificate" in str(failure.value).lower()
    )


def test_cert_of_a_previous_server_cannot_connect(tmp_path: Path) -> None:
    """The exported certificate pins one server start: a restarted server has a new key."""
    first = start_server(tmp_path, "--open-upload")
    try:
        cert = export_cert(first, tmp_path / "first.pem")
    finally:
        first.stop()
    second = start_server(tmp_path, "--open-upload", port=first.port)
    try:
        with triton(second, cert) as client, pytest.raises(ssl.SSLError):
            client.is_server_live()
    finally:
        second.stop()


def test_ca_environment_does_not_make_tritonclient_trust_a_proxy(
    server: ServerProcess, open_cert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the exported certificate as its only CA, tritonclient refuses a TLS-terminating
    proxy even when the CA environment variables name the proxy's certificate."""
    from test_attacks import AttackProxy

    proxy = AttackProxy(tmp_path, server.port)
    try:
        for variable in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            monkeypatch.setenv(variable, str(proxy.cert_path))
        client = InferenceServerClient(
            f"127.0.0.1:{proxy.port}",
            ssl=True,
            ssl_options={"ca_certs": str(open_cert)},
            connection_timeout=10.0,
            network_timeout=10.0,
        )
        with client, pytest.raises(ssl.SSLError):
            client.is_server_live()
        assert proxy.seen() == []
    finally:
        proxy.close()


# --- tritonclient users choose their owner token (load_model discards the answer's body) ---


def owner_secret() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def load_with(client: InferenceServerClient, name: str, headers: dict[str, str]) -> None:
    client.load_model(
        name,
        config=config_for(name),
        files={"file:1/model.onnx": model_bytes(identity_model(TensorProto.FLOAT, name=name))},
        headers=headers,
    )


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def infer_ones(
    client: InferenceServerClient, name: str, headers: dict[str, str] | None
) -> np.ndarray:
    tensor = tritonclient_http.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32), binary_data=True)
    result = client.infer(name, [tensor], headers=headers)
    out: np.ndarray | None = result.as_numpy("y")
    assert out is not None
    return out


def test_open_upload_owner_secret_in_bearer(server: ServerProcess, open_cert: Path) -> None:
    """Where uploads are open, the Bearer token of a load becomes the owner token: the
    tritonclient user unloads its own model, and nobody else can unload or replace it."""
    mine, theirs = owner_secret(), owner_secret()
    with triton(server, open_cert) as client:
        load_with(client, "owned-by-secret", bearer(mine))
        np.testing.assert_array_equal(infer_ones(client, "owned-by-secret", bearer(mine)), 1)
        # Restricted by default: invisible without the secret.
        with pytest.raises(InferenceServerException):
            infer_ones(client, "owned-by-secret", None)
        # Another user (with their own secret, or none) can neither unload nor replace it.
        errors = []
        for headers in (None, bearer(theirs), {"X-Blindfold-Owner-Token": theirs}):
            with pytest.raises(InferenceServerException) as refused:
                client.unload_model("owned-by-secret", headers=headers)
            errors.append(str(refused.value))
            with pytest.raises(InferenceServerException) as refused:
                load_with(client, "owned-by-secret", headers or {})
            errors.append(str(refused.value))
        assert any("403" in e or "owner token" in e for e in errors), errors
        assert client.is_model_ready("owned-by-secret", headers=bearer(mine))
        # The owner replaces and unloads it with the secret it chose.
        load_with(client, "owned-by-secret", bearer(mine))
        client.unload_model("owned-by-secret", headers=bearer(mine))
        assert not client.is_model_ready("owned-by-secret", headers=bearer(mine))
    assert not any(mine in e or theirs in e for e in errors)
    assert mine not in server.log() and theirs not in server.log()
    metrics = send(sdk(server), "GET", "/metrics").body.decode()
    assert mine not in metrics and theirs not in metrics


def test_keyed_owner_secret_in_second_header(keyed_server: ServerProcess, keyed_cert: Path) -> None:
    """With an upload key the Bearer header is the key, so the chosen owner token travels in
    X-Blindfold-Owner-Token; the upload key (anyone's) then cannot unload the model."""
    mine = owner_secret()
    with triton(keyed_server, keyed_cert) as client:
        load_with(
            client,
            "keyed-owned",
            {**bearer(UPLOAD_KEYS[0]), "X-Blindfold-Owner-Token": mine},
        )
        np.testing.assert_array_equal(infer_ones(client, "keyed-owned", bearer(mine)), 1)
        for key in UPLOAD_KEYS:
            with pytest.raises(InferenceServerException):
                client.unload_model("keyed-owned", headers=bearer(key))
            # Another uploader, with its own chosen secret, cannot take the name over.
            with pytest.raises(InferenceServerException):
                load_with(
                    client,
                    "keyed-owned",
                    {**bearer(key), "X-Blindfold-Owner-Token": owner_secret()},
                )
        # The owner replaces it with the upload key and the secret in the second header, or
        # with the secret alone.
        load_with(
            client, "keyed-owned", {**bearer(UPLOAD_KEYS[1]), "X-Blindfold-Owner-Token": mine}
        )
        load_with(client, "keyed-owned", bearer(mine))
        client.unload_model("keyed-owned", headers=bearer(mine))
        assert not client.is_model_ready("keyed-owned", headers=bearer(mine))
        # Without an upload key a chosen secret alone does not open uploads.
        with pytest.raises(InferenceServerException) as refused:
            load_with(client, "keyed-no-key", {"X-Blindfold-Owner-Token": owner_secret()})
        assert "upload key" in str(refused.value)
    assert mine not in keyed_server.log()


@pytest.mark.parametrize(
    "weak",
    ["short-secret", "0123456789abcdef0123456789abcd", "a" * 64, "abababababababababababababab"],
)
def test_weak_owner_secret_refused(
    server: ServerProcess, keyed_server: ServerProcess, open_cert: Path, keyed_cert: Path, weak: str
) -> None:
    """Fewer than 128 bits (by length and alphabet) or fewer than 8 distinct characters: a
    clear 400 that does not quote the secret, and no model is loaded."""
    cases = [
        (server, open_cert, bearer(weak)),
        (keyed_server, keyed_cert, {**bearer(UPLOAD_KEYS[0]), "X-Blindfold-Owner-Token": weak}),
    ]
    for process, cert, headers in cases:
        with triton(process, cert) as client:
            with pytest.raises(InferenceServerException) as refused:
                load_with(client, "weak-secret", headers)
            message = str(refused.value)
            assert "too weak" in message and "128 random bits" in message, message
            assert weak not in message
            assert not client.is_model_ready("weak-secret", headers=bearer(weak))
        assert weak not in process.log()
