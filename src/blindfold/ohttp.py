"""Oblivious HTTP (RFC 9458) with Binary HTTP (RFC 9292) inside: the framing shared by the
SDK (which encapsulates requests) and the server's gateway (which decapsulates them inside
the TEE). HPKE itself (RFC 9180) is `blindfold.hpke`.

No maintained Python package does BHTTP or OHTTP framing, so it is written here and tested
against the RFCs' own vectors (tests/test_ohttp_framing.py). Only what Blindfold uses is
supported: one suite (X25519, HKDF-SHA256, AES-128-GCM), known-length BHTTP messages, and
decoding of the indeterminate-length form and informational responses for completeness.
Every decoding error is an `OhttpError` naming what was wrong; lengths are checked against
what is present before anything is sliced or allocated.
"""

from __future__ import annotations

import datetime
import email.utils
import hmac
import os
import re
import struct
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blindfold import hpke
from blindfold.errors import BlindfoldError

Buffer = bytes | bytearray | memoryview

REQUEST_MEDIA_TYPE = "message/ohttp-req"
RESPONSE_MEDIA_TYPE = "message/ohttp-res"
# RFC 9458 section 8.4's problem type for "the key configuration you used is not (or no
# longer) accepted": the client fetches the configuration again.
KEY_PROBLEM_TYPE = "https://iana.org/assignments/http-problem-types#ohttp-key"

KEM_X25519 = hpke.KEM_ID
KDF_HKDF_SHA256 = hpke.KDF_ID
AEAD_AES_128_GCM = hpke.AEAD_ID
ENC_LENGTH = hpke.N_ENC  # Nenc of DHKEM(X25519)
KEY_LENGTH = hpke.N_K  # Nk of AES-128-GCM
NONCE_LENGTH = hpke.N_N  # Nn of AES-128-GCM
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
        return _ONE_BYTE[value]
    if value < 0x4000:
        return struct.pack(">H", value | 0x4000)
    if value < 0x40000000:
        return struct.pack(">I", value | 0x80000000)
    if value < 0x4000000000000000:
        return struct.pack(">Q", value | 0xC000000000000000)
    raise OhttpError(f"{value} does not fit a variable-length integer")


_ONE_BYTE = [bytes([value]) for value in range(0x40)]
# The value bits of a 2-, 4- and 8-byte varint (the first two bits give its size).
_VARINT_MASK = {2: 0x3FFF, 4: 0x3FFFFFFF, 8: 0x3FFFFFFFFFFFFFFF}


class _Reader:
    """A cursor over a message (up to `end`) that refuses to read past its end. Written for
    speed, since every request and response passes through it: slices of `bytes` are
    returned as they are, and one-byte varints take a fast path."""

    __slots__ = ("at", "data", "end", "what")

    def __init__(self, data: Buffer, what: str) -> None:
        self.data: bytes | memoryview = data if isinstance(data, bytes) else memoryview(data)
        self.at = 0
        self.end = len(self.data)
        self.what = what

    def remaining(self) -> int:
        return self.end - self.at

    def take(self, size: int, part: str) -> bytes | memoryview:
        at = self.at
        stop = at + size
        if stop > self.end:
            raise OhttpError(
                f"the {self.what} is truncated: its {part} needs {size} bytes, "
                f"{self.end - at} remain"
            )
        self.at = stop
        return self.data[at:stop]

    def varint(self, part: str) -> int:
        at = self.at
        if at >= self.end:
            raise OhttpError(f"the {self.what} is truncated before its {part}")
        first = self.data[at]
        if first < 0x40:
            self.at = at + 1
            return first
        size = 1 << (first >> 6)
        return int.from_bytes(self.take(size, part), "big") & _VARINT_MASK[size]

    def prefixed(self, part: str, length_part: str) -> bytes:
        return bytes(self.take(self.varint(length_part), part))


# --- Binary HTTP (RFC 9292), known-length form ---

Fields = list[tuple[str, str]]

# RFC 9292 section 3.6 / RFC 9110: a field name is a token (visible ASCII, here lowercase),
# a value holds no NUL, CR or LF; a method and a path are visible ASCII. Checked with one
# compiled pattern each rather than byte by byte in Python.
_FIELD_NAME = re.compile(rb"[\x21-\x40\x5b-\x7e]+")
_BAD_VALUE = re.compile(rb"[\x00\n\r]")
_VISIBLE = re.compile(rb"[\x21-\x7e]+")


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
    if not fields:
        return b"\x00"
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


