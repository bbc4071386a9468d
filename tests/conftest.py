"""Shared fixtures (the attestation vector store, the shared server and a client of it) and
the collection hook that marks e2e and vector tests. Helpers live in helpers.py,
server_process.py and onnx_models.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blindfold

from helpers import connect
from markers import classify
from server_process import ServerProcess, free_port, start_server

__all__ = ["ServerProcess", "free_port", "start_server"]

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
def client(server: ServerProcess) -> Iterator[blindfold.Client]:
    with connect(server) as connection:
        yield connection
