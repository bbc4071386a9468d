"""ONNX backend conformance through the SDK and a real server.

Every model test case shipped in the installed `onnx` wheel (simple, pytorch-converted,
pytorch-operator) and every single-operator case ONNX generates (node; see
onnx_backend_cases.KINDS) is uploaded to the shared simulation server, run through
`client.run_model` on each of its data sets, compared with the expected outputs under the
tolerances ONNX's own backend test uses, and deleted. BLINDFOLD_CONFORMANCE_KINDS narrows it.

A case is skipped only when in-process onnxruntime cannot run it either (it fails to load or
run the same bytes, or its outputs miss the expected ones), or when its inputs/outputs are not
plain tensors (sequence/map/optional), which the Open Inference Protocol cannot carry. Where
in-process onnxruntime fails, the server must still refuse cleanly (4xx, or an SDK InputError),
never with a 5xx. Anything else that differs is a bug in the server or SDK path. A summary
line is printed at the end: "conformance: N cases, P passed, S skipped (reasons: ...), F failed".
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_backend_cases import (
    BackendCase,
    DataSet,
    compare_all,
    discover,
    load_data_sets,
    non_tensor_values,
)

import blindfold

CASES = discover()

SKIP_ORT_LOAD = "in-process onnxruntime cannot load the model"
SKIP_ORT_RUN = "in-process onnxruntime cannot run the model"
SKIP_ORT_MISMATCH = "in-process onnxruntime misses the expected outputs"
SKIP_NON_TENSOR = "non-tensor inputs/outputs (OIP carries tensors only)"


@dataclass(repr=False)
class Tally:
    """Outcomes of this module's cases, for the summary line."""

    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def record(self, case: BackendCase, outcome: str, reason: str = "") -> None:
        self.by_kind.setdefault(case.kind, Counter())[outcome] += 1
        if outcome == "passed":
            self.passed += 1
        elif outcome == "failed":
            self.failed.append(case.id)
        else:
            self.skipped[reason] += 1

    def summary(self) -> str:
        total = self.passed + len(self.failed) + sum(self.skipped.values())
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        lines = [
            f"conformance: {total} cases, {self.passed} passed, "
            f"{sum(self.skipped.values())} skipped (reasons: {reasons or 'none'}), "
            f"{len(self.failed)} failed in {time.monotonic() - self.started:.1f} s"
        ]
        for kind, counts in self.by_kind.items():
            lines.append(
                f"  {kind}: {sum(counts.values())} cases, {counts['passed']} passed, "
                f"{counts['skipped']} skipped, {counts['failed']} failed"
            )
        if self.failed:
            lines.append("conformance failures: " + ", ".join(self.failed))
        return "\n".join(lines)


class _SummaryPlugin:
    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_line(self.tally.summary())


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Tally:
    """The module's tally, printed at the very end of the run (after pytest's own summary
    sections) by the plugin registered here."""
    result = Tally()
    plugin = _SummaryPlugin(result)
    request.config.pluginmanager.register(plugin, "blindfold-conformance-summary")
    return result


class _Skip(Exception):
    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category


def _short(message: str, limit: int = 200) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + "..."


def _reference_session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the skip reason carries the error
    try:
        return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise _Skip(SKIP_ORT_LOAD, _short(str(exc))) from None


def _same_layout(got: np.ndarray, want: np.ndarray) -> bool:
    """Same shape and dtype; strings may come back as bytes objects (OIP BYTES)."""
    if got.shape != want.shape:
        return False
    if want.dtype.kind in ("U", "S", "O"):
        return got.dtype.kind in ("U", "S", "O")
    return got.dtype == want.dtype


def _model_name(case: BackendCase) -> str:
    return "conformance-" + re.sub(r"[^A-Za-z0-9_.\-]", "-", case.id)[:110]


