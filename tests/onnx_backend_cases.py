"""The model test cases shipped inside the installed `onnx` wheel, read the way ONNX's own
backend test runner reads them (onnx/backend/test/runner/__init__.py), and compared with the
same rule: same shape, same dtype, np.testing.assert_allclose(rtol, atol) for numbers and
equality for strings. Failure messages name the output and the largest differences."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

DATA_DIR = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
# The wheel's on-disk cases, and "node": the ~1900 single-operator cases ONNX generates in
# memory (onnx.backend.test.case.node; the wheel does not ship their data directory). The node
# cases cover every dtype, 0-d and zero-size tensors and strings, so they are where wire-format
# bugs show. BLINDFOLD_CONFORMANCE_KINDS=simple,pytorch-converted,... narrows the selection.
KINDS = ("simple", "pytorch-converted", "pytorch-operator", "node")
SELECTED_KINDS = tuple(
    kind.strip()
    for kind in os.environ.get("BLINDFOLD_CONFORMANCE_KINDS", ",".join(KINDS)).split(",")
    if kind.strip()
)

# The defaults of onnx.backend.test.loader; a case's data.json may override them.
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-7


@dataclass(frozen=True)
class BackendCase:
    id: str  # e.g. "pytorch-converted/test_Conv2d"
    directory: Path | None = None  # a case on disk: model.onnx, test_data_set_*/
    generated: Any = None  # or an in-memory onnx.backend.test.case TestCase (node cases)

    @property
    def kind(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def model_bytes(self) -> bytes:
        if self.generated is not None:
            data: bytes = self.generated.model.SerializeToString()
            return data
        assert self.directory is not None
        return (self.directory / "model.onnx").read_bytes()

    def tolerances(self) -> tuple[float, float]:
        if self.generated is not None:
            return float(self.generated.rtol), float(self.generated.atol)
        assert self.directory is not None
        rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
        data_json = self.directory / "data.json"
        if data_json.is_file():
            data = json.loads(data_json.read_text())
            rtol, atol = data.get("rtol", rtol), data.get("atol", atol)
        return float(rtol), float(atol)


def discover() -> list[BackendCase]:
    cases = []
    for kind in SELECTED_KINDS:
        if kind == "node":
            cases += _node_cases()
            continue
        kind_dir = DATA_DIR / kind
        if not kind_dir.is_dir():
            continue
        for name in sorted(os.listdir(kind_dir)):
            directory = kind_dir / name
            if (directory / "model.onnx").is_file():
                cases.append(BackendCase(f"{kind}/{name}", directory=directory))
    return cases


def _node_cases() -> list[BackendCase]:
    import warnings

    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators divide by zero on purpose
        generated = load_model_tests(kind="node")
    return [
        BackendCase(f"node/{case.name}", generated=case)
        for case in sorted(generated, key=lambda c: c.name)
        if case.model is not None and case.data_sets
    ]


@dataclass
class DataSet:
    name: str
    inputs: dict[str, Any]  # by graph input name
    outputs: dict[str, Any]  # by graph output name, in the graph's order


def runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (what a caller must feed), in graph order."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [info for info in model.graph.input if info.name not in initializers]


def non_tensor_values(model: onnx.ModelProto) -> list[str]:
    """Graph inputs/outputs whose type is not a plain tensor (sequence, map, optional...)."""
    found = []
    for info in (*runtime_inputs(model), *model.graph.output):
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type":
            found.append(f"{info.name} ({kind})")
    return found


def _load_proto(path: str, type_proto: onnx.TypeProto) -> Any:
    """Like the ONNX runner's _load_proto: tensors as arrays, sequences as lists, optionals."""
    content = Path(path).read_bytes()
    if type_proto.HasField("sequence_type"):
        sequence = onnx.SequenceProto()
        sequence.ParseFromString(content)
        return numpy_helper.to_list(sequence)
    if type_proto.HasField("optional_type"):
        optional = onnx.OptionalProto()
        optional.ParseFromString(content)
        return numpy_helper.to_optional(optional)
    if type_proto.HasField("map_type"):
        mapping = onnx.MapProto()
        mapping.ParseFromString(content)
        return numpy_helper.to_dict(mapping)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(content)
    return numpy_helper.to_array(tensor)


