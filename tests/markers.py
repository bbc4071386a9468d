"""Which tests are end to end (`e2e`) and which read the attestation vectors (`vectors`),
decided from what each test actually uses, so nobody has to remember to mark them.

A test is `e2e` when it, one of its fixtures, or a helper function of its own module (followed
transitively) refers to something that starts a process: `start_server` and its relatives in
server_process.py, `subprocess`, or the server's worker processes. It reads the vectors when
it or a fixture it uses needs the `vectors_dir` fixture or the VECTORS_DIR path. Reading
compiled code (the names a function refers to) rather than source text is exact for direct
calls; a process started through an object handed in from elsewhere would escape it, so such
tests mark themselves.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable

import pytest

# Names whose use starts another process (a server, a replica, a balancer, a CLI run, the
# onnxruntime worker processes of an InferenceRunner or a ModelWorker).
PROCESS_STARTERS = frozenset(
    {
        "start_server",
        "start_replica",
        "start_balancer",
        "run_replica_expecting_failure",
        "subprocess",
        "InferenceRunner",
        "ModelWorker",
    }
)
# Fixtures of conftest.py that start the shared server.
SERVER_FIXTURES = frozenset({"server", "client"})
VECTOR_NAMES = frozenset({"VECTORS_DIR"})
VECTOR_FIXTURES = frozenset({"vectors_dir", "vector_manifest"})


def _names(code: types.CodeType) -> Iterable[str]:
    """The global and attribute names `code` and the functions nested in it refer to."""
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _names(constant)


def refers_to(
    function: Callable[..., object], targets: frozenset[str], seen: set[types.CodeType]
) -> bool:
    """Whether `function` refers to one of `targets`, directly or through another function
    of the test modules it calls by name."""
    function = getattr(function, "__wrapped__", function)
    code = getattr(function, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    namespace = getattr(function, "__globals__", {})
    for name in _names(code):
        if name in targets:
            return True
        helper = namespace.get(name)
        if (
            isinstance(helper, types.FunctionType)
            and helper.__module__ == function.__module__
            and refers_to(helper, targets, seen)
        ):
            return True
    return False


def _uses(item: pytest.Function, fixtures: frozenset[str], names: frozenset[str]) -> bool:
    if fixtures & set(item.fixturenames):
        return True
    functions: list[Callable[..., object]] = [item.function]
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        functions.extend(definition.func for definition in definitions)
    seen: set[types.CodeType] = set()
    return any(refers_to(function, names, seen) for function in functions)


def classify(items: list[pytest.Item]) -> None:
    """Adds the `e2e` and `vectors` markers to the collected tests that earn them."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        if _uses(item, SERVER_FIXTURES, PROCESS_STARTERS):
            item.add_marker(pytest.mark.e2e)
        if _uses(item, VECTOR_FIXTURES, VECTOR_NAMES):
            item.add_marker(pytest.mark.vectors)
