"""Sealed streams, encrypted model files and signed inference receipts."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from onnx import TensorProto, helper

from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.errors import BlindfoldError, ConfigurationError, ReceiptError, SealError
from blindfold.receipts import (
    ZERO_SHA256,
    Receipt,
    ReceiptChainVerifier,
    ReceiptSigner,
    SavedReceipt,
    public_key_sha256_hex,
    tensor_digest,
    tensors_digest,
    verify_receipt,
)
from blindfold.sealing import (
    HEADER_SIZE,
    MODEL_FILE_LABEL,
    TAG_SIZE,
    ModelKey,
    decrypt_model_file,
    encrypt_model_file,
    seal,
    seal_file,
    seal_into,
    unseal,
    unseal_to_bytes,
)

from helpers import self_signed_certificate

KEY = bytes(range(32))
LABEL = b"test-label"
CHUNK = 64  # small chunks so multi-chunk cases need only a few hundred bytes
RECORD = CHUNK + TAG_SIZE


def _sealed(plaintext: bytes) -> bytes:
    return seal(KEY, plaintext, label=LABEL, chunk_size=CHUNK)


def _flip(blob: bytes, offset: int) -> bytes:
    data = bytearray(blob)
    data[offset] ^= 0x01
    return bytes(data)


# --- sealing ---


def test_seal_error_is_a_blindfold_error() -> None:
    assert issubclass(SealError, BlindfoldError)


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17], ids=lambda n: f"{n}B"
)
def test_round_trip(size: int) -> None:
    plaintext = os.urandom(size)
    blob = _sealed(plaintext)
    assert unseal(KEY, blob, label=LABEL) == plaintext
    # Every full chunk is followed by a shorter final one, possibly empty.
    assert len(blob) == HEADER_SIZE + (size // CHUNK + 1) * TAG_SIZE + size


def test_default_chunk_size_round_trip() -> None:
    plaintext = os.urandom((1 << 20) + 5)
    assert unseal(KEY, seal(KEY, plaintext, label=LABEL), label=LABEL) == plaintext


def test_sealing_is_randomised() -> None:
    assert _sealed(b"same") != _sealed(b"same")


def test_wrong_key_fails() -> None:
    blob = _sealed(b"secret model")
    with pytest.raises(SealError, match="test-label") as info:
        unseal(bytes(32), blob, label=LABEL)
    assert "secret model" not in str(info.value)


def test_wrong_label_fails() -> None:
    blob = _sealed(b"secret model")
    with pytest.raises(SealError, match="other-label"):
        unseal(KEY, blob, label=b"other-label")


def test_wrong_key_length_is_refused() -> None:
    with pytest.raises(SealError, match="32 bytes"):
        seal(b"short", b"x", label=LABEL)


@pytest.mark.parametrize(
    "offset",
    [
        0,  # magic
        8,  # version
        9,  # base nonce
        HEADER_SIZE - 1,  # chunk size
        HEADER_SIZE + RECORD + 3,  # middle chunk ciphertext
        HEADER_SIZE + 2 * RECORD - 1,  # middle chunk tag
        -1,  # last chunk's tag
    ],
    ids=["magic", "version", "nonce", "chunk-size", "middle-chunk", "middle-tag", "last-tag"],
)
def test_flipped_bit_fails(offset: int) -> None:
    blob = _sealed(os.urandom(3 * CHUNK + 10))
    with pytest.raises(SealError):
        unseal(KEY, _flip(blob, offset % len(blob)), label=LABEL)


def test_every_single_bit_flip_fails() -> None:
    blob = _sealed(os.urandom(2 * CHUNK + 3))
    for offset in range(len(blob)):
        with pytest.raises(SealError):
            unseal(KEY, _flip(blob, offset), label=LABEL)


@pytest.mark.parametrize("size", [3 * CHUNK, 3 * CHUNK + 10])
def test_truncated_by_one_chunk_fails(size: int) -> None:
    blob = _sealed(os.urandom(size))
    final_record = len(blob) - HEADER_SIZE - 3 * RECORD
    with pytest.raises(SealError, match=r"truncated|authenticate"):
        unseal(KEY, blob[: len(blob) - final_record], label=LABEL)
    with pytest.raises(SealError):
        unseal(KEY, blob[: len(blob) - final_record - RECORD], label=LABEL)


def test_truncated_anywhere_fails() -> None:
    blob = _sealed(os.urandom(2 * CHUNK + 3))
    for length in range(len(blob)):
        with pytest.raises(SealError):
            unseal(KEY, blob[:length], label=LABEL)


def test_chunks_swapped_fails() -> None:
    blob = _sealed(os.urandom(3 * CHUNK + 10))
    first = slice(HEADER_SIZE, HEADER_SIZE + RECORD)
    second = slice(HEADER_SIZE + RECORD, HEADER_SIZE + 2 * RECORD)
    swapped = blob[: first.start] + blob[second] + blob[first] + blob[second.stop :]
    with pytest.raises(SealError, match="chunk 0"):
        unseal(KEY, swapped, label=LABEL)


@pytest.mark.parametrize("extra", [1, RECORD], ids=["byte", "record"])
def test_appended_bytes_fail(extra: int) -> None:
    with pytest.raises(SealError):
        unseal(KEY, _sealed(b"abc") + bytes(extra), label=LABEL)


def test_chunk_from_another_blob_fails() -> None:
    a = _sealed(bytes(2 * CHUNK))
    b = _sealed(bytes(2 * CHUNK))
    spliced = a[: HEADER_SIZE + RECORD] + b[HEADER_SIZE + RECORD :]
    with pytest.raises(SealError):
        unseal(KEY, spliced, label=LABEL)


def test_oversized_chunk_size_in_header_is_refused_before_reading() -> None:
    blob = bytearray(_sealed(b"abc"))
    blob[HEADER_SIZE - 4 : HEADER_SIZE] = (1 << 31).to_bytes(4, "little")
    with pytest.raises(SealError, match="chunk size"):
        unseal(KEY, bytes(blob), label=LABEL)


def test_not_sealed_data_is_refused() -> None:
    with pytest.raises(SealError, match="sealed format"):
        unseal(KEY, b"x" * 100, label=LABEL)
    with pytest.raises(SealError, match="header"):
        unseal(KEY, b"", label=LABEL)


def test_seal_file_and_stream_unseal(tmp_path: Path) -> None:
    plaintext = os.urandom(5 * CHUNK + 1)
    src = tmp_path / "plain.bin"
    src.write_bytes(plaintext)
    out = io.BytesIO()
    seal_file(KEY, src, out, label=LABEL, chunk_size=CHUNK)
    out.seek(0)
    assert unseal_to_bytes(KEY, out, label=LABEL, max_bytes=len(plaintext)) == plaintext


def test_unseal_max_bytes_is_enforced() -> None:
    blob = _sealed(os.urandom(3 * CHUNK))
    with pytest.raises(SealError, match="limit of 100 bytes"):
        unseal_to_bytes(KEY, io.BytesIO(blob), label=LABEL, max_bytes=100)


# --- encrypted model files ---


def _small_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def test_encrypted_model_file_round_trip(tmp_path: Path) -> None:
    model_bytes = _small_model()
    src = tmp_path / "model.onnx"
    src.write_bytes(model_bytes)
    dst = tmp_path / "model.onnx.enc"
    key = encrypt_model_file(src, dst)
    assert key.sha256 == hashlib.sha256(model_bytes).hexdigest()
    assert model_bytes not in dst.read_bytes()
    key_path = tmp_path / "model.key.json"
    key.save(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = ModelKey.load(key_path)
    assert loaded == key
    assert key.key.hex() not in repr(key)
    decrypted = decrypt_model_file(dst, loaded, max_bytes=1 << 20)
    assert decrypted == model_bytes
    assert onnx.load_from_string(decrypted).graph.node[0].op_type == "Relu"


def test_encrypted_model_file_wrong_key(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(_small_model())
    key = encrypt_model_file(src, tmp_path / "model.onnx.enc")
    wrong = ModelKey(key=os.urandom(32), sha256=key.sha256)
    with pytest.raises(SealError, match="blindfold-model-file"):
        decrypt_model_file(tmp_path / "model.onnx.enc", wrong, max_bytes=1 << 20)


def test_encrypted_model_file_wrong_expected_hash(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(_small_model())
    key = encrypt_model_file(src, tmp_path / "model.onnx.enc")
    wrong = ModelKey(key=key.key, sha256="ab" * 32)
    with pytest.raises(SealError, match=f"{key.sha256}.*expects {'ab' * 32}"):
        decrypt_model_file(tmp_path / "model.onnx.enc", wrong, max_bytes=1 << 20)


def test_model_file_is_sealed_with_the_model_label(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"not really onnx")
    key = encrypt_model_file(src, tmp_path / "m.enc")
    blob = (tmp_path / "m.enc").read_bytes()
    assert unseal(key.key, blob, label=MODEL_FILE_LABEL) == b"not really onnx"
    with pytest.raises(SealError):
        unseal(key.key, blob, label=b"model-store")


def test_model_key_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text('{"key": "AAAA", "sha256": "00"}')
    with pytest.raises(ConfigurationError, match="keys"):
        ModelKey.load(path)
    good = ModelKey(key=bytes(32), sha256="0" * 64).to_json()
    with pytest.raises(ConfigurationError, match="32 bytes"):
        ModelKey.from_json({**good, "key": "AAAA"})


# --- receipts ---

INPUTS = {
    "x": np.arange(6, dtype=np.float32).reshape(2, 3),
    "tokens": np.array([b"hello", "w\u00f6rld"], dtype=object),
}
OUTPUTS = {"y": np.array([[1, 2, 3]], dtype=np.int64)}
MODEL_SHA = hashlib.sha256(b"model").hexdigest()
EVIDENCE = Evidence(kind="simulation", evidence=b"evidence bytes", collateral={"a.pem": b"c"})


@pytest.fixture(scope="module")
def server_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _signer(key: ec.EllipticCurvePrivateKey) -> ReceiptSigner:
    return ReceiptSigner(
        key, public_key_sha256_hex(key.public_key()), hashlib.sha256(EVIDENCE.evidence).hexdigest()
    )


def _sign(signer: ReceiptSigner, request_id: str = "req-1", nonce: str = "ab12") -> Receipt:
    return signer.sign(MODEL_SHA, INPUTS, OUTPUTS, request_id, nonce)


def test_tensor_digest_is_layout_and_byte_order_independent() -> None:
    a = np.arange(12, dtype="<i4").reshape(3, 4)
    assert tensor_digest("t", a) == tensor_digest("t", a.astype(">i4"))
    assert tensor_digest("t", a) == tensor_digest("t", np.asfortranarray(a))
    assert tensor_digest("t", a) != tensor_digest("u", a)
    assert tensor_digest("t", a) != tensor_digest("t", a.reshape(4, 3))
    assert tensor_digest("t", a) != tensor_digest("t", a.astype(np.uint32))
    assert tensor_digest("t", np.array(["ab", "c"])) == tensor_digest(
        "t", np.array([b"ab", b"c"], dtype=object)
    )
    assert tensor_digest("t", np.array(["ab", "c"])) != tensor_digest("t", np.array(["a", "bc"]))


def test_tensors_digest_ignores_mapping_order() -> None:
    reordered = dict(reversed(list(INPUTS.items())))
    assert tensors_digest(INPUTS) == tensors_digest(reordered)
    assert tensors_digest(INPUTS) != tensors_digest({"x": INPUTS["x"]})


def test_sign_and_verify(server_key: ec.EllipticCurvePrivateKey) -> None:
    receipt = _sign(_signer(server_key))
    assert receipt.sequence == 0 and receipt.previous_sha256 == ZERO_SHA256
    verify_receipt(
        receipt,
        server_key.public_key(),
        inputs=INPUTS,
        outputs=OUTPUTS,
        model_sha256=MODEL_SHA,
        client_nonce="ab12",
    )
    assert b" " not in receipt.signed_bytes()
    assert b"signature" not in receipt.signed_bytes()
    assert Receipt.from_json(receipt.to_json()) == receipt


def _altered(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 1.0
    assert isinstance(value, str)
    if not value:
        return "00"
    last = "0" if value[-1] != "0" else "1"
    return value[:-1] + last


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Receipt)])
def test_each_altered_field_fails(server_key: ec.EllipticCurvePrivateKey, field: str) -> None:
    receipt = _sign(_signer(server_key))
    changes: dict[str, Any] = {field: _altered(getattr(receipt, field))}
    altered = dataclasses.replace(receipt, **changes)
    with pytest.raises(ReceiptError):
        verify_receipt(altered, server_key.public_key())


def test_altered_tensor_byte_fails(server_key: ec.EllipticCurvePrivateKey) -> None:
    receipt = _sign(_signer(server_key))
    for name in ("inputs", "outputs"):
        tensors = {k: v.copy() for k, v in (INPUTS if name == "inputs" else OUTPUTS).items()}
        first = next(iter(tensors))
        tensors[first].reshape(-1).view(np.uint8)[0] ^= 1
        kwargs: dict[str, Any] = {name: tensors}
        with pytest.raises(ReceiptError, match=f"{name}_sha256: expected"):
            verify_receipt(receipt, server_key.public_key(), **kwargs)


def test_other_data_mismatches_name_the_field(server_key: ec.EllipticCurvePrivateKey) -> None:
    receipt = _sign(_signer(server_key))
    public = server_key.public_key()
    with pytest.raises(ReceiptError, match="model_sha256: expected 00"):
        verify_receipt(receipt, public, model_sha256="00" * 32)
    with pytest.raises(ReceiptError, match="client_nonce: expected ff, found ab12"):
        verify_receipt(receipt, public, client_nonce="ff")


def test_other_key_fails(server_key: ec.EllipticCurvePrivateKey) -> None:
    receipt = _sign(_signer(server_key))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ReceiptError, match="server_key_sha256"):
        verify_receipt(receipt, other.public_key())
    # Even a receipt claiming the other key's hash fails: the signature is not its.
    forged = dataclasses.replace(
        receipt, server_key_sha256=public_key_sha256_hex(other.public_key())
    )
    with pytest.raises(ReceiptError, match="signature"):
        verify_receipt(forged, other.public_key())


def test_signer_refuses_a_mismatched_key_hash(server_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ConfigurationError):
        ReceiptSigner(server_key, "00" * 32, "00" * 32)


def test_from_json_is_strict(server_key: ec.EllipticCurvePrivateKey) -> None:
    data = _sign(_signer(server_key)).to_json()
    missing = {k: v for k, v in data.items() if k != "sequence"}
    with pytest.raises(ReceiptError, match="missing \\['sequence'\\]"):
        Receipt.from_json(missing)
    with pytest.raises(ReceiptError, match="unexpected \\['extra'\\]"):
        Receipt.from_json({**data, "extra": 1})
    for field, bad in [
        ("sequence", "0"),
        ("sequence", True),
        ("server_time", 1),
        ("model_sha256", "XYZ"),
        ("request_id", 5),
        ("client_nonce", "not hex"),
    ]:
        with pytest.raises(ReceiptError, match=field):
            Receipt.from_json({**data, field: bad})
    with pytest.raises(ReceiptError):
        Receipt.from_json([])


def test_chain_links(server_key: ec.EllipticCurvePrivateKey) -> None:
    signer = _signer(server_key)
    receipts = [_sign(signer, f"req-{i}") for i in range(4)]
    assert [r.sequence for r in receipts] == [0, 1, 2, 3]
    for previous, receipt in itertools.pairwise(receipts):
        assert receipt.previous_sha256 == previous.digest()
        verify_receipt(receipt, server_key.public_key(), previous=previous)
    chain = ReceiptChainVerifier(allow_gaps=False)
    for receipt in receipts:
        chain.verify(receipt, server_key.public_key())
    assert chain.last(receipts[0].server_key_sha256) == receipts[-1]


def test_chain_dropped_receipt(server_key: ec.EllipticCurvePrivateKey) -> None:
    signer = _signer(server_key)
    r0, _, r2 = (_sign(signer) for _ in range(3))
    strict = ReceiptChainVerifier(allow_gaps=False)
    strict.verify(r0, server_key.public_key())
    with pytest.raises(ReceiptError, match="sequence: expected 1, found 2"):
        strict.verify(r2, server_key.public_key())
    lenient = ReceiptChainVerifier()
    lenient.verify(r0, server_key.public_key())
    lenient.verify(r2, server_key.public_key())


def test_chain_reordered_or_replayed(server_key: ec.EllipticCurvePrivateKey) -> None:
    """Concurrent requests get their receipts back in any order: a late one that fits the
    chain is accepted (its successor links to it); a repeat, or one far older than the
    window, is not."""
    signer = _signer(server_key)
    r0, r1, r2, r3 = (_sign(signer) for _ in range(4))
    chain = ReceiptChainVerifier()
    chain.verify(r0, server_key.public_key())
    chain.verify(r2, server_key.public_key())
    chain.verify(r1, server_key.public_key())  # late, and r2 links to it
    assert chain.last(r0.server_key_sha256) == r2
    for again in (r0, r1, r2):
        with pytest.raises(ReceiptError, match="replayed"):
            chain.verify(again, server_key.public_key())
    narrow = ReceiptChainVerifier(window=1)
    narrow.verify(r3, server_key.public_key())
    narrow.verify(r2, server_key.public_key())
    with pytest.raises(ReceiptError, match="replayed or reordered"):
        narrow.verify(r1, server_key.public_key())  # 2 behind the newest, window 1
    strict = ReceiptChainVerifier(allow_gaps=False)
    strict.verify(r0, server_key.public_key())
    strict.verify(r1, server_key.public_key())
    with pytest.raises(ReceiptError, match="dropped or reordered"):
        strict.verify(r3, server_key.public_key())


def test_chain_remembers_only_the_window_over_a_long_shuffled_stream(
    server_key: ec.EllipticCurvePrivateKey,
) -> None:
    """Receipts shuffled within small runs (threads sharing a client) over a stream 20
    windows long: every one is accepted once, every repeat refused, and what the verifier
    keeps stays near the window however long the client lives."""
    signer = _signer(server_key)
    receipts = [_sign(signer, f"r{n}") for n in range(160)]
    arrival = [r for start in range(0, 160, 5) for r in reversed(receipts[start : start + 5])]
    chain = ReceiptChainVerifier(window=8)
    for receipt in arrival:
        chain.verify(receipt, server_key.public_key())
        kept = chain._seen[(receipt.server_key_sha256, receipt.evidence_sha256)].receipts
        assert len(kept) <= 8 + 5
    assert chain.last(receipts[0].server_key_sha256) == receipts[-1]
    for again in receipts[-8:]:
        with pytest.raises(ReceiptError, match="replayed"):
            chain.verify(again, server_key.public_key())


def test_chain_late_receipt_must_fit_between_its_neighbours(
    server_key: ec.EllipticCurvePrivateKey,
) -> None:
    """A forked chain is caught whichever receipt arrives first: a late sequence 1 from
    another signer does not fit under the sequence 2 already seen."""
    a, b = _signer(server_key), _signer(server_key)
    a0, _, a2 = (_sign(a, f"a{n}") for n in range(3))
    _sign(b, "b0")
    b1 = _sign(b, "b1")
    chain = ReceiptChainVerifier()
    chain.verify(a0, server_key.public_key())
    chain.verify(a2, server_key.public_key())
    with pytest.raises(ReceiptError, match="previous_sha256"):
        chain.verify(b1, server_key.public_key())  # links to neither a0 nor under a2
    lone = ReceiptChainVerifier()
    lone.verify(a2, server_key.public_key())
    with pytest.raises(ReceiptError, match="previous_sha256"):
        lone.verify(b1, server_key.public_key())  # a2 does not extend b1


def test_chain_broken_link(server_key: ec.EllipticCurvePrivateKey) -> None:
    # Two signers with one key model a server that forked its chain: sequence 1 of the
    # second does not extend sequence 0 of the first.
    a, b = _signer(server_key), _signer(server_key)
    a0 = _sign(a, "a0")
    _sign(b, "b0")
    b1 = _sign(b, "b1")
    with pytest.raises(ReceiptError, match="previous_sha256"):
        verify_receipt(b1, server_key.public_key(), previous=a0)
    chain = ReceiptChainVerifier()
    chain.verify(a0, server_key.public_key())
    with pytest.raises(ReceiptError, match="previous_sha256"):
        chain.verify(b1, server_key.public_key())
    # A failed receipt is not remembered: the chain still ends at a0.
    assert chain.last(a0.server_key_sha256) == a0


def test_chain_first_receipt_must_link_to_zero(server_key: ec.EllipticCurvePrivateKey) -> None:
    forged = dataclasses.replace(_sign(_signer(server_key)), previous_sha256="11" * 32)
    signature = server_key.sign(forged.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    forged = dataclasses.replace(forged, signature=signature.hex())
    with pytest.raises(ReceiptError, match="previous_sha256"):
        verify_receipt(forged, server_key.public_key())


# --- offline bundle ---


def _stub_verifier(calls: list[tuple[Evidence, bytes]]) -> Callable[[Evidence, bytes], Verdict]:
    """Stands in for the real evidence verifier (tested elsewhere): a verdict whose report
    data binds the certificate's key, as DESIGN.md specifies."""

    def verify(evidence: Evidence, certificate_der: bytes) -> Verdict:
        calls.append((evidence, certificate_der))
        cert = x509.load_der_x509_certificate(certificate_der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return Verdict(
            kind=evidence.kind,
            measurements={"measurement": "00" * 32},
            report_data=hashlib.sha256(spki).digest() + bytes(32),
        )

    return verify


def _bundle(key: ec.EllipticCurvePrivateKey) -> SavedReceipt:
    pem = (
        self_signed_certificate(key, "blindfold-test")
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    return SavedReceipt(receipt=_sign(_signer(key)), evidence=EVIDENCE, certificate_pem=pem)


def test_saved_receipt_round_trip(tmp_path: Path, server_key: ec.EllipticCurvePrivateKey) -> None:
    bundle = _bundle(server_key)
    path = tmp_path / "receipt.json"
    bundle.save(path)
    loaded = SavedReceipt.load(path)
    assert loaded == bundle
    calls: list[tuple[Evidence, bytes]] = []
    verdict = loaded.verify(verify_evidence=_stub_verifier(calls), inputs=INPUTS, outputs=OUTPUTS)
    assert verdict.kind == "simulation"
    assert calls and calls[0][0] == EVIDENCE
    assert x509.load_der_x509_certificate(calls[0][1]).public_key() == server_key.public_key()


def test_saved_receipt_detects_substitutions(server_key: ec.EllipticCurvePrivateKey) -> None:
    bundle = _bundle(server_key)
    verifier = _stub_verifier([])
    with pytest.raises(ReceiptError, match="inputs_sha256"):
        bundle.verify(verify_evidence=verifier, inputs={"x": np.zeros(1, np.float32)})
    other_evidence = dataclasses.replace(bundle, evidence=Evidence("simulation", b"other"))
    with pytest.raises(ReceiptError, match="evidence_sha256"):
        other_evidence.verify(verify_evidence=verifier)
    other_cert = _bundle(ec.generate_private_key(ec.SECP256R1())).certificate_pem
    with pytest.raises(ReceiptError, match="server_key_sha256"):
        dataclasses.replace(bundle, certificate_pem=other_cert).verify(verify_evidence=verifier)


def test_saved_receipt_checks_the_certificate_binding(
    server_key: ec.EllipticCurvePrivateKey,
) -> None:
    def unbound(evidence: Evidence, certificate_der: bytes) -> Verdict:
        return Verdict(kind="simulation", measurements={}, report_data=bytes(64))

    with pytest.raises(ReceiptError, match="certificate binding"):
        _bundle(server_key).verify(verify_evidence=unbound)


def test_saved_receipt_load_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"receipt": {}}')
    with pytest.raises(ReceiptError, match="'certificate'"):
        SavedReceipt.load(path)
    path.write_text("not json")
    with pytest.raises(ReceiptError, match="cannot be read"):
        SavedReceipt.load(path)


def test_seal_into_streams_to_a_file_object() -> None:
    key = os.urandom(32)
    plaintext = os.urandom(3 * 64 + 5)
    out = io.BytesIO()
    seal_into(key, plaintext, out, label=b"stream", chunk_size=64)
    assert unseal(key, out.getvalue(), label=b"stream") == plaintext
    with pytest.raises(SealError):
        unseal(key, out.getvalue(), label=b"other")
