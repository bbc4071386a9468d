"""The `blindfold` command line, run as real subprocesses against a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

import blindfold
from blindfold.attestation.simulation import WARNING as SIMULATION_WARNING
from blindfold.attestation.simulation import measure_package

from conftest import ServerProcess
from helpers import connect
from onnx_models import add_mul_model, identity_model
from server_process import unverified_context

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def cli(*args: Any, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "blindfold", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if expect is not None:
        assert result.returncode == expect, (
            f"blindfold {' '.join(map(str, args))} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def sdk_delete(url: str, name: str, token: str) -> None:
    """Cleans up through the SDK (faster than another subprocess)."""
    with connect(url) as connection:
        connection.delete_model(name, token=token)


def json_out(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def url(server: ServerProcess) -> str:
    return server.url


# --- measurement and attestation ---


def test_measure_prints_the_package_measurement() -> None:
    printed = cli("measure").stdout.strip()
    assert HEX64.match(printed), printed
    assert printed == measure_package()


def test_policy_init_then_attest(url: str, tmp_path: Path) -> None:
    measurement = cli("measure").stdout.strip()
    policy = tmp_path / "p.toml"
    written = cli("policy", "init", "--measurement", measurement, "--out", policy)
    assert str(policy) in written.stdout
    text = policy.read_text()
    assert "[simulation]" in text and measurement in text
    assert blindfold.Policy.load(policy) is not None

    result = cli("attest", url, "--policy", policy, "--allow-simulation")
    verdict = json_out(result)
    assert verdict["verified"] is True
    assert verdict["kind"] == "simulation"
    assert verdict["measurements"]["measurement"] == measurement
    assert HEX64.match(verdict["public_key_sha256"])
    assert len(verdict["nonce"]) == 64  # a fresh nonce was bound into the evidence
    assert "SIMULATION" in result.stderr  # the loud warning


def test_simulation_warning_is_one_clean_line(url: str) -> None:
    """The CLI prints the SDK's simulation warning as one line, not as a Python warning
    with its category, file and source line."""
    result = cli("attest", url, "--allow-simulation")
    lines = result.stderr.splitlines()
    assert lines == [f"WARNING: {SIMULATION_WARNING}"], result.stderr


def test_library_users_can_filter_the_simulation_warning(url: str) -> None:
    with pytest.warns(blindfold.SimulationWarning, match="SIMULATION TEE"):
        blindfold.connect(url, allow_simulation=True).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=blindfold.SimulationWarning)
        blindfold.connect(url, allow_simulation=True).close()


def test_attest_refuses_simulation_without_opt_in(url: str, tmp_path: Path) -> None:
    result = cli("attest", url, expect=1)
    assert "simulation" in result.stderr.lower()
    assert "--allow-simulation" in result.stderr
    assert result.stdout == ""
    policy = tmp_path / "p.toml"
    cli("policy", "init", "--measurement", measure_package(), "--out", policy)
    result = cli("attest", url, "--policy", policy, expect=1)
    assert "simulation" in result.stderr.lower()


def test_attest_with_wrong_measurement_names_expected_and_found(url: str, tmp_path: Path) -> None:
    wrong = "ab" * 32
    policy = tmp_path / "wrong.toml"
    cli("policy", "init", "--measurement", wrong, "--out", policy)
    result = cli("attest", url, "--policy", policy, "--allow-simulation", expect=1)
    assert f"expected {wrong}" in result.stderr
    assert f"found {measure_package()}" in result.stderr
    assert result.stdout == ""


def test_measurement_changes_when_one_line_of_server_code_changes(tmp_path: Path) -> None:
    original = Path(blindfold.__file__).parent
    copy = tmp_path / "blindfold"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert measure_package(copy) == measure_package(original)  # reproducible, location-free

    app = copy / "server" / "app.py"
    lines = app.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.startswith("JSON_SLACK"))
    lines[index] = lines[index].replace("1 << 20", "1 << 21")
    app.write_text("".join(lines))
    changed = measure_package(copy)
    assert HEX64.match(changed)
    assert changed != measure_package(original)

    # Files that are not code (caches, notes) do not change it.
    app.write_text(app.read_text())
    (copy / "server" / "__pycache__").mkdir(exist_ok=True)
    (copy / "server" / "__pycache__" / "app.cpython-312.pyc").write_bytes(b"junk")
    (copy / "NOTES.txt").write_text("not code")
    assert measure_package(copy) == changed


def test_export_cert_writes_the_attested_certificate(
    url: str, tmp_path: Path, client: blindfold.Client
) -> None:
    out = tmp_path / "cert.pem"
    result = cli("export-cert", url, "--allow-simulation", "--out", out)
    assert str(out) in result.stdout
    assert out.read_text() == client.attestation.certificate_pem
    assert client.attestation.spki_sha256.hex() in result.stdout


# --- models and inference ---


@pytest.fixture(scope="module")
def uploaded(url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("cli-models")
    path = folder / "addmul.onnx"
    path.write_bytes(add_mul_model().SerializeToString())
    result = json_out(
        cli("upload", url, path, "--name", "cli-add-mul", "--public", "--allow-simulation")
    )
    yield result
    sdk_delete(url, "cli-add-mul", result["owner_token"])


def test_upload_prints_identity(uploaded: dict[str, Any]) -> None:
    import hashlib

    assert uploaded["name"] == "cli-add-mul"
    assert uploaded["sha256"] == hashlib.sha256(add_mul_model().SerializeToString()).hexdigest()
    assert uploaded["version"] == "1"
    assert uploaded["owner_token"].startswith("bfo_")
    assert uploaded["public"] is True


def test_models_lists_the_upload(url: str, uploaded: dict[str, Any]) -> None:
    listed = json_out(cli("models", url, "--allow-simulation"))
    entry = next(m for m in listed if m["name"] == "cli-add-mul")
    assert entry["sha256"] == uploaded["sha256"]
    assert entry["version"] == "1"


def _ab() -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 0.5, dtype=np.float32)
    return a, b


def test_run_npz_to_npz(url: str, uploaded: dict[str, Any], tmp_path: Path) -> None:
    a, b = _ab()
    inputs = tmp_path / "in.npz"
    np.savez(inputs, a=a, b=b)
    out = tmp_path / "out.npz"
    result = cli("run", url, "cli-add-mul", inputs, "--out", out, "--allow-simulation")
    assert str(out) in result.stdout
    with np.load(out) as outputs:
        assert list(outputs.files) == ["sum", "product"]
        np.testing.assert_array_equal(outputs["sum"], a + b)
        np.testing.assert_array_equal(outputs["product"], a * b)


def test_run_out_is_readable_by_its_owner_only(
    url: str, uploaded: dict[str, Any], tmp_path: Path
) -> None:
    """Outputs may be patient data: even with a permissive umask, and over an existing
    world-readable file, `--out` leaves a file only its owner can read."""
    a, b = _ab()
    inputs = tmp_path / "in.npz"
    np.savez(inputs, a=a, b=b)
    fresh, existing = tmp_path / "fresh.npz", tmp_path / "existing.npz"
    existing.write_bytes(b"old")
    existing.chmod(0o644)
    previous = os.umask(0o022)
    try:
        for out in (fresh, existing, tmp_path / "suffixless"):
            cli("run", url, "cli-add-mul", inputs, "--out", out, "--allow-simulation")
    finally:
        os.umask(previous)
    for path in (fresh, existing, tmp_path / "suffixless.npz"):
        assert path.stat().st_mode & 0o777 == 0o600, path
        with np.load(path) as outputs:
            np.testing.assert_array_equal(outputs["sum"], a + b)


def test_run_npz_printed_and_by_hash(url: str, uploaded: dict[str, Any], tmp_path: Path) -> None:
    a, b = _ab()
    inputs = tmp_path / "in.npz"
    np.savez(inputs, a=a, b=b)
    for model in ("cli-add-mul", f"sha256:{uploaded['sha256']}", uploaded["sha256"]):
        printed = json_out(cli("run", url, model, inputs, "--allow-simulation"))
        assert list(printed) == ["sum", "product"]
        assert printed["sum"]["dtype"] == "float32"
        assert printed["sum"]["shape"] == [2, 4]
        assert printed["sum"]["data"] == (a + b).tolist()
        assert printed["product"]["data"] == (a * b).tolist()


@pytest.fixture(scope="module")
def identity_uploaded(url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("cli-identity") / "identity.onnx"
    path.write_bytes(identity_model(TensorProto.INT64, name="cli-id").SerializeToString())
    result = json_out(
        cli("upload", url, path, "--name", "cli-identity", "--public", "--allow-simulation")
    )
    yield "cli-identity"
    sdk_delete(url, "cli-identity", result["owner_token"])


def test_run_npy(url: str, identity_uploaded: str, tmp_path: Path) -> None:
    x = np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64)
    inputs = tmp_path / "x.npy"
    np.save(inputs, x)
    printed = json_out(cli("run", url, identity_uploaded, inputs, "--allow-simulation"))
    assert printed["y"] == {"dtype": "int64", "shape": [1, 3], "data": x.tolist()}
    out = tmp_path / "y.npz"
    cli("run", url, identity_uploaded, inputs, "--out", out, "--allow-simulation")
    with np.load(out) as outputs:
        assert outputs["y"].dtype == np.int64
        np.testing.assert_array_equal(outputs["y"], x)


def test_run_json(
    url: str, uploaded: dict[str, Any], identity_uploaded: str, tmp_path: Path
) -> None:
    a, b = _ab()
    by_name = tmp_path / "in.json"
    by_name.write_text(json.dumps({"a": a.tolist(), "b": b.tolist()}))
    printed = json_out(cli("run", url, "cli-add-mul", by_name, "--allow-simulation"))
    assert printed["sum"]["data"] == (a + b).tolist()
    # A bare nested list for a single-input model, with an explicit dtype.
    bare = tmp_path / "x.json"
    bare.write_text(json.dumps([[1, 2, 3], [4, 5, 6]]))
    out = tmp_path / "y.npz"
    cli("run", url, identity_uploaded, bare, "--dtype", "int64", "--out", out, "--allow-simulation")
    with np.load(out) as outputs:
        np.testing.assert_array_equal(outputs["y"], [[1, 2, 3], [4, 5, 6]])


def test_run_errors_exit_1(url: str, uploaded: dict[str, Any], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.zeros((1, 4), np.float64), b=np.zeros((1, 4), np.float32))
    result = cli("run", url, "cli-add-mul", wrong, "--allow-simulation", expect=1)
    assert "float64" in result.stderr and "FP32" in result.stderr
    missing = tmp_path / "x.npy"
    np.save(missing, np.zeros((1, 3), np.float32))
    result = cli("run", url, "cli-no-such-model", missing, "--allow-simulation", expect=1)
    assert "404" in result.stderr and "cli-no-such-model" in result.stderr
    text = tmp_path / "x.txt"
    text.write_text("1 2 3")
    result = cli("run", url, "cli-add-mul", text, "--allow-simulation", expect=1)
    assert ".npz, .npy or .json" in result.stderr


def test_encrypt_then_load_encrypted_with_options(url: str, tmp_path: Path) -> None:
    """encrypt-model, then load-encrypted with an upload's per-model options: the answer
    reports the options the server applies and the configured warm-up's outcome."""
    path = tmp_path / "enc.onnx"
    path.write_bytes(identity_model(TensorProto.FLOAT).SerializeToString())
    cli("encrypt-model", path, "--out", tmp_path / "enc.onnx.enc")
    loaded = json_out(
        cli(
            "load-encrypted",
            url,
            "cli-encrypted",
            tmp_path / "enc.onnx.enc",
            tmp_path / "enc.onnx.enc.key.json",
            "--max-batch-size",
            "4",
            "--warmup-shapes",
            "x:2x3",
            "--allow-simulation",
        )
    )
    assert loaded["scheduling"]["max_batch_size"] == 4
    assert loaded["scheduling"]["warmup_shapes"] == {"x": [2, 3]}
    assert loaded["warmup"] == "ok"
    sdk_delete(url, "cli-encrypted", loaded["owner_token"])


