"""The e2e marking (tests/markers.py) follows a test's calls into its module's helpers, and
marks nothing that starts no process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from markers import PROCESS_STARTERS, refers_to
from server_process import start_server


def _start(tmp_path: Path) -> object:
    return start_server(tmp_path)


def _through_a_helper(tmp_path: Path) -> object:
    return _start(tmp_path)


def _in_a_nested_function(tmp_path: Path) -> Callable[[], object]:
    return lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)


def _no_process(values: list[int]) -> int:
    return sum(sorted(values))


# In a dict, so that the tests below do not themselves refer to the functions by name (the
# marking would follow them and mark these tests e2e).
SAMPLES: dict[str, Callable[..., object]] = {
    "through a helper": _through_a_helper,
    "nested": _in_a_nested_function,
    "none": _no_process,
}


def test_a_process_started_through_a_helper_or_a_nested_function_is_seen() -> None:
    assert refers_to(SAMPLES["through a helper"], PROCESS_STARTERS, set())
    assert refers_to(SAMPLES["nested"], PROCESS_STARTERS, set())


def test_a_function_that_starts_no_process_is_not_e2e() -> None:
    assert not refers_to(SAMPLES["none"], PROCESS_STARTERS, set())
