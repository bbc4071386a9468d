"""Signed inference receipts and encrypted model files, end to end against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from onnx import TensorProto

import blindfold
from blindfold.errors import ReceiptError
from blindfold.receipts import Receipt, ReceiptChainVerifier, SavedReceipt
from blindfold.sealing import ModelKey

from onnx_models import add_mul_model, identity_model
from transports import send


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindfold", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def add_mul(client: blindfold.Client) -> str:
    name = f"receipt-add-mul-{uuid.uuid4().hex[:8]}"
    client.upload_model(add_mul_model(), name=name)
    return name


def test_receipt_verifies_online_and_offline(
    client: blindfold.Client, add_mul: str, tmp_path: Path
) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    outputs = client.run_model(add_mul, {"a": a, "b": b}, receipt=True)
    saved = outputs.receipt
    assert isinstance(saved, SavedReceipt)
    assert saved.receipt.model_sha256 == client.model_metadata(add_mul)["sha256"]
    path = tmp_path / "receipt.json"
    saved.save(path)
    np.savez(tmp_path / "in.npz", a=a, b=b)
    # numpy's stub checks **kwds against allow_pickle: bool; these are arrays by name.
    np.savez(tmp_path / "out.npz", **outputs)  # type: ignore[arg-type]
    ok = _cli(
        "receipt",
        "verify",
        str(path),
        "--inputs",
        str(tmp_path / "in.npz"),
        "--outputs",
        str(tmp_path / "out.npz"),
        "--allow-simulation",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verified"] is True

    # One tensor byte altered: the recomputed digest no longer matches.
    np.savez(tmp_path / "bad.npz", a=a + 1, b=b)
    bad = _cli(
        "receipt", "verify", str(path), "--inputs", str(tmp_path / "bad.npz"), "--allow-simulation"
    )
    assert bad.returncode == 1 and "inputs_sha256" in bad.stderr

    # Any field altered: the signature fails.
    document = json.loads(path.read_text())
    document["receipt"]["model_sha256"] = "0" * 64
    path.write_text(json.dumps(document))
    forged = _cli("receipt", "verify", str(path), "--allow-simulation")
    assert forged.returncode == 1 and "signature" in forged.stderr.lower()

    # Simulation evidence needs the opt-in offline too.
    saved.save(path)
    refused = _cli("receipt", "verify", str(path))
    assert refused.returncode == 1 and "simulation" in refused.stderr.lower()


def test_receipts_form_a_chain(client: blindfold.Client, add_mul: str) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    first = client.run_model(add_mul, [x, x], receipt=True).receipt.receipt
    second = client.run_model(add_mul, [x, x], receipt=True).receipt.receipt
    assert second.sequence > first.sequence
    if second.sequence == first.sequence + 1:
        assert second.previous_sha256 == first.digest()
    # A chain verifier that saw both refuses the first again (a replay).
    from cryptography import x509

    key = x509.load_pem_x509_certificate(client.attestation.certificate_pem.encode()).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    chain = ReceiptChainVerifier()
    chain.verify(first, key)
    chain.verify(second, key)
    with pytest.raises(ReceiptError):
        chain.verify(first, key)
    assert isinstance(Receipt.from_json(first.to_json()), Receipt)


def test_receipts_from_threads_sharing_one_client(client: blindfold.Client, add_mul: str) -> None:
    """Threads sharing a Client get their receipts back in whatever order the server
    answers; every one verifies, and none is taken for a replay."""
    x = np.ones((1, 4), dtype=np.float32)

    def run(_: int) -> int:
        result = client.run_model(add_mul, [x, x], receipt=True).receipt
        assert result is not None
        sequence: int = result.receipt.sequence
        return sequence

    with ThreadPoolExecutor(max_workers=8) as pool:
        sequences = list(pool.map(run, range(160)))
    assert len(set(sequences)) == len(sequences)


def test_bytes_tensors_in_receipts(client: blindfold.Client) -> None:
    name = f"receipt-strings-{uuid.uuid4().hex[:8]}"
    client.upload_model(identity_model(TensorProto.STRING), name=name)
    x = np.array([["a", "bé", ""]], dtype=object)
    outputs = client.run_model(name, x, receipt=True)
    assert outputs["y"].tolist() == [[b"a", "bé".encode(), b""]]


def test_encrypted_model_round_trip(client: blindfold.Client, tmp_path: Path) -> None:
    model_path = tmp_path / "model.onnx"
    onnx.save(add_mul_model(), model_path)
    result = _cli("encrypt-model", str(model_path), "--out", str(tmp_path / "model.enc"))
    assert result.returncode == 0, result.stderr
    key_path = tmp_path / "model.enc.key.json"
    assert model_path.read_bytes() not in (tmp_path / "model.enc").read_bytes()
    loaded = client.load_encrypted_model("encrypted", str(tmp_path / "model.enc"), key_path)
    assert loaded.sha256 == ModelKey.load(key_path).sha256
    x = np.ones((1, 4), dtype=np.float32)
    np.testing.assert_array_equal(client.run_model("encrypted", [x, x])["sum"], x + x)

    wrong = ModelKey(key=bytes(32), sha256=loaded.sha256)
    with pytest.raises(blindfold.ServerError) as error:
        client.load_encrypted_model("encrypted-2", str(tmp_path / "model.enc"), wrong)
    assert error.value.status == 400 and "decrypt" in error.value.message
    with pytest.raises(blindfold.NotFoundError):
        client.load_encrypted_model("encrypted-3", str(tmp_path / "missing.enc"), key_path)
    # Only the operator's folder is readable: no path escapes it.
    for outside in ("/etc/passwd", str(tmp_path / ".." / ".." / ".." / "etc" / "passwd")):
        with pytest.raises(blindfold.AuthenticationError) as escaped:
            client.load_encrypted_model("encrypted-4", outside, key_path)
        assert escaped.value.status == 403 and "outside" in escaped.value.message


def test_server_keeps_serving_after_receipt_errors(client: blindfold.Client) -> None:
    model = client.upload_model(add_mul_model(), name=f"receipt-errors-{uuid.uuid4().hex[:8]}")
    body = json.dumps({"inputs": [], "parameters": {"receipt": True, "receipt_nonce": 5}}).encode()
    path = f"/v2/models/{model.name}/infer"
    response = send(client, "POST", path, body, token=model.owner_token)
    assert response.status == 400
    x = np.ones((1, 4), dtype=np.float32)
    assert client.run_model(model.name, [x, x])["product"].shape == (1, 4)


UPLOAD_KEY = "upload-key-1-of-at-least-22-chars"


def test_encrypted_load_needs_upload_rights_before_touching_disk(tmp_path: Path) -> None:
    from conftest import start_server

    keys = tmp_path / "keys.txt"
    keys.write_text(f"{UPLOAD_KEY}\n")
    server = start_server(tmp_path, "--upload-key-file", str(keys))
    try:
        with pytest.warns(blindfold.SimulationWarning):
            client = blindfold.connect(server.url, allow_simulation=True)
        with client:
            key = ModelKey(key=bytes(32), sha256="0" * 64)
            for path in ("/etc/passwd", str(tmp_path / "missing.enc")):
                with pytest.raises(blindfold.AuthenticationError) as error:
                    client.load_encrypted_model("probe", path, key)
                assert error.value.status == 401
            # With the upload key, this server (no --encrypted-models-dir) still refuses.
            with pytest.raises(blindfold.AuthenticationError) as disabled:
                client.load_encrypted_model("probe", "/etc/passwd", key, token=UPLOAD_KEY)
            assert disabled.value.status == 403
            assert "--encrypted-models-dir" in disabled.value.message
    finally:
        server.stop()
