"""Oblivious HTTP (RFC 9458) with Binary HTTP (RFC 9292) inside: the framing shared by the
SDK (which encapsulates requests) and the server's gateway (which decapsulates them inside
the TEE). HPKE itself (RFC 9180) is pyhpke's; the pinned `cryptography` offers only
single-shot HPKE, without the exporter secret that OHTTP keys its responses from.

No maintained Python package does BHTTP or OHTTP framing, so it is written here and tested
against the RFCs' own vectors (tests/test_ohttp_framing.py). Only what Blindfold uses is
supported: one suite (X25519, HKDF-SHA256, AES-128-GCM), known-length BHTTP messages, and
decoding of the indeterminate-length form and informational responses for completeness.
Every decoding error is an `OhttpError` naming what was wrong; lengths are checked against
what is present before anything is sliced or allocated.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKeyInterface, KEMKeyPair, OpenError

from blindfold.errors import BlindfoldError

Buffer = bytes | bytearray | memoryview

REQUEST_MEDIA_TYPE = "message/ohttp-req"
RESPONSE_MEDIA_TYPE = "message/ohttp-res"
# RFC 9458 section 8.4's problem type for "the key configuration you used is not (or no
# longer) accepted": the client fetches the configuration again.
KEY_PROBLEM_TYPE = "https://iana.org/assignments/http-problem-types#ohttp-key"

KEM_X25519 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM)
ENC_LENGTH = 32  # Nenc of DHKEM(X25519)
KEY_LENGTH = 16  # Nk of AES-128-GCM
NONCE_LENGTH = 12  # Nn of AES-128-GCM
TAG_LENGTH = 16
RESPONSE_NONCE_LENGTH = max(KEY_LENGTH, NONCE_LENGTH)
REQUEST_HEADER_LENGTH = 7  # key id (1), KEM (2), KDF (2), AEAD (2)
REQUEST_LABEL = b"message/bhttp request"
RESPONSE_LABEL = b"message/bhttp response"


class OhttpError(BlindfoldError, ValueError):
    """A message that is not valid OHTTP or BHTTP, or does not decrypt."""


class UnknownKeyError(OhttpError):
    """The request names a key id the gateway does not hold (rotated away, or never ours)."""


# --- RFC 9000 variable-length integers ---


def encode_varint(value: int) -> bytes:
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return struct.pack(">H", value | 0x4000)
    if value < 0x40000000:
        return struct.pack(">I", value | 0x80000000)
    if value < 0x4000000000000000:
        return struct.pack(">Q", value | 0xC000000000000000)
    raise OhttpError(f"{value} does not fit a variable-length integer")


class _Reader:
    """A cursor over a message that refuses to read past its end."""

    def __init__(self, data: Buffer, what: str) -> None:
        self.data = memoryview(data)
        self.at = 0
        self.what = what

    def remaining(self) -> int:
        return len(self.data) - self.at

    def take(self, size: int, part: str) -> memoryview:
        if size > self.remaining():
            raise OhttpError(
                f"the {self.what} is truncated: its {part} needs {size} bytes, "
                f"{self.remaining()} remain"
            )
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def varint(self, part: str) -> int:
        if self.remaining() < 1:
            raise OhttpError(f"the {self.what} is truncated before its {part}")
        first = self.data[self.at]
        size = 1 << (first >> 6)
        raw = bytes(self.take(size, part))
        value = raw[0] & 0x3F
        for byte in raw[1:]:
            value = (value << 8) | byte
        return value

    def prefixed(self, part: str) -> bytes:
        return bytes(self.take(self.varint(f"{part} length"), part))


# --- Binary HTTP (RFC 9292), known-length form ---

Fields = list[tuple[str, str]]


@dataclass
class BinaryRequest:
    method: str
    path: str
    headers: Fields = field(default_factory=list)
    body: bytes = b""
    scheme: str = "https"
    authority: str = ""
    trailers: Fields = field(default_factory=list)


@dataclass
class BinaryResponse:
    status: int
    headers: Fields = field(default_factory=list)
    body: bytes = b""
    trailers: Fields = field(default_factory=list)
    informational: list[tuple[int, Fields]] = field(default_factory=list)


def _field_section(fields: Fields) -> bytes:
    section = b"".join(
        _prefixed(name.encode("latin-1")) + _prefixed(value.encode("latin-1"))
        for name, value in fields
    )
    return encode_varint(len(section)) + section


def _prefixed(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


def _joined(parts: list[bytes], buckets: tuple[int, ...] | None) -> bytes:
    """The message, followed (RFC 9292 section 3.8) by zero bytes up to the smallest of
    `buckets` that holds it (`padded_length`); one copy of the content."""
    if buckets is not None:
        length = sum(len(part) for part in parts)
        parts.append(bytes(padded_length(length, buckets) - length))
    return b"".join(parts)


def encode_request(request: BinaryRequest, buckets: tuple[int, ...] | None = None) -> bytes:
    """The known-length encoding, padded to a size bucket when `buckets` is given."""
    parts = [
        b"\x00",  # known-length request
        _prefixed(request.method.encode("ascii")),
        _prefixed(request.scheme.encode("ascii")),
        _prefixed(request.authority.encode("ascii")),
        _prefixed(request.path.encode("ascii")),
        _field_section(request.headers),
        encode_varint(len(request.body)),
        request.body,
        _field_section(request.trailers),
    ]
    return _joined(parts, buckets)


def encode_response(response: BinaryResponse, buckets: tuple[int, ...] | None = None) -> bytes:
    parts = [
        b"\x01",  # known-length response
        encode_varint(response.status),
        _field_section(response.headers),
        encode_varint(len(response.body)),
        response.body,
        _field_section(response.trailers),
    ]
    return _joined(parts, buckets)


def _read_fields(reader: _Reader, known_length: bool, part: str) -> Fields:
    """A field section; truncation right before it (RFC 9292 section 3.8) means empty."""
    if reader.remaining() == 0:
        return []
    fields: Fields = []
    if known_length:
        section = _Reader(reader.take(reader.varint(f"{part} length"), part), reader.what)
        while section.remaining():
            fields.append(_read_field(section, part))
        return fields
    while True:
        if reader.remaining() == 0:
            raise OhttpError(f"the {reader.what} is truncated inside its {part}")
        if reader.data[reader.at] == 0:  # the content terminator: a zero-length name
            reader.at += 1
            return fields
        fields.append(_read_field(reader, part))


def _read_field(reader: _Reader, part: str) -> tuple[str, str]:
    name = reader.prefixed(f"{part} field name")
    value = reader.prefixed(f"{part} field value")
    if not name or name.lower() != name or any(b <= 0x20 or b >= 0x7F for b in name):
        raise OhttpError(f"the {reader.what} has an invalid field name in its {part}")
    if any(b in (0x00, 0x0A, 0x0D) for b in value):
        raise OhttpError(f"the {reader.what} has an invalid field value in its {part}")
    return name.decode("ascii"), value.decode("latin-1")


def _read_content(reader: _Reader, known_length: bool) -> bytes:
    if reader.remaining() == 0:
        return b""
    if known_length:
        return reader.prefixed("content")
    chunks: list[bytes] = []
    while True:
        size = reader.varint("content chunk length")
        if size == 0:
            return b"".join(chunks)
        chunks.append(bytes(reader.take(size, "content chunk")))


def _check_padding(reader: _Reader) -> None:
    rest = reader.data[reader.at :]
    if rest and bytes(rest).count(0) != len(rest):  # counted in C: padding can be large
        raise OhttpError(f"the {reader.what} has padding that is not zero bytes")


def _framing(reader: _Reader, known: int, indeterminate: int, what: str) -> bool:
    framing = reader.varint("framing indicator")
    if framing not in (known, indeterminate):
        raise OhttpError(f"not a binary HTTP {what} (framing indicator {framing})")
    return framing == known


def decode_request(data: Buffer) -> BinaryRequest:
    reader = _Reader(data, "binary HTTP request")
    known = _framing(reader, 0, 2, "request")
    control = []
    for part in ("method", "scheme", "authority", "path"):
        control.append(reader.prefixed(part))
    method, scheme, authority, path = control
    if not method or any(b <= 0x20 or b >= 0x7F for b in method):
        raise OhttpError("the binary HTTP request has an invalid method")
    if not path or any(b <= 0x20 or b >= 0x7F for b in path):
        raise OhttpError("the binary HTTP request has an empty or invalid path")
    headers = _read_fields(reader, known, "header section")
    body = _read_content(reader, known)
    trailers = _read_fields(reader, known, "trailer section")
    _check_padding(reader)
    return BinaryRequest(
        method=method.decode("ascii"),
        scheme=scheme.decode("ascii", "replace"),
        authority=authority.decode("ascii", "replace"),
        path=path.decode("ascii"),
        headers=headers,
        body=body,
        trailers=trailers,
    )


def decode_response(data: Buffer) -> BinaryResponse:
    reader = _Reader(data, "binary HTTP response")
    known = _framing(reader, 1, 3, "response")
    informational: list[tuple[int, Fields]] = []
    while True:
        status = reader.varint("status code")
        if not 100 <= status <= 599:
            raise OhttpError(f"the binary HTTP response has status code {status}")
        if status >= 200:
            break
        informational.append((status, _read_fields(reader, known, "informational headers")))
    headers = _read_fields(reader, known, "header section")
    body = _read_content(reader, known)
    trailers = _read_fields(reader, known, "trailer section")
    _check_padding(reader)
    return BinaryResponse(status, headers, body, trailers, informational)


# --- key configurations (RFC 9458 section 3) ---


@dataclass(frozen=True)
class KeyConfig:
    key_id: int
    public_key: bytes  # the raw X25519 public key
    kem_id: int = KEM_X25519
    # (KDF, AEAD) pairs the gateway accepts; Blindfold's is HKDF-SHA256 with AES-128-GCM.
    symmetric: tuple[tuple[int, int], ...] = ((KDF_HKDF_SHA256, AEAD_AES_128_GCM),)

    def encode(self) -> bytes:
        algorithms = b"".join(struct.pack(">HH", kdf, aead) for kdf, aead in self.symmetric)
        return (
            struct.pack(">BH", self.key_id, self.kem_id)
            + self.public_key
            + struct.pack(">H", len(algorithms))
            + algorithms
        )

    @classmethod
    def decode(cls, data: bytes) -> KeyConfig:
        reader = _Reader(data, "OHTTP key configuration")
        key_id, kem_id = struct.unpack(">BH", reader.take(3, "key id and KEM"))
        if kem_id != KEM_X25519:
            raise OhttpError(f"the OHTTP key configuration uses KEM {kem_id:#06x}, not X25519")
        public_key = bytes(reader.take(ENC_LENGTH, "public key"))
        (length,) = struct.unpack(">H", reader.take(2, "algorithm list length"))
        if length == 0 or length % 4:
            raise OhttpError("the OHTTP key configuration's algorithm list is not whole pairs")
        algorithms = reader.take(length, "algorithm list")
        if reader.remaining():
            raise OhttpError("the OHTTP key configuration has bytes after its algorithm list")
        symmetric = tuple(struct.unpack(">HH", algorithms[i : i + 4]) for i in range(0, length, 4))
        return cls(key_id, public_key, kem_id, symmetric)

    def supports_our_suite(self) -> bool:
        return (KDF_HKDF_SHA256, AEAD_AES_128_GCM) in self.symmetric


def _request_header(key_id: int) -> bytes:
    return struct.pack(">BHHH", key_id, KEM_X25519, KDF_HKDF_SHA256, AEAD_AES_128_GCM)


# --- encapsulation (RFC 9458 sections 4.3 and 4.4) ---


@dataclass
class ClientContext:
    """What the client keeps to open the response to one request."""

    enc: bytes
    secret: bytes


@dataclass
class ServerContext:
    """What the gateway keeps to encrypt its response to one request."""

    enc: bytes
    secret: bytes


def encapsulate_request(
    config: KeyConfig, request: bytes, *, ephemeral: KEMKeyPair | None = None
) -> tuple[bytes, ClientContext]:
    """Encrypts a BHTTP request to `config`; `ephemeral` is for the RFC's test vector only."""
    if not config.supports_our_suite():
        raise OhttpError("the OHTTP key configuration does not offer HKDF-SHA256 + AES-128-GCM")
    header = _request_header(config.key_id)
    public_key = SUITE.kem.deserialize_public_key(config.public_key)
    enc, sender = SUITE.create_sender_context(
        public_key, info=REQUEST_LABEL + b"\x00" + header, eks=ephemeral
    )
    sealed = sender.seal(request)
    secret = sender.export(RESPONSE_LABEL, RESPONSE_NONCE_LENGTH)
    return header + enc + sealed, ClientContext(enc, secret)


