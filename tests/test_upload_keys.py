"""Who may upload: upload key files (plaintext keys are warned about, short keys refused),
`blindfold upload-key new`, and the bin/serve default that opens uploads only on the
simulation TEE and generates an upload key on TEE hardware."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from onnx import TensorProto

import blindfold
from blindfold.errors import ConfigurationError
from blindfold.server.main import ServerConfig, decide_upload_access, read_upload_keys

from conftest import start_server
from onnx_models import identity_model

STRONG = "k" * 22


def _blindfold(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindfold", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("key", ["tiny-key", "upload-key-1", "x" * 21])
def test_short_plaintext_keys_are_refused(tmp_path: Path, key: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"{STRONG}\n{key}\n")
    with pytest.raises(ConfigurationError) as refused:
        read_upload_keys(path)
    message = str(refused.value)
    assert "128 bits" in message and "blindfold upload-key new" in message
    assert key not in message  # never echo a key


def test_plaintext_keys_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.txt"
    hashed = hashlib.sha256(b"another").hexdigest()
    path.write_text(f"sha256:{hashed}\n")
    with caplog.at_level(logging.WARNING):
        assert read_upload_keys(path) == {hashed}
    assert not caplog.records
    path.write_text(f"sha256:{hashed}\n{STRONG}\n")
    with caplog.at_level(logging.WARNING):
        assert read_upload_keys(path) == {hashed, hashlib.sha256(STRONG.encode()).hexdigest()}
    assert "plaintext" in caplog.text and "sha256:" in caplog.text
    assert STRONG not in caplog.text


def test_upload_key_new_prints_a_key_and_its_line(tmp_path: Path) -> None:
    key_file = tmp_path / "upload-keys.txt"
    first = json.loads(_blindfold("upload-key", "new", "--key-file", str(key_file)).stdout)
    second = json.loads(_blindfold("upload-key", "new", "--key-file", str(key_file)).stdout)
    assert first["upload_key"] != second["upload_key"]
    for made in (first, second):
        assert len(made["upload_key"]) >= 43  # 256 random bits
        digest = hashlib.sha256(made["upload_key"].encode()).hexdigest()
        assert made["key_file_line"] == f"sha256:{digest}"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text() == f"{first['key_file_line']}\n{second['key_file_line']}\n"
    assert read_upload_keys(key_file) == {
        hashlib.sha256(made["upload_key"].encode()).hexdigest() for made in (first, second)
    }


@pytest.mark.parametrize("kind", ["sgx", "tdx", "sev-snp", "nitro"])
def test_bin_serve_default_generates_a_key_on_tee_hardware(kind: str) -> None:
    access = decide_upload_access(ServerConfig(open_upload_if_simulation=True), kind)
    assert not access.open_upload
    assert access.generated_key is not None and len(access.generated_key) >= 43
    assert access.key_hashes == {hashlib.sha256(access.generated_key.encode()).hexdigest()}


def test_bin_serve_default_opens_upload_only_in_simulation(tmp_path: Path) -> None:
    access = decide_upload_access(ServerConfig(open_upload_if_simulation=True), "simulation")
    assert access.open_upload and access.generated_key is None
    # Explicit choices win over the default.
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"{STRONG}\n")
    for kind in ("simulation", "sgx"):
        keyed = ServerConfig(open_upload_if_simulation=True, upload_key_file=key_file)
        access = decide_upload_access(keyed, kind)
        assert not access.open_upload and access.generated_key is None
        opened = decide_upload_access(ServerConfig(open_upload=True), kind)
        assert opened.open_upload and opened.generated_key is None
    with pytest.raises(ConfigurationError, match="--upload-key-file"):
        decide_upload_access(ServerConfig(), "sgx")


def test_bin_serve_arguments_open_upload_on_the_simulation_tee(tmp_path: Path) -> None:
    bin_serve = (Path(__file__).parent.parent / "bin" / "serve").read_text()
    assert "--open-upload-if-simulation" in bin_serve
    assert "--open-upload\n" not in bin_serve
    server = start_server(tmp_path, "--tee", "simulation", "--open-upload-if-simulation")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = blindfold.connect(server.url, allow_simulation=True)
        with client:
            model = client.upload_model(identity_model(TensorProto.FLOAT, name="open"), name="o")
            assert model.owner_token
        assert "uploads: OPEN" in server.log()
    finally:
        server.stop()
