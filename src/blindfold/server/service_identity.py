"""The service identity: every secret that makes "this Blindfold service" one thing, whichever
replica holds it (issue 11, section 2).

- the TLS private key and its certificate (what clients pin; the evidence of each replica
  binds its public key);
- the receipt-signing key: receipts are signed with the TLS key (`receipts.py`), so it is the
  same key and travels with it;
- a 256-bit root secret, from which the store key (`store_key()`) and the key replicas use
  to authenticate to each other (`replication_key()`) are derived;
- the HPKE keys of the Oblivious HTTP gateway: derived from the root secret, one per rotation
  period (`hpke_seed()`, `server.hpke_keys`), so every replica holds the same keys and rotates
  them at the same moments without talking to the others.

The first replica creates it inside its TEE (`ServiceIdentity.create`). A joining replica
gets it from an existing one only after both attested each other under the cluster policy
(`server.cluster`), encrypted to an X25519 key the joiner's own evidence binds
(`seal_for` / `open_sealed`): nothing outside the two TEEs can read it. It lives in process
memory only: when every replica is gone, the identity is gone.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from blindfold.errors import EvidenceError

FORMAT = "blindfold-service-identity/1"
SEALED_FORMAT = "blindfold-sealed-service-identity/1"


@dataclass(frozen=True)
class ServiceIdentity:
    tls_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    secret: bytes

    @classmethod
    def create(cls, hostnames: list[str]) -> ServiceIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, _self_signed_certificate(key, hostnames), secrets.token_bytes(32))

    @property
    def receipt_key(self) -> ec.EllipticCurvePrivateKey:
        """Receipts are signed with the attested TLS key, so clients verify them with the key
        they pinned."""
        return self.tls_key

    def store_key(self) -> bytes:
        return _derive(self.secret, b"blindfold store key")

    def hpke_seed(self) -> bytes:
        """What the gateway's HPKE keys are derived from (`server.hpke_keys.HpkeKeyring`)."""
        return _derive(self.secret, b"blindfold hpke seed")

    def replication_key(self) -> bytes:
        """What replicas present to each other (over TLS pinned to the shared certificate)."""
        return _derive(self.secret, b"blindfold replication key")

    def to_bytes(self) -> bytes:
        document = {
            "format": FORMAT,
            "tls_key": _b64(
                self.tls_key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ),
            "certificate": _b64(self.certificate.public_bytes(serialization.Encoding.DER)),
            "secret": _b64(self.secret),
        }
        return json.dumps(document).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ServiceIdentity:
        try:
            document = json.loads(data)
            if document.get("format") != FORMAT:
                raise ValueError(f"format {document.get('format')!r}")
            key = serialization.load_der_private_key(_unb64(document["tls_key"]), None)
            certificate = x509.load_der_x509_certificate(_unb64(document["certificate"]))
            secret = _unb64(document["secret"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EvidenceError(f"the released service identity is malformed ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or len(secret) != 32:
            raise EvidenceError("the released service identity holds keys of the wrong kind")
        if certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise EvidenceError("the released certificate does not match the released TLS key")
        return cls(key, certificate, secret)

    def seal_for(self, recipient: x25519.X25519PublicKey, context: bytes) -> dict[str, str]:
        """Encrypts the identity to `recipient` (ephemeral-static X25519, HKDF-SHA256,
        AES-256-GCM); `context` (what the joiner's evidence binds) is the associated data."""
        ephemeral = x25519.X25519PrivateKey.generate()
        ephemeral_public = _raw(ephemeral.public_key())
        key = _wrap_key(ephemeral.exchange(recipient), ephemeral_public, _raw(recipient), context)
        nonce = os.urandom(12)
        ciphertext = AESGCM(key).encrypt(nonce, self.to_bytes(), context)
        return {
            "format": SEALED_FORMAT,
            "ephemeral": ephemeral_public.hex(),
            "nonce": nonce.hex(),
            "ciphertext": _b64(ciphertext),
        }


def open_sealed(sealed: Any, recipient: x25519.X25519PrivateKey, context: bytes) -> ServiceIdentity:
    """The joiner's half of `seal_for`."""
    try:
        if sealed.get("format") != SEALED_FORMAT:
            raise ValueError(f"format {sealed.get('format')!r}")
        ephemeral_raw = bytes.fromhex(sealed["ephemeral"])
        ephemeral = x25519.X25519PublicKey.from_public_bytes(ephemeral_raw)
        nonce = bytes.fromhex(sealed["nonce"])
        ciphertext = _unb64(sealed["ciphertext"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EvidenceError(f"the peer's sealed service identity is malformed ({exc})") from None
    key = _wrap_key(
        recipient.exchange(ephemeral), ephemeral_raw, _raw(recipient.public_key()), context
    )
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, context)
    except InvalidTag:
        raise EvidenceError(
            "the peer's sealed service identity does not decrypt with this replica's join key"
        ) from None
    return ServiceIdentity.from_bytes(plaintext)


def join_key_binding(public: x25519.X25519PublicKey) -> bytes:
    """The first half of a joiner's report data: SHA-256 over a label and its X25519 key, so
    its evidence says which key the identity may be released to."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"blindfold-join-key/1\x00" + _raw(public))
    return digest.finalize()


def _wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"blindfold-join/1\x00" + ephemeral + recipient + context,
    ).derive(shared)


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


def _raw(key: x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(text, validate=True)


def _self_signed_certificate(
    key: ec.EllipticCurvePrivateKey, hostnames: list[str]
) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Blindfold attested server")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
