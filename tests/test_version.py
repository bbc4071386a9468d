"""One version: written once (blindfold.__version__), read by the package metadata, stated by
the OpenAPI document and by a running server's metadata (GET /v2)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import blindfold
from blindfold.server import app

from conftest import PROJECT_ROOT


def test_package_metadata_reads_the_version_from_the_package() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "write the version only in blindfold/__init__"
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "blindfold.__version__"}


def test_openapi_document_states_the_package_version() -> None:
    document = json.loads(Path(app.__file__).with_name("openapi.json").read_text())
    assert document["info"]["version"] == blindfold.__version__, (
        "update info.version in src/blindfold/server/openapi.json to blindfold.__version__"
    )


def test_running_server_states_the_package_version(client: blindfold.Client) -> None:
    assert client.server_metadata()["version"] == blindfold.__version__
