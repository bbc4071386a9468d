"""Encrypted model files are read only from the operator's folder: an uploader who names a
path tries every way out of it (`..`, an absolute path, a symbolic link) and is refused
before any file is opened. A file decrypts chunk by chunk straight into a sealed memfd (one
copy of the model), and one that fails authentication part-way leaves nothing behind."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import blindfold
from blindfold.errors import SealError
from blindfold.sealing import DEFAULT_CHUNK_SIZE, decrypt_model_file, encrypt_model_file
from blindfold.server import encrypted_models
from blindfold.server.encrypted_models import EncryptedModels
from blindfold.server.http_errors import status_of
from blindfold.server.model_bytes import ModelBytes
from blindfold.server.pools import Pool
from blindfold.server.refusals import AccessDenied, InvalidRequest, NotFound

from conftest import ServerProcess
from server_process import model_memfds


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
    decrypted = asyncio.run(models.decrypt(Path("model.enc"), key, 1 << 20))
    assert isinstance(decrypted, ModelBytes)
    with decrypted.view() as view:
        assert bytes(view) == b"model bytes"
    decrypted.close()
    with pytest.raises(NotFound, match="no encrypted model file"):
        asyncio.run(models.decrypt(Path("missing.enc"), key, 1 << 20))
    (folder / "garbage.enc").write_bytes(b"not sealed")
    with pytest.raises(InvalidRequest, match="cannot decrypt") as refused:
        asyncio.run(models.decrypt(Path("garbage.enc"), key, 1 << 20))
    assert b"not sealed" not in str(refused.value).encode()


def bias_model(values: int = 700_000) -> onnx.ModelProto:
    """y = x + b with b a random float32 [1, values]: about 2.7 MiB, three sealed chunks."""
    b = np.random.default_rng(3).random((1, values), dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, values])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, values])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "bias",
        [x],
        [y],
        initializer=[numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def corrupt_second_chunk(source: Path, target: Path) -> None:
    """A copy with one bit flipped in the second chunk: the first decrypts (and is written)
    before the second fails authentication."""
    data = bytearray(source.read_bytes())
    data[DEFAULT_CHUNK_SIZE + DEFAULT_CHUNK_SIZE // 2] ^= 1
    target.write_bytes(bytes(data))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd is Linux only")
def test_a_decrypted_model_is_a_sealed_memfd_and_a_corrupt_file_leaves_nothing(
    tmp_path: Path, pool: Pool
) -> None:
    plain = tmp_path / "model.onnx"
    plain.write_bytes(bias_model().SerializeToString())
    folder = tmp_path / "models"
    folder.mkdir()
    key = encrypt_model_file(plain, folder / "model.enc")
    models = EncryptedModels(folder, pool)
    before = len(model_memfds())
    decrypted = asyncio.run(models.decrypt(Path("model.enc"), key, 1 << 30))
    assert isinstance(decrypted, ModelBytes)
    assert decrypted.sha256 == key.sha256 and len(decrypted) == plain.stat().st_size
    assert fcntl.fcntl(decrypted.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
    with decrypted.view() as view:
        assert view == plain.read_bytes()
    decrypted.close()
    corrupt_second_chunk(folder / "model.enc", folder / "corrupt.enc")
    with pytest.raises(SealError) as expected:  # the bytes path's error, as before
        decrypt_model_file(folder / "corrupt.enc", key, max_bytes=1 << 30)
    with pytest.raises(InvalidRequest) as refused:
        asyncio.run(models.decrypt(Path("corrupt.enc"), key, 1 << 30))
    path = folder.resolve() / "corrupt.enc"
    assert refused.value.message == f"cannot decrypt {str(path)!r}: {expected.value}"
    assert "does not authenticate at chunk 1" in refused.value.message
    assert len(model_memfds()) == before  # the part already decrypted went with its memfd


def test_without_memfd_a_decrypted_model_is_bytes(
    tmp_path: Path, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gramine's SGX enclaves have no memfd: the model arrives whole, as bytes."""
    monkeypatch.setattr(encrypted_models, "memfd_available", lambda: False)
    plain = tmp_path / "model.onnx"
    plain.write_bytes(b"model bytes " * 200_000)
    folder = tmp_path / "models"
    folder.mkdir()
    key = encrypt_model_file(plain, folder / "model.enc")
    models = EncryptedModels(folder, pool)
    assert asyncio.run(models.decrypt(Path("model.enc"), key, 1 << 30)) == plain.read_bytes()
    corrupt_second_chunk(folder / "model.enc", folder / "corrupt.enc")
    with pytest.raises(InvalidRequest, match="does not authenticate at chunk 1"):
        asyncio.run(models.decrypt(Path("corrupt.enc"), key, 1 << 30))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd is Linux only")
