"""Shared fixtures: paths to the attestation vector store."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from markers import classify
from server_process import ServerProcess, free_port, start_server

__all__ = ["ServerProcess", "free_port", "start_server", "write_self_signed"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# BLINDFOLD_VECTORS_DIR points elsewhere (CI checkouts, or the test of the missing-store gate).
VECTORS_DIR = Path(
    os.environ.get("BLINDFOLD_VECTORS_DIR")
    or PROJECT_ROOT / ".." / "shared" / "attestation-vectors"
)


ALLOW_MISSING_VECTORS = "BLINDFOLD_ALLOW_MISSING_VECTORS"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks end-to-end and vector-reading tests (see markers.py), so that
    `-m "not e2e and not slow"` is the developer loop of a few seconds."""
    classify(items)


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The read-only store of real hardware evidence. Most verifier and provider tests need
    it, so its absence fails them (CI must not pass by skipping them); set
    BLINDFOLD_ALLOW_MISSING_VECTORS=1 to skip them instead on a machine without it."""
    if not (VECTORS_DIR / "manifest.json").is_file():
        message = (
            f"attestation vectors not found at {VECTORS_DIR.resolve()} (../shared/"
            "attestation-vectors beside the repository): the verifier and provider tests "
            "need them. Put the vector store there, or set "
            f"{ALLOW_MISSING_VECTORS}=1 to skip these tests"
        )
        if os.environ.get(ALLOW_MISSING_VECTORS) == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    return VECTORS_DIR


@pytest.fixture(scope="session")
def vector_manifest(vectors_dir: Path) -> list[dict[str, Any]]:
    data = json.loads((vectors_dir / "manifest.json").read_text())
    vectors: list[dict[str, Any]] = data["vectors"] if isinstance(data, dict) else data
    return vectors


# --- real server processes on loopback (the helpers live in server_process.py) ---


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared simulation server with open upload, for tests that do not restart it."""
    process = start_server(
        tmp_path_factory.mktemp("server"),
        "--open-upload",
        "--encrypted-models-dir",
        str(tmp_path_factory.getbasetemp()),
    )
    yield process
    process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Any]:
    import warnings

    import blindfold

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        connection = blindfold.connect(server.url, allow_simulation=True)
    with connection:
        yield connection


def write_self_signed(directory: Path, common_name: str = "mitm") -> tuple[Path, Path]:
    """A throw-away self-signed certificate and key for 127.0.0.1/localhost (an attacker's
    proxy, or a CA other than the server's); returns (certificate path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
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