class _Part:
    """The names a field section's errors use, built once rather than per field."""

    __slots__ = ("length", "name", "name_length", "part", "value", "value_length")

    def __init__(self, part: str) -> None:
        self.part = part
        self.length = f"{part} length"
        self.name = f"{part} field name"
        self.name_length = f"{part} field name length"
        self.value = f"{part} field value"
        self.value_length = f"{part} field value length"


_HEADERS = _Part("header section")
_TRAILERS = _Part("trailer section")
_INFORMATIONAL = _Part("informational headers")


def _read_fields(reader: _Reader, known_length: bool, part: _Part) -> Fields:
    """A field section; truncation right before it (RFC 9292 section 3.8) means empty."""
    if reader.at == reader.end:
        return []
    fields: Fields = []
    if known_length:
        size = reader.varint(part.length)
        if size > reader.end - reader.at:
            reader.take(size, part.part)  # raises: the section is truncated
        # The section's fields are read within its bounds, as a reader of its own would.
        outer_end, reader.end = reader.end, reader.at + size
        while reader.at < reader.end:
            fields.append(_read_field(reader, part))
        reader.end = outer_end
        return fields
    while True:
        if reader.at == reader.end:
            raise OhttpError(f"the {reader.what} is truncated inside its {part.part}")
        if reader.data[reader.at] == 0:  # the content terminator: a zero-length name
            reader.at += 1
            return fields
        fields.append(_read_field(reader, part))


def _read_field(reader: _Reader, part: _Part) -> tuple[str, str]:
    name = reader.prefixed(part.name, part.name_length)
    value = reader.prefixed(part.value, part.value_length)
    if _FIELD_NAME.fullmatch(name) is None:  # empty, uppercase, or not visible ASCII
        raise OhttpError(f"the {reader.what} has an invalid field name in its {part.part}")
    if _BAD_VALUE.search(value) is not None:
        raise OhttpError(f"the {reader.what} has an invalid field value in its {part.part}")
    return name.decode("ascii"), value.decode("latin-1")


def _read_content(reader: _Reader, known_length: bool) -> bytes:
    if reader.at == reader.end:
        return b""
    if known_length:
        return reader.prefixed("content", "content length")
    chunks: list[bytes] = []
    while True:
        size = reader.varint("content chunk length")
        if size == 0:
            return b"".join(chunks)
        chunks.append(bytes(reader.take(size, "content chunk")))


def _check_padding(reader: _Reader) -> None:
    data, at, end = reader.data, reader.at, reader.end
    if isinstance(data, memoryview):
        data, at, end = bytes(data[at:end]), 0, end - at
    if data.count(0, at, end) != end - at:  # counted in C: padding can be large
        raise OhttpError(f"the {reader.what} has padding that is not zero bytes")


def _framing(reader: _Reader, known: int, indeterminate: int, what: str) -> bool:
    framing = reader.varint("framing indicator")
    if framing not in (known, indeterminate):
        raise OhttpError(f"not a binary HTTP {what} (framing indicator {framing})")
    return framing == known


def decode_request(data: Buffer) -> BinaryRequest:
    reader = _Reader(data, "binary HTTP request")
    known = _framing(reader, 0, 2, "request")
    method = reader.prefixed("method", "method length")
    scheme = reader.prefixed("scheme", "scheme length")
    authority = reader.prefixed("authority", "authority length")
    path = reader.prefixed("path", "path length")
    if _VISIBLE.fullmatch(method) is None:
        raise OhttpError("the binary HTTP request has an invalid method")
    if _VISIBLE.fullmatch(path) is None:
        raise OhttpError("the binary HTTP request has an empty or invalid path")
    headers = _read_fields(reader, known, _HEADERS)
    body = _read_content(reader, known)
    trailers = _read_fields(reader, known, _TRAILERS)
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
        informational.append((status, _read_fields(reader, known, _INFORMATIONAL)))
    headers = _read_fields(reader, known, _HEADERS)
    body = _read_content(reader, known)
    trailers = _read_fields(reader, known, _TRAILERS)
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
    config: KeyConfig, request: bytes, *, ephemeral: hpke.KeyPair | None = None
) -> tuple[bytes, ClientContext]:
    """Encrypts a BHTTP request to `config`; `ephemeral` is for the RFC's test vector only."""
    if not config.supports_our_suite():
        raise OhttpError("the OHTTP key configuration does not offer HKDF-SHA256 + AES-128-GCM")
    header = _request_header(config.key_id)
    try:
        enc, sender = hpke.setup_sender(
            config.public_key, REQUEST_LABEL + b"\x00" + header, ephemeral=ephemeral
        )
    except hpke.HpkeError as exc:
        raise OhttpError(f"the OHTTP key configuration's key cannot be used: {exc}") from None
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


