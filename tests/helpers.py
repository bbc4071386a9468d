"""What many test modules share besides the server processes (server_process.py) and the
ONNX models (onnx_models.py): a client connected to a simulation server, and throw-away
self-signed certificates."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import warnings
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import blindfold

from server_process import ServerProcess


def connect(
    server: ServerProcess | str, token: str | None = None, **options: Any
) -> blindfold.Client:
    """`blindfold.connect` to a test server (a process or its URL), opted into the
    simulation TEE unless `options` says otherwise, without the simulation warning every
    test would print."""
    url = server if isinstance(server, str) else server.url
    options.setdefault("allow_simulation", True)
    if token is not None:
        options["token"] = token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindfold.SimulationWarning)
        return blindfold.connect(url, **options)


def self_signed_certificate(
    key: ec.EllipticCurvePrivateKey, common_name: str = "mitm"
) -> x509.Certificate:
    """A day-long self-signed CA certificate for 127.0.0.1 and localhost."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def write_self_signed(directory: Path, common_name: str = "mitm") -> tuple[Path, Path]:
    """A throw-away self-signed certificate and key for 127.0.0.1/localhost (an attacker's
    proxy, or a CA other than the server's); returns (certificate path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = self_signed_certificate(key, common_name)
    suffix = secrets.token_hex(4)
    cert_path = directory / f"{common_name}-{suffix}.pem"
    key_path = directory / f"{common_name}-{suffix}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