def _reference_outputs(
    data: bytes, data_sets: list[DataSet], rtol: float, atol: float
) -> dict[str, dict[str, np.ndarray]]:
    """In-process onnxruntime on the same bytes must meet the expectations, otherwise the
    case says nothing about Blindfold (raises _Skip)."""
    session = _reference_session(data)
    output_names = [out.name for out in session.get_outputs()]
    reference: dict[str, dict[str, np.ndarray]] = {}
    for data_set in data_sets:
        try:
            values = session.run(output_names, data_set.inputs)
        except Exception as exc:
            raise _Skip(SKIP_ORT_RUN, _short(str(exc))) from None
        got = dict(zip(output_names, values, strict=True))
        problems = compare_all(got, data_set.outputs, rtol, atol)
        if problems:
            raise _Skip(SKIP_ORT_MISMATCH, f"{data_set.name}: " + "; ".join(problems))
        reference[data_set.name] = got
    return reference


def _expect_clean_refusal(
    case: BackendCase,
    client: blindfold.Client,
    data: bytes,
    data_sets: list[DataSet],
    skip: _Skip,
) -> None:
    """Where in-process onnxruntime fails, the server may refuse too, but only with a clear
    4xx (or the SDK with an InputError), never a 5xx: bad input leaves it serving."""

    def check(error: blindfold.ServerError, action: str) -> None:
        if not 400 <= error.status < 500:
            pytest.fail(
                f"{case.id}: in-process onnxruntime fails ({skip}), and the server answered "
                f"{action} with {error.status} instead of a 4xx: {error.message}",
                pytrace=False,
            )

    name = _model_name(case)
    try:
        uploaded = client.upload_model(data, name=name)
    except blindfold.ServerError as error:
        check(error, "the upload")
        return
    try:
        for data_set in data_sets:
            try:
                client.run_model(name, dict(data_set.inputs))
            except blindfold.InputError:
                pass  # refused by the SDK before sending, e.g. a dtype OIP has no name for
            except blindfold.ServerError as error:
                check(error, "the inference")
    finally:
        client.delete_model(name, token=uploaded.owner_token)


def _run_case(case: BackendCase, client: blindfold.Client) -> None:
    data = case.model_bytes
    model = onnx.load_model_from_string(data)
    rtol, atol = case.tolerances()
    non_tensor = non_tensor_values(model)
    if non_tensor:
        raise _Skip(SKIP_NON_TENSOR, ", ".join(non_tensor))
    data_sets = load_data_sets(case, model)
    assert data_sets, f"{case.id} has no test_data_set_*"

    try:
        reference = _reference_outputs(data, data_sets, rtol, atol)
    except _Skip as skip:
        if skip.category in (SKIP_ORT_LOAD, SKIP_ORT_RUN):
            _expect_clean_refusal(case, client, data, data_sets, skip)
        raise

    name = _model_name(case)
    uploaded = client.upload_model(data, name=name)
    try:
        failures = []
        for data_set in data_sets:
            outputs = client.run_model(name, dict(data_set.inputs))
            problems = compare_all(dict(outputs), data_set.outputs, rtol, atol)
            # The server runs the same onnxruntime on the same bytes: it must also give back
            # exactly the dtypes and shapes the in-process session returned.
            for out_name, want in reference[data_set.name].items():
                got = outputs.get(out_name)
                if got is not None and not _same_layout(got, want):
                    problems.append(
                        f"output {out_name!r}: server gave {got.dtype}{list(got.shape)}, "
                        f"in-process onnxruntime {want.dtype}{list(want.shape)}"
                    )
            failures += [f"{data_set.name}: {problem}" for problem in problems]
        if failures:
            pytest.fail(
                f"{case.id} (rtol={rtol:g}, atol={atol:g}):\n  " + "\n  ".join(failures),
                pytrace=False,
            )
    finally:
        client.delete_model(name, token=uploaded.owner_token)


@pytest.fixture(scope="module")
def conformance_client(server: Any) -> Iterator[blindfold.Client]:
    """One attested connection for all cases (attesting once per case adds nothing here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        connection = blindfold.connect(server.url, allow_simulation=True)
    with connection:
        yield connection


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_backend_case(
    case: BackendCase, conformance_client: blindfold.Client, tally: Tally
) -> None:
    try:
        _run_case(case, conformance_client)
    except _Skip as skip:
        tally.record(case, "skipped", skip.category)
        pytest.skip(str(skip))
    except BaseException:
        tally.record(case, "failed")
        raise
    else:
        tally.record(case, "passed")


def test_cases_were_found() -> None:
    assert len(CASES) >= 100, f"expected the onnx wheel's backend test data, found {len(CASES)}"