def load_data_sets(case: BackendCase, model: onnx.ModelProto) -> list[DataSet]:
    if case.generated is not None:
        return _generated_data_sets(case, model)
    # ONNX's runner maps input_<i>.pb to graph.input[i]; for models whose initializers are
    # also listed as graph inputs (IR < 4), the files cover the leading non-initializer ones.
    inputs = runtime_inputs(model)
    outputs = list(model.graph.output)
    sets = []
    assert case.directory is not None  # a case is either generated or on disk
    for directory in sorted(glob.glob(str(case.directory / "test_data_set_*"))):
        count_in = len(glob.glob(os.path.join(directory, "input_*.pb")))
        count_out = len(glob.glob(os.path.join(directory, "output_*.pb")))
        if count_in > len(inputs) or count_out != len(outputs):
            raise AssertionError(
                f"{case.id}: {os.path.basename(directory)} has {count_in} inputs and "
                f"{count_out} outputs, the graph {len(inputs)} and {len(outputs)}"
            )
        feeds = {
            inputs[i].name: _load_proto(os.path.join(directory, f"input_{i}.pb"), inputs[i].type)
            for i in range(count_in)
        }
        expected = {
            outputs[i].name: _load_proto(os.path.join(directory, f"output_{i}.pb"), outputs[i].type)
            for i in range(count_out)
        }
        sets.append(DataSet(os.path.basename(directory), feeds, expected))
    return sets


def _normalize(item: Any) -> Any:
    """TensorProtos and numpy scalars (some generators emit np.float32(x)) as arrays."""
    if isinstance(item, onnx.TensorProto):
        return numpy_helper.to_array(item)
    if isinstance(item, np.generic):
        return np.asarray(item)
    return item


def _generated_data_sets(case: BackendCase, model: onnx.ModelProto) -> list[DataSet]:
    inputs = runtime_inputs(model)
    outputs = list(model.graph.output)
    sets = []
    for index, (feeds, expected) in enumerate(case.generated.data_sets):
        if len(feeds) > len(inputs) or len(expected) != len(outputs):
            raise AssertionError(
                f"{case.id}: data set {index} has {len(feeds)} inputs and {len(expected)} "
                f"outputs, the graph {len(inputs)} and {len(outputs)}"
            )
        sets.append(
            DataSet(
                f"data_set_{index}",
                {info.name: _normalize(v) for info, v in zip(inputs, feeds, strict=False)},
                {info.name: _normalize(v) for info, v in zip(outputs, expected, strict=True)},
            )
        )
    return sets


def _as_text(array: np.ndarray) -> np.ndarray:
    """String tensors as str objects (the SDK returns BYTES elements as bytes)."""
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for index, item in enumerate(array.reshape(-1)):
        flat[index] = item.decode("utf-8") if isinstance(item, bytes) else item
    return out


def compare(name: str, actual: Any, expected: np.ndarray, rtol: float, atol: float) -> str | None:
    """None when `actual` matches `expected` under ONNX's backend-test rule, else why not."""
    if not isinstance(actual, np.ndarray):
        return f"output {name!r}: got a {type(actual).__name__}, expected an array"
    if actual.shape != expected.shape:
        return f"output {name!r}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    if expected.dtype == object or expected.dtype.kind in ("U", "S"):
        got, want = _as_text(actual), _as_text(expected)
        bad = [i for i, (a, b) in enumerate(zip(got.flat, want.flat, strict=True)) if a != b]
        if bad:
            i = bad[0]
            return (
                f"output {name!r}: {len(bad)} of {want.size} strings differ, first at flat "
                f"index {i}: {got.flat[i]!r} != {want.flat[i]!r}"
            )
        return None
    if actual.dtype != expected.dtype:
        return f"output {name!r}: dtype {actual.dtype}, expected {expected.dtype}"
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    except AssertionError:
        pass
    else:
        return None
    got = actual.astype(np.float64)
    want = expected.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(got - want)
        close = np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        relative = diff / np.abs(want)
    finite = np.isfinite(diff)
    max_abs = float(diff[finite].max()) if finite.any() else float("nan")
    finite_rel = np.isfinite(relative)
    max_rel = float(relative[finite_rel].max()) if finite_rel.any() else float("nan")
    return (
        f"output {name!r}: {int((~close).sum())} of {close.size} elements differ beyond "
        f"rtol={rtol:g} atol={atol:g}; max abs diff {max_abs:.6g}, max rel diff {max_rel:.6g}"
    )


def compare_all(
    actual: dict[str, Any], expected: dict[str, Any], rtol: float, atol: float
) -> list[str]:
    problems = []
    if list(actual) != list(expected):
        problems.append(f"output names {list(actual)}, expected {list(expected)}")
    for name, want in expected.items():
        if name in actual:
            problem = compare(name, actual[name], want, rtol, atol)
            if problem:
                problems.append(problem)
    return problems