def request_key_id(message: Buffer) -> int:
    """The key id an encapsulated request names, after checking its suite."""
    if len(message) < REQUEST_HEADER_LENGTH + ENC_LENGTH + TAG_LENGTH:
        raise OhttpError(
            f"the Oblivious HTTP request is {len(message)} bytes, shorter than the "
            f"{REQUEST_HEADER_LENGTH + ENC_LENGTH + TAG_LENGTH} bytes of header, "
            "encapsulated key and tag (send message/ohttp-req, RFC 9458)"
        )
    key_id, kem, kdf, aead = struct.unpack(">BHHH", message[:REQUEST_HEADER_LENGTH])
    if (kem, kdf, aead) != (KEM_X25519, KDF_HKDF_SHA256, AEAD_AES_128_GCM):
        raise UnknownKeyError(
            f"the Oblivious HTTP request uses suite KEM {kem:#06x} KDF {kdf:#06x} AEAD "
            f"{aead:#06x}; this gateway accepts X25519, HKDF-SHA256, AES-128-GCM only"
        )
    return int(key_id)


def decapsulate_request(
    private_key: KEMKeyInterface, message: Buffer
) -> tuple[bytes, ServerContext]:
    """Opens an encapsulated request with the private key of the key id it names."""
    view = memoryview(message)
    key_id = request_key_id(view)
    header = _request_header(key_id)
    enc = bytes(view[REQUEST_HEADER_LENGTH : REQUEST_HEADER_LENGTH + ENC_LENGTH])
    try:
        recipient = SUITE.create_recipient_context(
            enc, private_key, info=REQUEST_LABEL + b"\x00" + header
        )
        plaintext = recipient.open(bytes(view[REQUEST_HEADER_LENGTH + ENC_LENGTH :]))
    except (OpenError, ValueError) as exc:
        raise OhttpError(
            "the Oblivious HTTP request does not decrypt: it was altered on the way, or "
            f"encrypted to another key ({type(exc).__name__})"
        ) from None
    secret = recipient.export(RESPONSE_LABEL, RESPONSE_NONCE_LENGTH)
    return plaintext, ServerContext(enc, secret)


