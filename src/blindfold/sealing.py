"""Authenticated encryption of model blobs at rest and of model files left on the untrusted host.

This module owns the one sealed-stream format of Blindfold and the encrypted model file
(`blindfold encrypt-model`) with its key file. Everything else that needs bytes encrypted at
rest (the model store, the CLI) goes through `seal` / `unseal` / `seal_file` /
`unseal_to_bytes` / `unseal_into` with a `label` naming what the bytes are, so a blob sealed
for one purpose can never be accepted for another.

Sealed stream layout (all integers little-endian)::

    header  = magic "BFSEALv1" (8) | version u8 | base nonce (12) | chunk size u32
    chunk_i = AES-256-GCM(subkey, nonce_i, plaintext_i, aad_i) -> ciphertext_i || tag (16)

    subkey  = HKDF-SHA256(key, salt = base nonce, info = "blindfold-seal/v1")
    nonce_i = base nonce XOR (i as 12-byte big-endian)
    aad_i   = header | len(label) u32 | label | i u64 | final u8

Every chunk except the last holds exactly `chunk size` plaintext bytes; the last holds
fewer (possibly zero), so a reader knows which chunk is final from its length alone and a
stream cut at a chunk boundary is detected as missing its final chunk.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindfold.errors import ConfigurationError, SealError

# The format is hand-written rather than taken from a library because `cryptography` offers
# only one-shot AEAD: a 1 GiB model would otherwise have to be encrypted in one buffer, and
# one-shot AEAD cannot tell "whole file" from "file cut after a chunk". The layout follows
# the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar 2015) used by age and Tink.
MAGIC = b"BFSEALv1"
FORMAT_VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
_HEADER = struct.Struct("<8sB12sI")
HEADER_SIZE = _HEADER.size
DEFAULT_CHUNK_SIZE = 1 << 20
# A reader allocates one chunk at a time, and the chunk size comes from the (not yet
# authenticated) header, so it is bounded before any allocation.
MAX_CHUNK_SIZE = 1 << 24
_HKDF_INFO = b"blindfold-seal/v1"

MODEL_FILE_LABEL = b"blindfold-model-file"
MODEL_KEY_FORMAT = "blindfold-model-key"
MODEL_KEY_VERSION = 1


# --- helpers ---


def _describe(label: bytes) -> str:
    # Labels are purpose strings chosen by the code, never secrets, so naming them is safe.
    return label.decode("utf-8", "backslashreplace")


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        found = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise SealError(f"sealing key must be {KEY_SIZE} bytes, got {found}")


def _check_chunk_size(chunk_size: int, label: bytes) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise SealError(
            f"sealed data for label {_describe(label)!r} declares chunk size {chunk_size}; "
            f"expected 1..{MAX_CHUNK_SIZE}. The data is corrupt or not sealed by Blindfold."
        )


def _subkey(key: bytes, base_nonce: bytes) -> AESGCM:
    # A fresh key per blob (salted by the random base nonce) keeps GCM's nonce-uniqueness and
    # per-key data limits per blob, however many blobs one long-lived key seals.
    derived = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=base_nonce, info=_HKDF_INFO)
    return AESGCM(derived.derive(bytes(key)))


def _chunk_nonce(base_nonce: bytes, index: int) -> bytes:
    counter = index.to_bytes(NONCE_SIZE, "big")
    return bytes(a ^ b for a, b in zip(base_nonce, counter, strict=True))


def _aad(header: bytes, label: bytes, index: int, final: bool) -> bytes:
    # The label is length-prefixed so no (label, index) pair can be re-read as another one.
    return b"".join(
        (header, struct.pack("<I", len(label)), label, struct.pack("<QB", index, int(final)))
    )


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes; fewer only at end of stream (pipes and sockets may return short)."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        part = src.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# --- sealing ---


def _seal_stream(
    key: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    label: bytes,
    chunk_size: int,
    digest: Any = None,
) -> None:
    """Seals `src` into `dst`; feeds the plaintext to `digest` (a hashlib object) if given."""
    _check_key(key)
    _check_chunk_size(chunk_size, label)
    base_nonce = os.urandom(NONCE_SIZE)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, base_nonce, chunk_size)
    aead = _subkey(key, base_nonce)
    dst.write(header)
    index = 0
    while True:
        plaintext = _read_exact(src, chunk_size)
        final = len(plaintext) < chunk_size
        if digest is not None:
            digest.update(plaintext)
        nonce = _chunk_nonce(base_nonce, index)
        dst.write(aead.encrypt(nonce, plaintext, _aad(header, label, index, final)))
        if final:
            return
        index += 1


def seal(
    key: bytes, plaintext: bytes, *, label: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> bytes:
    """Encrypts and authenticates `plaintext` for the purpose named by `label`."""
    out = io.BytesIO()
    _seal_stream(key, io.BytesIO(plaintext), out, label=label, chunk_size=chunk_size)
    return out.getvalue()


def seal_into(
    key: bytes,
    plaintext: bytes,
    dst: BinaryIO,
    *,
    label: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """Seals `plaintext` straight into `dst`, so a large model is never held twice."""
    # BytesIO over bytes shares the buffer instead of copying it.
    _seal_stream(key, io.BytesIO(plaintext), dst, label=label, chunk_size=chunk_size)


def seal_reader(
    key: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    label: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """Seals what `src` reads (say, a model's sealed memfd) into `dst`, chunk by chunk."""
    _seal_stream(key, src, dst, label=label, chunk_size=chunk_size)


def seal_file(
    key: bytes,
    src: Path,
    dst: BinaryIO,
    *,
    label: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """Seals the file at `src` into `dst` one chunk at a time."""
    with open(src, "rb") as handle:
        _seal_stream(key, handle, dst, label=label, chunk_size=chunk_size)


# --- unsealing ---


def _read_header(src: BinaryIO, label: bytes) -> tuple[bytes, bytes, int]:
    header = _read_exact(src, HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise SealError(
            f"sealed data for label {_describe(label)!r} is {len(header)} bytes, shorter than "
            f"the {HEADER_SIZE}-byte header"
        )
    magic, version, base_nonce, chunk_size = _HEADER.unpack(header)
    if magic != MAGIC:
        # Not the found bytes: they may be the start of a plaintext model or any host file.
        raise SealError(
            f"data for label {_describe(label)!r} is not in the Blindfold sealed format (it "
            f"does not start with {MAGIC!r}); encrypt model files with blindfold encrypt-model"
        )
    if version != FORMAT_VERSION:
        raise SealError(
            f"data for label {_describe(label)!r} is in sealed format version {version}; this "
            f"server reads version {FORMAT_VERSION}"
        )
    _check_chunk_size(chunk_size, label)
    return header, base_nonce, chunk_size


def unseal_into(
    key: bytes, src: BinaryIO, sink: Callable[[bytes], object], *, label: bytes, max_bytes: int
) -> int:
    """Decrypts a sealed stream chunk by chunk into `sink` (say, a model's memfd), so the
    plaintext is held once; returns its length. Fails as soon as the plaintext would exceed
    `max_bytes`. Each chunk reaches `sink` only once it authenticated, but a later chunk can
    still fail: on SealError the caller must discard what `sink` received.

    Raises SealError on any authentication failure, truncation or appended data.
    """
    _check_key(key)
    where = f"label {_describe(label)!r}"
    header, base_nonce, chunk_size = _read_header(src, label)
    aead = _subkey(key, base_nonce)
    record_size = chunk_size + TAG_SIZE
    total = 0
    index = 0
    while True:
        record = _read_exact(src, record_size)
        if len(record) < TAG_SIZE:
            raise SealError(
                f"sealed data for {where} is truncated: chunk {index} is missing or cut short"
            )
        final = len(record) < record_size
        total += len(record) - TAG_SIZE
        if total > max_bytes:
            raise SealError(
                f"sealed data for {where} holds more than the limit of {max_bytes} bytes"
            )
        nonce = _chunk_nonce(base_nonce, index)
        try:
            plaintext = aead.decrypt(nonce, record, _aad(header, label, index, final))
        except InvalidTag:
            raise SealError(
                f"sealed data for {where} does not authenticate at chunk {index}: wrong key, "
                "wrong label, or the data was modified, reordered or truncated"
            ) from None
        sink(plaintext)
        if final:
            # A short record is only read at end of stream, so nothing can follow it: bytes
            # appended to a blob become part of its final record and fail authentication.
            return total
        index += 1


def unseal_to_bytes(key: bytes, src: BinaryIO, *, label: bytes, max_bytes: int) -> bytes:
    """Decrypts a sealed stream into bytes; memory stays bounded by `max_bytes` plus one
    chunk (and the join, once the whole stream authenticated).

    Raises SealError on any authentication failure, truncation or appended data.
    """
    parts: list[bytes] = []
    unseal_into(key, src, parts.append, label=label, max_bytes=max_bytes)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def unseal(key: bytes, blob: bytes, *, label: bytes) -> bytes:
    """Inverse of `seal`."""
    # Plaintext is never longer than its sealed form, so the blob length is a safe limit.
    return unseal_to_bytes(key, io.BytesIO(blob), label=label, max_bytes=len(blob))


# --- encrypted model files ---


@dataclass(frozen=True)
class ModelKey:
    """The key of one encrypted model file and the SHA-256 (hex) of the plaintext model."""

    key: bytes = field(repr=False)  # repr=False: a logged ModelKey must not leak the key
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_SIZE:
            raise ConfigurationError(f"model key must be {KEY_SIZE} bytes")
        if not _is_sha256_hex(self.sha256):
            raise ConfigurationError(
                f"model key sha256 must be 64 lowercase hex digits, found {self.sha256!r}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MODEL_KEY_FORMAT,
            "version": MODEL_KEY_VERSION,
            "key": base64.b64encode(self.key).decode(),
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, data: Any) -> ModelKey:
        expected = {"format", "version", "key", "sha256"}
        if not isinstance(data, dict) or set(data) != expected:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ConfigurationError(
                f"model key file must be a JSON object with keys {sorted(expected)}, found {found}"
            )
        if data["format"] != MODEL_KEY_FORMAT or data["version"] != MODEL_KEY_VERSION:
            raise ConfigurationError(
                f"model key file format: expected {MODEL_KEY_FORMAT!r} version "
                f"{MODEL_KEY_VERSION}, found {data['format']!r} version {data['version']!r}"
            )
        try:
            key = base64.b64decode(data["key"], validate=True)
        except (TypeError, ValueError, binascii.Error):
            raise ConfigurationError("model key file: 'key' is not valid base64") from None
        return cls(key=key, sha256=data["sha256"])

    def save(self, path: Path) -> None:
        """Writes the key file with mode 0o600, atomically (a crash leaves no half key file)."""
        path = Path(path)
        payload = json.dumps(self.to_json(), indent=2).encode() + b"\n"
        # mkstemp creates the file 0o600 from the start, so the key is never world-readable,
        # even for an instant, and an existing file's wider mode is not inherited.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> ModelKey:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read model key file {path}: {exc}") from None
        return cls.from_json(data)


def _is_sha256_hex(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def encrypt_model_file(src: Path, dst: Path) -> ModelKey:
    """Seals the model at `src` into `dst` under a fresh random key and returns that key."""
    key = AESGCM.generate_key(bit_length=256)
    digest = hashlib.sha256()
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as handle:
            _seal_stream(
                key,
                handle,
                out,
                label=MODEL_FILE_LABEL,
                chunk_size=DEFAULT_CHUNK_SIZE,
                digest=digest,
            )
        # The ciphertext is not secret; mkstemp's 0o600 would only stop the server's user.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ModelKey(key=key, sha256=digest.hexdigest())


class HashingSink(Protocol):
    """Where a decrypted model goes: it takes the plaintext chunk by chunk and hashes it as
    it goes (the server's `ModelBytesWriter`, a memfd), so nothing hashes it twice."""

    def write(self, chunk: bytes) -> object: ...

    def hexdigest(self) -> str: ...


class _BytesSink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self._hash.update(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def decrypt_model_file(path: Path, key: ModelKey, *, max_bytes: int) -> bytes:
    """Decrypts an encrypted model file and checks it is the model the key file names."""
    sink = _BytesSink()
    decrypt_model_file_into(path, key, sink, max_bytes=max_bytes)
    return sink.parts[0] if len(sink.parts) == 1 else b"".join(sink.parts)


def decrypt_model_file_into(
    path: Path, key: ModelKey, sink: HashingSink, *, max_bytes: int
) -> None:
    """Decrypts an encrypted model file into `sink` and checks it is the model the key file
    names. On SealError `sink` holds part or all of a refused model: discard it."""
    with open(path, "rb") as handle:
        unseal_into(key.key, handle, sink.write, label=MODEL_FILE_LABEL, max_bytes=max_bytes)
    found = sink.hexdigest()
    if not hmac.compare_digest(found, key.sha256):
        raise SealError(
            f"decrypted model {Path(path).name} has SHA-256 {found}, but the key file expects "
            f"{key.sha256}; the key file belongs to another model"
        )
