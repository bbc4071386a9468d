"""Server start-up choices: upload keys, TEE selection, refusing unsafe combinations."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from blindfold.errors import ConfigurationError
from blindfold.server.main import read_upload_keys


def test_upload_keys_plain_and_hashed(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    hashed = hashlib.sha256(b"second-key").hexdigest()
    first = "first-key-of-22-chars-or-more"
    path.write_text(f"# deployment keys\n{first}\n\nsha256:{hashed.upper()}\n")
    assert read_upload_keys(path) == {hashlib.sha256(first.encode()).hexdigest(), hashed}


@pytest.mark.parametrize("text", ["", "# only a comment\n", "sha256:abc\n"])
def test_bad_upload_key_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(ConfigurationError):
        read_upload_keys(path)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindfold", "serve", "--port", "1", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_requires_an_upload_choice() -> None:
    result = _serve()
    assert result.returncode == 1
    assert "--upload-key-file" in result.stderr and "--open-upload" in result.stderr


def test_auto_without_hardware_needs_explicit_fallback() -> None:
    if any(
        Path(p).exists()
        for p in ("/dev/attestation", "/dev/tdx_guest", "/dev/sev-guest", "/dev/nsm")
    ):
        pytest.skip("this machine has TEE hardware")
    result = _serve("--tee", "auto", "--open-upload")
    assert result.returncode == 1
    assert "simulation" in result.stderr.lower()


def test_hardware_kind_without_device_fails_clearly() -> None:
    if Path("/dev/attestation").exists():
        pytest.skip("this machine runs under Gramine")
    result = _serve("--tee", "sgx", "--open-upload")
    assert result.returncode == 1
    assert "/dev/attestation" in result.stderr
