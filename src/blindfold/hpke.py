"""HPKE (RFC 9180) in base mode for the one suite Oblivious HTTP uses here:
DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM. It owns DeriveKeyPair (the gateway's
keys), the sender's and the recipient's setup, sealing and opening, and the exporter (which
RFC 9458 keys its responses from).

Written on `cryptography` (X25519, AES-GCM) and the standard library's OpenSSL-backed
`hmac.digest` rather than taken from a package, for its measured cost: pyhpke's pure-Python
key schedule took about 50 us of each request on each side, and `cryptography`'s own HPKE is
single-shot, without the exporter. Every LabeledExtract is one HMAC-SHA256, and so is every
LabeledExpand of at most 32 bytes (all the key schedule needs). Tested against the RFC's
Appendix A.1 vectors (tests/test_hpke.py) and RFC 9458's (tests/test_ohttp_framing.py).
"""

from __future__ import annotations

import functools
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blindfold.errors import BlindfoldError

Buffer = bytes | bytearray | memoryview

KEM_ID = 0x0020  # DHKEM(X25519, HKDF-SHA256)
KDF_ID = 0x0001  # HKDF-SHA256
AEAD_ID = 0x0001  # AES-128-GCM
N_ENC = 32  # bytes of an encapsulated key (the ephemeral public key)
N_SECRET = 32
N_K = 16
N_N = 12
N_H = 32

_KEM_SUITE = b"KEM" + KEM_ID.to_bytes(2, "big")
_SUITE = (
    b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
)
_MODE_BASE = b"\x00"


class HpkeError(BlindfoldError, ValueError):
    """An encapsulated key or ciphertext that does not open (altered, or another key's)."""


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    # HKDF-Extract is HMAC keyed with the salt; an empty salt and HashLen zero bytes are the
    # same HMAC key, as RFC 5869 intends.
    return hmac.digest(salt, b"HPKE-v1" + suite + label + ikm, "sha256")


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled = length.to_bytes(2, "big") + b"HPKE-v1" + suite + label + info
    if length <= N_H:  # one block: all the key schedule and OHTTP ever ask for
        return hmac.digest(prk, labeled + b"\x01", "sha256")[:length]
    if length > 255 * N_H:
        raise ValueError(f"HKDF-SHA256 expands to at most {255 * N_H} bytes, not {length}")
    blocks: list[bytes] = []
    block = b""
    for counter in range(1, -(-length // N_H) + 1):
        block = hmac.digest(prk, block + labeled + bytes([counter]), "sha256")
        blocks.append(block)
    return b"".join(blocks)[:length]


# Base mode has no PSK: its id hash is the same for every context.
_PSK_ID_HASH = _labeled_extract(_SUITE, b"", b"psk_id_hash", b"")


class KeyPair:
    """An X25519 key pair, with its public key's bytes kept (deriving them costs a scalar
    multiplication, and the recipient needs them for every request)."""

    __slots__ = ("private_key", "public_key")

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self.private_key = private_key
        self.public_key = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(data))

    @classmethod
    def derive(cls, ikm: bytes) -> KeyPair:
        """DeriveKeyPair (RFC 9180 section 7.1.3): the same `ikm` always gives the same key."""
        dkp_prk = _labeled_extract(_KEM_SUITE, b"", b"dkp_prk", ikm)
        return cls.from_private_bytes(_labeled_expand(_KEM_SUITE, dkp_prk, b"sk", b"", 32))

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes_raw()


def _shared_secret(dh: bytes, enc: bytes, recipient_public: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, eae_prk, b"shared_secret", enc + recipient_public, N_SECRET)


@functools.lru_cache(maxsize=256)  # OHTTP's info differs only by the one-byte key id
def key_schedule_context(info: bytes) -> bytes:
    return _MODE_BASE + _PSK_ID_HASH + _labeled_extract(_SUITE, b"", b"info_hash", info)


class Context:
    """A base-mode encryption context: seal (sender) or open (recipient) in sequence, and
    export secrets. Not for sharing between threads (the sequence number is its state)."""

    __slots__ = ("_aead", "_base_nonce", "_exporter_secret", "_sequence", "key")

    def __init__(self, shared_secret: bytes, info: bytes) -> None:
        context = key_schedule_context(info)
        secret = _labeled_extract(_SUITE, shared_secret, b"secret", b"")
        self.key = _labeled_expand(_SUITE, secret, b"key", context, N_K)
        self._base_nonce = _labeled_expand(_SUITE, secret, b"base_nonce", context, N_N)
        self._exporter_secret = _labeled_expand(_SUITE, secret, b"exp", context, N_H)
        self._aead = AESGCM(self.key)
        self._sequence = 0

    @property
    def base_nonce(self) -> bytes:
        return self._base_nonce

    @property
    def exporter_secret(self) -> bytes:
        return self._exporter_secret

    def _nonce(self) -> bytes:
        if self._sequence == 0:
            return self._base_nonce
        if self._sequence >= (1 << (8 * N_N)) - 1:
            raise HpkeError("this HPKE context has sealed all the messages it can")
        mixed = int.from_bytes(self._base_nonce, "big") ^ self._sequence
        return mixed.to_bytes(N_N, "big")

    def seal(self, plaintext: Buffer, aad: bytes = b"") -> bytes:
        sealed = self._aead.encrypt(self._nonce(), plaintext, aad)
        self._sequence += 1
        return sealed

    def open(self, ciphertext: Buffer, aad: bytes = b"") -> bytes:
        try:
            plaintext = self._aead.decrypt(self._nonce(), ciphertext, aad)
        except InvalidTag:
            raise HpkeError("the AEAD tag does not match") from None
        self._sequence += 1
        return plaintext

    def export(self, exporter_context: bytes, length: int) -> bytes:
        return _labeled_expand(_SUITE, self._exporter_secret, b"sec", exporter_context, length)


@functools.lru_cache(maxsize=16)  # a client encrypts every request to the same key or two
def _public_key(data: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(data)


def setup_sender(
    recipient_public: bytes, info: bytes, *, ephemeral: KeyPair | None = None
) -> tuple[bytes, Context]:
    """SetupBaseS: the encapsulated key and the sender's context. A fresh ephemeral key each
    call; `ephemeral` is for test vectors only."""
    pair = ephemeral if ephemeral is not None else KeyPair.generate()
    try:
        dh = pair.private_key.exchange(_public_key(recipient_public))
    except ValueError:
        raise HpkeError("the recipient's key is of small order or malformed") from None
    enc = pair.public_key
    return enc, Context(_shared_secret(dh, enc, recipient_public), info)


def setup_recipient(enc: bytes, recipient: KeyPair, info: bytes) -> Context:
    """SetupBaseR: the recipient's context for an encapsulated key."""
    try:
        # `cryptography` refuses a point of small order (an all-zero shared secret), as
        # RFC 9180 section 7.1.4 requires.
        dh = recipient.private_key.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError:
        raise HpkeError("the encapsulated key is of small order or malformed") from None
    return Context(_shared_secret(dh, enc, recipient.public_key), info)