def _response_aead(secret: bytes, enc: bytes, response_nonce: bytes) -> tuple[AESGCM, bytes]:
    salt = enc + response_nonce
    extract = hmac.HMAC(salt, hashes.SHA256())
    extract.update(secret)
    prk = extract.finalize()
    key = HKDFExpand(hashes.SHA256(), KEY_LENGTH, b"key").derive(prk)
    nonce = HKDFExpand(hashes.SHA256(), NONCE_LENGTH, b"nonce").derive(prk)
    return AESGCM(key), nonce


def encapsulate_response(
    context: ServerContext, response: bytes, *, response_nonce: bytes | None = None
) -> bytes:
    """Encrypts a BHTTP response to the request's context (`response_nonce`: test vectors)."""
    nonce_bytes = (
        response_nonce if response_nonce is not None else os.urandom(RESPONSE_NONCE_LENGTH)
    )
    aead, nonce = _response_aead(context.secret, context.enc, nonce_bytes)
    return nonce_bytes + aead.encrypt(nonce, response, None)


def decapsulate_response(context: ClientContext, message: Buffer) -> bytes:
    view = memoryview(message)
    if len(view) < RESPONSE_NONCE_LENGTH + TAG_LENGTH:
        raise OhttpError(
            f"the Oblivious HTTP response is {len(view)} bytes, too short to be one; "
            "something on the path answered instead of the attested server"
        )
    nonce_bytes = bytes(view[:RESPONSE_NONCE_LENGTH])
    aead, nonce = _response_aead(context.secret, context.enc, nonce_bytes)
    try:
        return aead.decrypt(nonce, bytes(view[RESPONSE_NONCE_LENGTH:]), None)
    except Exception:
        raise OhttpError(
            "the Oblivious HTTP response does not decrypt: it was altered on the way, or "
            "did not come from the attested server"
        ) from None


# --- padding to size buckets ---

# Powers of two from 1 KiB to 1 MiB, then whole MiB: at most twice the size (a
# 1 MiB-multiple beyond), and an observer learns only which bucket.
DEFAULT_BUCKETS = tuple(1 << shift for shift in range(10, 21))


def padded_length(length: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket that holds `length`; beyond the largest, the next multiple of it.
    An observer then learns the bucket, not the length."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    if not buckets:
        return length
    largest = buckets[-1]
    return -(-length // largest) * largest