def decapsulate_request(private_key: hpke.KeyPair, message: Buffer) -> tuple[bytes, ServerContext]:
    """Opens an encapsulated request with the key pair of the key id it names."""
    view = memoryview(message)
    key_id = request_key_id(view)
    header = _request_header(key_id)
    enc = bytes(view[REQUEST_HEADER_LENGTH : REQUEST_HEADER_LENGTH + ENC_LENGTH])
    try:
        recipient = hpke.setup_recipient(enc, private_key, REQUEST_LABEL + b"\x00" + header)
        plaintext = recipient.open(view[REQUEST_HEADER_LENGTH + ENC_LENGTH :])
    except hpke.HpkeError as exc:
        raise OhttpError(
            "the Oblivious HTTP request does not decrypt: it was altered on the way, or "
            f"encrypted to another key ({exc})"
        ) from None
    secret = recipient.export(RESPONSE_LABEL, RESPONSE_NONCE_LENGTH)
    return plaintext, ServerContext(enc, secret)


def _response_aead(secret: bytes, enc: bytes, response_nonce: bytes) -> tuple[AESGCM, bytes]:
    # RFC 9458 section 4.4: HKDF-SHA256 with salt enc || response_nonce; each output is at
    # most one hash long, so each Expand is one HMAC (stdlib's, OpenSSL's code).
    prk = hmac.digest(enc + response_nonce, secret, "sha256")
    key = hmac.digest(prk, b"key\x01", "sha256")[:KEY_LENGTH]
    nonce = hmac.digest(prk, b"nonce\x01", "sha256")[:NONCE_LENGTH]
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
        return aead.decrypt(nonce, view[RESPONSE_NONCE_LENGTH:], None)
    except Exception:
        raise OhttpError(
            "the Oblivious HTTP response does not decrypt: it was altered on the way, or "
            "did not come from the attested server"
        ) from None


# --- HTTP dates (RFC 9110 section 5.6.7), which requests carry for the replay check ---

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_IMF_FIXDATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d\d) ([A-Z][a-z]{2}) (\d{4}) (\d\d):(\d\d):(\d\d) GMT"
)
# The last date formatted: the text changes once a second, and every request and response
# carries one. Replacing the one tuple is atomic, so threads may share it.
_last_date: list[tuple[int, str]] = [(-1, "")]


def format_http_date(timestamp: float | None = None) -> str:
    """The IMF-fixdate form of `timestamp` (now by default)."""
    second = int(time.time() if timestamp is None else timestamp)
    cached_second, text = _last_date[0]
    if second != cached_second:
        text = email.utils.formatdate(second, usegmt=True)
        _last_date[0] = (second, text)
    return text


def parse_http_date(text: str) -> float | None:
    """The POSIX time an HTTP date names, or None when it is not a date with a time zone.
    The IMF-fixdate form that HTTP/1.1 senders use takes a fast path; other forms (RFC 850,
    asctime, numeric zones) go through `email.utils`."""
    match = _IMF_FIXDATE.fullmatch(text)
    if match is not None and match.group(2) in _MONTHS:
        day, month, year, hour, minute, second = match.groups()
        try:
            moment = datetime.datetime(
                int(year),
                _MONTHS[month],
                int(day),
                int(hour),
                int(minute),
                int(second),
                tzinfo=datetime.UTC,
            )
        except ValueError:  # no such day or time
            return None
        return moment.timestamp()
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (ValueError, TypeError, IndexError):
        return None
    return None if parsed.tzinfo is None else parsed.timestamp()


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