def test_delete_with_owner_token(url: str, tmp_path: Path) -> None:
    path = tmp_path / "del.onnx"
    path.write_bytes(identity_model(TensorProto.FLOAT, name="cli-del").SerializeToString())
    uploaded = json_out(cli("upload", url, path, "--name", "cli-delete", "--allow-simulation"))
    result = cli("delete", url, "cli-delete", "--allow-simulation", expect=1)
    assert "401" in result.stderr
    result = cli(
        "delete", url, "cli-delete", "--token", "bfo_wrong", "--allow-simulation", expect=1
    )
    assert "403" in result.stderr
    token = uploaded["owner_token"]
    result = cli("delete", url, "cli-delete", "--token", token, "--allow-simulation")
    assert "deleted cli-delete" in result.stdout
    listed = json_out(cli("models", url, "--allow-simulation"))
    assert "cli-delete" not in [m["name"] for m in listed]
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3), np.float32))
    result = cli("run", url, "cli-delete", x, "--allow-simulation", expect=1)
    assert "404" in result.stderr


def test_run_keys_and_access(url: str, tmp_path: Path) -> None:
    path = tmp_path / "restricted.onnx"
    path.write_bytes(identity_model(TensorProto.FLOAT, name="cli-restricted").SerializeToString())
    uploaded = json_out(cli("upload", url, path, "--name", "cli-private", "--allow-simulation"))
    owner = uploaded["owner_token"]
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    inputs = tmp_path / "x.npy"
    np.save(inputs, x)
    sim = "--allow-simulation"

    # Only the owner may restrict it.
    assert "401" in cli("access", url, "cli-private", "restricted", sim, expect=1).stderr
    result = cli("access", url, "cli-private", "restricted", "--token", owner, sim)
    assert "restricted" in result.stdout

    result = cli("run", url, "cli-private", inputs, sim, expect=1)
    assert "404" in result.stderr and "restricted" in result.stderr  # as if it did not exist
    # The owner may run it.
    printed = json_out(cli("run", url, "cli-private", inputs, "--token", owner, sim))
    assert printed["y"]["data"] == x.tolist()

    assert "401" in cli("keys", "create", url, "cli-private", sim, expect=1).stderr
    key = json_out(cli("keys", "create", url, "cli-private", "--token", owner, sim))
    assert key["model"] == "cli-private"
    assert key["run_key"].startswith("bfr_") and key["key_id"]
    printed = json_out(cli("run", url, "cli-private", inputs, "--token", key["run_key"], sim))
    assert printed["y"]["data"] == x.tolist()
    # By hash, the same key grants the same right.
    printed = json_out(cli("run", url, uploaded["sha256"], inputs, "--token", key["run_key"], sim))
    assert printed["y"]["data"] == x.tolist()
    # A run key is not an owner token.
    result = cli("keys", "create", url, "cli-private", "--token", key["run_key"], sim, expect=1)
    assert "403" in result.stderr

    result = cli("keys", "revoke", url, "cli-private", key["key_id"], "--token", owner, sim)
    assert key["key_id"] in result.stdout
    result = cli("run", url, "cli-private", inputs, "--token", key["run_key"], sim, expect=1)
    assert "404" in result.stderr
    result = cli(
        "keys", "revoke", url, "cli-private", key["key_id"], "--token", owner, sim, expect=1
    )
    assert "404" in result.stderr

    # Public again: anyone may run it.
    cli("access", url, "cli-private", "public", "--token", owner, sim)
    printed = json_out(cli("run", url, "cli-private", inputs, sim))
    assert printed["y"]["data"] == x.tolist()
    sdk_delete(url, "cli-private", owner)


