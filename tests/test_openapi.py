"""The OpenAPI 3.1 document (src/blindfold/server/openapi.json): it names exactly the routes
the server has, it is a valid OpenAPI document, and a live server answers schemathesis'
generated requests (a bounded number per route) without a 5xx and as the document says."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from onnx import TensorProto

import blindfold
from blindfold.server import app

from conftest import ServerProcess, start_server
from onnx_models import identity_model

pytest.importorskip("schemathesis")
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

DOCUMENT = Path(app.__file__).with_name("openapi.json")
# About 20 routes: well under a minute on two cores. Raise it to hunt for bugs.
EXAMPLES_PER_ROUTE = int(os.environ.get("BLINDFOLD_OPENAPI_EXAMPLES", "25"))
SCHEMA = schemathesis.openapi.from_path(DOCUMENT)


@schemathesis.serializer("message/ohttp-req")
def _as_bytes(_context: object, value: object) -> bytes:
    """Random bytes as an Oblivious HTTP request: the gateway must refuse them with a 4xx."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return loaded


def test_every_route_is_documented_and_nothing_else() -> None:
    served = {
        (route.path, method.lower())
        for route in app.ROUTES
        for method in (route.methods or ())
        if method != "HEAD"  # Starlette adds HEAD to every GET
    }
    documented = {
        (path, method)
        for path, item in document()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }
    assert served == documented, {
        "undocumented": served - documented,
        "documented but not served": documented - served,
    }


def test_no_path_matches_two_routes() -> None:
    """The routes are listed in order of use (server/app.py), which is only safe while each
    path matches one route pattern at most: then the order never decides which one."""
    from blindfold.server import cluster

    routes = app.ROUTES + cluster.ROUTES
    for route in routes:
        sample = re.sub(r"\{[a-z0-9_]+\}", "x", route.path)
        matching = [other.path for other in routes if other.path_regex.match(sample)]
        assert matching == [route.path], f"{sample} matches {matching}"


def test_document_is_valid_openapi_3_1() -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.validators import OpenAPIV31SpecValidator

    spec = document()
    assert spec["openapi"].startswith("3.1")
    validate(spec, cls=OpenAPIV31SpecValidator)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server with open uploads and one public model named as the document's example, so
    that generated inference requests reach the tensor decoder; and the attested certificate
    for requests to verify the server with."""
    directory = tmp_path_factory.mktemp("openapi")
    process = start_server(directory, "--open-upload")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindfold.SimulationWarning)
        client = blindfold.connect(process.url, allow_simulation=True)
    with client:
        client.upload_model(identity_model(TensorProto.FLOAT, name="x"), "identity", public=True)
        certificate = directory / "server.pem"
        certificate.write_text(client.attestation.certificate_pem)
    yield process, str(certificate)
    process.stop()


def test_served_document_is_the_repository_file(live: tuple[ServerProcess, str]) -> None:
    process, certificate = live
    response = requests.get(f"{process.url}/openapi.json", verify=certificate, timeout=10)
    assert response.status_code == 200
    assert response.json() == document()
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


@pytest.fixture(scope="module")
def session(live: tuple[ServerProcess, str]) -> Iterator[requests.Session]:
    with requests.Session() as http:
        http.verify = live[1]
        yield http


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    derandomize=True,  # the same requests every run
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_live_server_conforms(
    case: Case[Any], live: tuple[ServerProcess, str], session: requests.Session
) -> None:
    process, certificate = live
    case.call_and_validate(
        base_url=process.url,
        session=session,
        verify=certificate,
        timeout=30,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )
    assert process.alive()
