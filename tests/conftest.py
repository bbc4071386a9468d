"""Shared fixtures: paths to the attestation vector store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VECTORS_DIR = PROJECT_ROOT / ".." / "shared" / "attestation-vectors"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The read-only store of real hardware evidence; skips when it is not beside the repo."""
    if not (VECTORS_DIR / "manifest.json").is_file():
        pytest.skip(f"attestation vectors not found at {VECTORS_DIR} (../shared is missing)")
    return VECTORS_DIR


@pytest.fixture(scope="session")
def vector_manifest(vectors_dir: Path) -> list[dict[str, Any]]:
    data = json.loads((vectors_dir / "manifest.json").read_text())
    return data["vectors"] if isinstance(data, dict) else data
