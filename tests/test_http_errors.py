"""The HTTP layer's one error table: every domain error of the server has a status there, and
the domain modules choose none themselves (they neither import Starlette nor raise the
HTTP-level RequestRejected)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from blindfold.errors import BlindfoldError, RequestRejected
from blindfold.server import http_errors, refusals
from blindfold.server.refusals import Refusal

SERVER = Path(refusals.__file__).resolve().parent
# The server's domain: they raise domain errors and know nothing of HTTP.
DOMAIN_MODULES = (
    "models.py",
    "runtime.py",
    "onnx_check.py",
    "service.py",
    "store.py",
    "scheduler.py",
    "identity.py",
    "refusals.py",
    "inference.py",
    "encrypted_models.py",
    "model_bytes.py",
    "model_record.py",
)


def _domain_errors() -> list[type[Refusal]]:
    return [
        value
        for value in vars(refusals).values()
        if inspect.isclass(value) and issubclass(value, Refusal) and value is not Refusal
    ]


def test_domain_errors_are_blindfold_errors() -> None:
    # One hierarchy in the project: a caller catching BlindfoldError catches these too.
    assert issubclass(Refusal, BlindfoldError)
    assert len(_domain_errors()) >= 10


@pytest.mark.parametrize("cls", _domain_errors(), ids=lambda cls: cls.__name__)
def test_every_domain_error_has_a_status(cls: type[Refusal]) -> None:
    # Listed itself, or under an ancestor that is (never only under the bare base).
    assert any(ancestor in http_errors.STATUS for ancestor in cls.__mro__)
    status = http_errors.status_of(cls("what was wrong; what to do"))
    assert 400 <= status < 600 and status != 500


def test_the_table_lists_only_domain_errors() -> None:
    assert all(issubclass(cls, Refusal) for cls in http_errors.STATUS)
    assert Refusal not in http_errors.STATUS  # a refusal must say which kind it is


def test_subclasses_take_their_ancestors_status() -> None:
    assert http_errors.status_of(refusals.InvalidModel("x")) == 400
    assert http_errors.status_of(refusals.InvalidInput("x")) == 400
    assert http_errors.status_of(refusals.ModelNotFound("x")) == 404
    assert http_errors.status_of(refusals.ModelNotReady("x")) == 503


def test_rejection_keeps_the_message_and_passes_http_refusals_through() -> None:
    answer = http_errors.rejection(refusals.AccessDenied("the token is not an upload key"))
    assert (answer.status, answer.message) == (403, "the token is not an upload key")
    http_level = RequestRejected(415, "send Content-Type: message/ohttp-req")
    assert http_errors.rejection(http_level) is http_level


@pytest.mark.parametrize("module", DOMAIN_MODULES)
def test_domain_modules_choose_no_http_status(module: str) -> None:
    tree = ast.parse((SERVER / module).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not [name for name in imported if name.split(".")[0] == "starlette"], module
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert "RequestRejected" not in names, f"{module} chooses an HTTP status"
    assert "http_errors" not in names and "blindfold.server.http_errors" not in imported