def test_a_corrupt_encrypted_file_replaces_nothing_on_the_server(
    server: ServerProcess, client: blindfold.Client, tmp_path: Path
) -> None:
    """Against the real server: the model loads from its encrypted file and serves; a copy
    corrupted in its second chunk is refused with the clear 400, the model it would have
    replaced still serves (same version, same bytes), and no memfd is left behind."""
    plain = tmp_path / "bias.onnx"
    plain.write_bytes(bias_model().SerializeToString())
    key = encrypt_model_file(plain, tmp_path / "bias.enc")
    loaded = client.load_encrypted_model("enc-bias", str(tmp_path / "bias.enc"), key)
    assert loaded.sha256 == key.sha256
    x = np.ones((1, 700_000), np.float32)
    first = client.run_model("enc-bias", x)["y"]
    corrupt_second_chunk(tmp_path / "bias.enc", tmp_path / "corrupt.enc")
    held = len(model_memfds(server.process.pid))
    with pytest.raises(blindfold.ServerError) as refused:
        client.load_encrypted_model("enc-bias", str(tmp_path / "corrupt.enc"), key)
    assert refused.value.status == 400
    assert "does not authenticate at chunk 1" in refused.value.message
    assert len(model_memfds(server.process.pid)) == held
    metadata = client.model_metadata("enc-bias")
    assert metadata["versions"] == ["1"] and metadata["sha256"] == key.sha256
    np.testing.assert_array_equal(client.run_model("enc-bias", x)["y"], first)
    client.delete_model("enc-bias")


def test_an_encrypted_model_takes_the_upload_options(
    client: blindfold.Client, tmp_path: Path
) -> None:
    """load-encrypted takes the per-model options an upload takes: the owner's batching and
    warm-up shapes apply and are reported; a wrong option is a 400 naming it, given before
    the file is even looked for."""
    model = bias_model(1_000)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.arange(1_000, dtype=np.float32), "b")
    )
    plain = tmp_path / "batched.onnx"
    plain.write_bytes(model.SerializeToString())
    key = encrypt_model_file(plain, tmp_path / "batched.enc")
    loaded = client.load_encrypted_model(
        "enc-options",
        str(tmp_path / "batched.enc"),
        key,
        max_batch_size=8,
        max_queue_delay_us=500,
        preferred_batch_sizes=[4],
        warmup_shapes={"x": [4, 1_000]},
    )
    assert loaded.warmup == "ok"
    assert loaded.scheduling is not None
    assert loaded.scheduling["max_batch_size"] == 8
    assert loaded.scheduling["warmup_shapes"] == {"x": [4, 1_000]}
    assert client.model_metadata("enc-options")["scheduling"]["preferred_batch_sizes"] == [4]
    x = np.ones((2, 1_000), np.float32)
    np.testing.assert_array_equal(client.run_model("enc-options", x)["y"], x + np.arange(1_000))
    for options, named in (
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"warmup_shapes": {"x": [0, 1_000]}}, "warmup_shapes"),
        ({"preferred_batch_sizes": [4]}, "give max_batch_size too"),
    ):
        with pytest.raises(blindfold.ServerError) as refused:
            client.load_encrypted_model(
                "enc-options-2", str(tmp_path / "not-there.enc"), key, **options
            )
        assert refused.value.status == 400, refused.value.message
        assert named in refused.value.message
    client.delete_model("enc-options")
