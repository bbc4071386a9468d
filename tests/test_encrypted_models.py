"""Encrypted model files are read only from the operator's folder: an uploader who names a
path tries every way out of it (`..`, an absolute path, a symbolic link) and is refused
before any file is opened."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blindfold.sealing import encrypt_model_file
from blindfold.server.encrypted_models import EncryptedModels
from blindfold.server.http_errors import status_of
from blindfold.server.pools import Pool
from blindfold.server.refusals import AccessDenied, InvalidRequest, NotFound


@pytest.fixture
def pool() -> Pool:
    return Pool("test-load", 1)


def test_paths_leading_out_of_the_folder_are_refused(tmp_path: Path, pool: Pool) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"not for uploaders")
    (folder / "link").symlink_to(secret)
    models = EncryptedModels(folder, pool)
    for attempt in ("../host-secret", str(secret), "link", "sub/../../host-secret"):
        with pytest.raises(AccessDenied, match="outside the server's encrypted-models folder"):
            models.confine(Path(attempt))
    assert models.confine(Path("sub/../model.enc")) == folder.resolve() / "model.enc"


def test_a_server_without_the_folder_reads_no_file(tmp_path: Path, pool: Pool) -> None:
    with pytest.raises(AccessDenied, match="--encrypted-models-dir") as refused:
        EncryptedModels(None, pool).confine(Path("model.enc"))
    assert status_of(refused.value) == 403


def test_decrypt_refusals(tmp_path: Path, pool: Pool) -> None:
    plain = tmp_path / "model.onnx"
    plain.write_bytes(b"model bytes")
    folder = tmp_path / "models"
    folder.mkdir()
    key = encrypt_model_file(plain, folder / "model.enc")
    models = EncryptedModels(folder, pool)
    assert asyncio.run(models.decrypt(Path("model.enc"), key, 1 << 20)) == b"model bytes"
    with pytest.raises(NotFound, match="no encrypted model file"):
        asyncio.run(models.decrypt(Path("missing.enc"), key, 1 << 20))
    (folder / "garbage.enc").write_bytes(b"not sealed")
    with pytest.raises(InvalidRequest, match="cannot decrypt") as refused:
        asyncio.run(models.decrypt(Path("garbage.enc"), key, 1 << 20))
    assert b"not sealed" not in str(refused.value).encode()
