"""onnxruntime-extensions' custom operators (domain ai.onnx.contrib): accepted exactly when
the operator enables them, run inside the confined worker, and no other custom domain gets in
on their back."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import blindfold

from helpers import connect
from onnx_models import custom_domain_model
from server_process import ServerProcess, start_server

pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions is not installed")

VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "secret", "##s"]


def tokenizer_model(domain: str = "ai.onnx.contrib") -> bytes:
    """One BertTokenizer node: text in, token ids out (pre-processing inside the TEE)."""
    node = helper.make_node(
        "BertTokenizer",
        ["text"],
        ["input_ids", "token_type_ids", "attention_mask"],
        domain=domain,
        vocab_file="\n".join(VOCABULARY),
        do_lower_case=1,
        strip_accents=1,
    )
    graph = helper.make_graph(
        [node],
        "tokenizer",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, [None])
            for name in ("input_ids", "token_type_ids", "attention_mask")
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    )
    data: bytes = model.SerializeToString()
    return data


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server started without any extension flag: the package is installed, so they are on."""
    process = start_server(tmp_path_factory.mktemp("ortx"), "--open-upload")
    yield process
    process.stop()


def test_tokenizer_runs_in_the_confined_worker_on_python_strings(plain: ServerProcess) -> None:
    # The worker chroots into an empty directory before it loads a model: the extensions
    # library must already be loaded by then, or this upload fails.
    assert "onnxruntime-extensions" in plain.log()
    with connect(plain) as client:
        uploaded = client.upload_model(tokenizer_model(), name="tokenizer")
        outputs = client.run_model("tokenizer", ["Hello worlds SECRET"])
        assert outputs["input_ids"].tolist() == [2, 5, 6, 8, 7, 3]  # [CLS] ... [SEP]
        assert outputs["attention_mask"].tolist() == [1] * 6
        by_hash = client.run_model(f"sha256:{uploaded.sha256}", np.array(["world"], object))
        assert by_hash["input_ids"].tolist() == [2, 6, 3]
    assert "secret" not in plain.log().lower()


def test_the_front_process_loads_no_pytorch(plain: ServerProcess) -> None:
    """Importing onnxruntime_extensions imports PyTorch when it is installed: the front, which
    holds the server's keys, finds the operator library without importing the package."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed here, so nothing could load it")
    with connect(plain) as client:  # a model with the extension's operators loaded
        client.upload_model(tokenizer_model(), name="tokenizer-no-torch")
    maps = Path(f"/proc/{plain.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps


def test_other_custom_domains_are_still_refused(plain: ServerProcess) -> None:
    with connect(plain) as client:
        for model in (custom_domain_model("com.evil"), custom_domain_model("ai.onnx.contrib.x")):
            with pytest.raises(blindfold.ServerError) as info:
                client.upload_model(model, name="evil")
            assert info.value.status == 400
            assert "custom operators cannot be loaded" in info.value.message
        assert client.is_ready()


def test_unknown_operator_in_the_contrib_domain_is_a_clear_400(plain: ServerProcess) -> None:
    with connect(plain) as client:
        with pytest.raises(blindfold.ServerError) as info:
            client.upload_model(custom_domain_model("ai.onnx.contrib"), name="pwn")
        assert info.value.status == 400
        assert "Pwn" in info.value.message
        assert client.is_ready()
        client.upload_model(tokenizer_model(), name="after-pwn")
        assert client.run_model("after-pwn", ["hello"])["input_ids"].tolist() == [2, 5, 3]


def test_no_ort_extensions_refuses_the_contrib_domain(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--open-upload", "--no-ort-extensions")
    try:
        assert "onnxruntime-extensions" not in server.log()
        with connect(server) as client:
            with pytest.raises(blindfold.ServerError) as info:
                client.upload_model(tokenizer_model(), name="tokenizer")
            assert info.value.status == 400
            assert "--enable-ort-extensions" in info.value.message
            assert client.is_ready()
    finally:
        server.stop()


def test_extensions_in_process_too(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, "--open-upload", "--enable-ort-extensions", "--unsafe-no-isolation"
    )
    try:
        with connect(server) as client:
            client.upload_model(tokenizer_model(), name="tokenizer")
            assert client.run_model("tokenizer", ["hello"])["input_ids"].tolist() == [2, 5, 3]
    finally:
        server.stop()