def test_token_from_environment(url: str, tmp_path: Path) -> None:
    import os

    path = tmp_path / "env.onnx"
    path.write_bytes(identity_model(TensorProto.FLOAT, name="cli-env").SerializeToString())
    uploaded = json_out(cli("upload", url, path, "--name", "cli-env", "--allow-simulation"))
    result = subprocess.run(
        [sys.executable, "-m", "blindfold", "delete", url, "cli-env", "--allow-simulation"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BLINDFOLD_TOKEN": uploaded["owner_token"]},
    )
    assert result.returncode == 0, result.stderr
    assert "deleted cli-env" in result.stdout


def test_serve_listens_where_the_environment_says(tmp_path: Path) -> None:
    """BLINDFOLD_HOST and BLINDFOLD_PORT (what the container image sets) replace the
    defaults of --host and --port."""
    import os
    import time
    import urllib.request

    from conftest import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "BLINDFOLD_HOST": "127.0.0.1", "BLINDFOLD_PORT": str(port)}
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "blindfold", "serve", "--open-upload"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
    context = unverified_context()
    try:
        deadline = time.monotonic() + 60
        while "Blindfold serving on" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert f"serving on https://127.0.0.1:{port} " in log.read_text()
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                url = f"https://127.0.0.1:{port}/v2/health/ready"
                with urllib.request.urlopen(url, context=context, timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(15)
