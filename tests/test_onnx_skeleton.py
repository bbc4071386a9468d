"""The ONNX check through the model's skeleton (server/onnx_skeleton.py): the same verdict as
protobuf's parse of the whole model, for valid models, every model the upload tests use, and
malformed wire data (always InvalidModel, never another exception); and checking a model held
in a memfd costs far less memory than the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from blindfold.server import onnx_skeleton
from blindfold.server.limits import Limits
from blindfold.server.model_bytes import ModelBytesWriter
from blindfold.server.onnx_check import check_model, check_parsed
from blindfold.server.refusals import InvalidModel

from onnx_models import (
    add_mul_model,
    custom_domain_model,
    external_data_model,
    gather_model,
    identity_model,
    matmul_model,
    product_sum_model,
)

LIMITS = Limits()
MiB = 1 << 20
NOT_PROTOBUF = "the uploaded bytes are not an ONNX model (protobuf parse failed)"
PAYLOADS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


# --- the reference: protobuf's parse of the whole model, as the checker did before ---


def full_parse(data: bytes) -> onnx.ModelProto | None:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        return None
    return model


def full_verdict(data: bytes) -> str:
    model = full_parse(data)
    if model is None:
        return NOT_PROTOBUF
    try:
        check_parsed(model, LIMITS)
    except InvalidModel as refused:
        return str(refused)
    return "ok"


def skeleton_verdict(data: bytes, verbatim_below: int = onnx_skeleton.VERBATIM_BELOW) -> str:
    """check_model's verdict (with the walker's verbatim threshold chosen)."""
    try:
        if verbatim_below == onnx_skeleton.VERBATIM_BELOW:
            check_model(data, LIMITS)
        else:
            try:
                stripped = onnx_skeleton.skeleton(data, verbatim_below)
            except onnx_skeleton.MalformedModel:
                return NOT_PROTOBUF
            model = full_parse(stripped)
            if model is None:
                return NOT_PROTOBUF
            check_parsed(model, LIMITS)
    except InvalidModel as refused:
        return str(refused)
    return "ok"


def assert_same_verdict(data: bytes) -> str:
    expected = full_verdict(data)
    assert skeleton_verdict(data) == expected
    assert skeleton_verdict(data, 0) == expected
    return expected


def tensors(message: Message) -> Iterator[TensorProto]:
    """Every TensorProto in `message`, found from the descriptors."""
    if isinstance(message, TensorProto):
        yield message
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in [value] if isinstance(value, Message) else value:
                yield from tensors(item)


def cleared(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its weights emptied as the skeleton empties them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in tensors(copy):
        if tensor.HasField("raw_data"):
            tensor.raw_data = b""
        for name in PAYLOADS:
            tensor.ClearField(name)
    return copy


# --- models: the ones the upload tests use, and more places a tensor can be ---


def _io(name: str = "x", elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, ["N", 3])


def _model(graph: onnx.GraphProto, **kwargs: object) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], **kwargs)


def _external(tensor: TensorProto) -> TensorProto:
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    return tensor


def subgraph_external_model() -> onnx.ModelProto:
    """External data hidden in the initializer of an If branch, behind a large weight."""
    weights = numpy_helper.from_array(np.ones(300, np.float32), "big")
    hidden = _external(numpy_helper.from_array(np.ones(3, np.float32), "hidden"))
    branch = helper.make_graph(
        [helper.make_node("Identity", ["hidden"], ["y"])],
        "branch",
        [],
        [_io("y")],
        initializer=[weights, hidden],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    return _model(helper.make_graph([node], "if", [cond], [_io("y")]))


def sparse_and_function_model(external: bool) -> onnx.ModelProto:
    """A sparse initializer, a function whose node holds a tensor attribute, metadata."""
    values = numpy_helper.from_array(np.arange(200, dtype=np.float32), "sparse")
    indices = numpy_helper.from_array(np.arange(200, dtype=np.int64), "indices")
    sparse = helper.make_sparse_tensor(values, indices, [400])
    constant = numpy_helper.from_array(np.arange(100, dtype=np.float64), "constant")
    if external:
        _external(constant)
    body = helper.make_node("Constant", [], ["c"], value=constant)
    function = helper.make_function("local.fn", "Fn", [], ["c"], [body], [])
    node = helper.make_node("Fn", [], ["y"], domain="local.fn")
    graph = helper.make_graph(
        [node], "fn", [_io()], [_io("y", TensorProto.DOUBLE)], sparse_initializer=[sparse]
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)],
        functions=[function],
    )
    helper.set_model_props(model, {"author": "tests"})
    return model


def _strings(name: str, items: list[bytes]) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.STRING, dims=[len(items)])
    tensor.string_data.extend(items)
    return tensor


def typed_data_model() -> onnx.ModelProto:
    """Initializers in the typed (packed) fields rather than raw_data, and strings."""
    initializers = [
        helper.make_tensor("f", TensorProto.FLOAT, [100], np.arange(100.0)),
        helper.make_tensor("i", TensorProto.INT64, [100], np.arange(-50, 50) * 10**12),
        helper.make_tensor("h", TensorProto.FLOAT16, [100], np.ones(100, np.float16)),
        helper.make_tensor("d", TensorProto.DOUBLE, [100], np.arange(100.0)),
        helper.make_tensor("u", TensorProto.UINT64, [100], np.arange(100) * 2**40),
        _strings("s", [b"caf\xc3\xa9", b"\xff raw"]),
    ]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "typed", [_io()], [_io("y")], initializers
    )
    return _model(graph)


def upload_test_models() -> list[tuple[str, bytes]]:
    """The models test_bad_input, test_isolation and test_memory upload, and those above."""
    utf8 = identity_model(TensorProto.FLOAT, ["BATCHDIM", 3]).SerializeToString()
    cases: list[tuple[str, onnx.ModelProto | bytes]] = [
        ("not-onnx", b"\x53\x54this is not an ONNX model"),
        ("empty", b""),
        ("json", b'{"graph": "nope"}'),
        ("identity", identity_model(TensorProto.FLOAT)),
        ("identity-int64", identity_model(TensorProto.INT64)),
        ("bfloat16", identity_model(TensorProto.BFLOAT16)),
        ("huge-static-shape", identity_model(TensorProto.FLOAT, [100_000, 100_000])),
        ("add-mul", add_mul_model()),
        ("product-sum", product_sum_model()),
        ("matmul", matmul_model()),
        ("gather", gather_model()),
        ("custom-domain", custom_domain_model("com.evil")),
        ("ort-extensions", custom_domain_model("ai.onnx.contrib")),
        ("subgraph-external", subgraph_external_model()),
        ("sparse-function", sparse_and_function_model(external=False)),
        ("function-external", sparse_and_function_model(external=True)),
        ("typed-data", typed_data_model()),
        ("utf8-invalid", utf8.replace(b"BATCHDIM", b"BAT\xff\xfeDIM")),
        ("utf8-broken", utf8.replace(b"BATCHDIM", b"\xc3(ATCHDIM")),
    ]
    for location in ("../../etc/passwd", "/etc/shadow", "weights.bin"):
        cases.append((f"external-{location}", external_data_model(location)))
    sequence = helper.make_tensor_sequence_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("SequenceConstruct", ["x"], ["y"])
    cases.append(("sequence-output", _model(helper.make_graph([node], "s", [_io()], [sequence]))))
    map_type = helper.make_map_type_proto(
        TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
    )
    constant = helper.make_node("Constant", [], ["y"], value_floats=[1.0, 2.0])
    graph = helper.make_graph(
        [constant], "map", [helper.make_value_info("x", map_type)], [_io("y")]
    )
    cases.append(("map-input", _model(graph)))
    return [
        (name, data if isinstance(data, bytes) else data.SerializeToString())
        for name, data in cases
    ]


UPLOADS = upload_test_models()


@pytest.mark.parametrize(("data"), [data for _, data in UPLOADS], ids=[n for n, _ in UPLOADS])
def test_upload_models_get_the_full_parse_verdict(data: bytes) -> None:
    assert_same_verdict(data)


def test_the_verdicts_are_the_expected_ones() -> None:
    verdicts = {name: full_verdict(data) for name, data in UPLOADS}
    assert verdicts["matmul"] == verdicts["sparse-function"] == verdicts["typed-data"] == "ok"
    assert "not an ONNX model" in verdicts["empty"]
    assert verdicts["not-onnx"] == NOT_PROTOBUF
    assert "references external data" in verdicts["subgraph-external"]
    assert "references external data" in verdicts["function-external"]
    assert "'com.evil'" in verdicts["custom-domain"]
    assert "elements" in verdicts["huge-static-shape"]


def test_skeleton_empties_the_weights_and_keeps_the_rest() -> None:
    for data in (matmul_model(256).SerializeToString(), typed_data_model().SerializeToString()):
        stripped = onnx_skeleton.skeleton(data, 0)
        assert len(stripped) < 2048 < len(data)
        model = full_parse(data)
        assert model is not None
        assert full_parse(stripped) == cleared(model)
        # By default tensors shorter than VERBATIM_BELOW keep their few weights.
        default = full_parse(onnx_skeleton.skeleton(data))
        assert default is not None
        assert cleared(default) == cleared(model)
    model = full_parse(onnx_skeleton.skeleton(matmul_model(256).SerializeToString()))
    assert model is not None
    assert model.graph.initializer[0].HasField("raw_data")  # present, and empty


def test_a_memoryview_of_a_memfd_is_checked_and_stays_closable() -> None:
    """The checker reads the mapping directly; after any refusal the mapping can still be
    closed (a BufferError there was a 500 instead of the 400)."""
    cases = [
        (matmul_model().SerializeToString(), None),
        (b"\x0a\xff\xff\xff\x0f" + b"x" * 100, NOT_PROTOBUF),  # a length past the end
        (b"\xab\x06\x08\x01\xb4\x06", NOT_PROTOBUF),  # a group ended with the wrong number
        (external_data_model().SerializeToString(), "references external data"),
    ]
    for data, refused in cases:
        writer = ModelBytesWriter()
        writer.write(data)
        held = writer.finish()
        try:
            with held.view() as view:
                if refused is None:
                    check_model(view, LIMITS)
                else:
                    with pytest.raises(InvalidModel, match=refused.split(" (")[0]):
                        check_model(view, LIMITS)
        finally:
            held.close()


# --- random valid models: the skeleton parses to the full parse with its weights emptied ---

_DTYPES = [
    (TensorProto.FLOAT, np.float32),
    (TensorProto.DOUBLE, np.float64),
    (TensorProto.INT32, np.int32),
    (TensorProto.INT64, np.int64),
    (TensorProto.UINT64, np.uint64),
    (TensorProto.FLOAT16, np.float16),
    (TensorProto.BOOL, np.bool_),
    (TensorProto.UINT8, np.uint8),
]
_names = st.text(min_size=0, max_size=12)


@st.composite
def random_tensor(draw: st.DrawFn) -> TensorProto:
    elem, dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 70), min_size=0, max_size=2))
    values: np.ndarray = np.arange(int(np.prod(shape))).astype(dtype).reshape(shape)
    name = draw(_names)
    if draw(st.booleans()):
        tensor = numpy_helper.from_array(values, name)  # raw_data
    else:
        tensor = helper.make_tensor(name, elem, list(values.shape), values.flatten().tolist())
    if draw(st.booleans()):
        tensor.doc_string = draw(_names)
    return tensor


@st.composite
def random_graph(draw: st.DrawFn, depth: int = 0) -> onnx.GraphProto:
    initializers = draw(st.lists(random_tensor(), max_size=3))
    nodes = []
    for _ in range(draw(st.integers(0, 3))):
        attributes: dict[str, object] = {}
        if draw(st.booleans()):
            attributes["value"] = draw(random_tensor())
        if draw(st.booleans()):
            attributes["ints"] = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1))
        if draw(st.booleans()):
            attributes["label"] = draw(_names)
        if depth < 2 and draw(st.booleans()):
            attributes["body"] = draw(random_graph(depth + 1))
        if draw(st.booleans()):
            attributes["tensors"] = draw(st.lists(random_tensor(), min_size=1, max_size=2))
        domain = draw(st.sampled_from(["", "com.microsoft", "com.evil"]))
        node = helper.make_node("Op", ["x"], ["y"], domain=domain)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attributes.items())
        nodes.append(node)
    sparse = []
    if draw(st.booleans()):
        values = numpy_helper.from_array(np.arange(80, dtype=np.float32), "sv")
        indices = numpy_helper.from_array(np.arange(80, dtype=np.int64), "si")
        sparse.append(helper.make_sparse_tensor(values, indices, [100]))
    elem = draw(st.sampled_from([TensorProto.FLOAT, TensorProto.BFLOAT16]))
    return helper.make_graph(
        nodes,
        draw(_names),
        [helper.make_tensor_value_info("x", elem, ["N", draw(st.integers(0, 9))])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializers,
        doc_string=draw(_names),
        sparse_initializer=sparse,
    )


@st.composite
def random_model(draw: st.DrawFn) -> onnx.ModelProto:
    model = helper.make_model(draw(random_graph()), opset_imports=[helper.make_opsetid("", 17)])
    if draw(st.booleans()):
        body = helper.make_node("Constant", [], ["c"], value=draw(random_tensor()))
        model.functions.append(helper.make_function("local", "F", [], ["c"], [body], []))
    if draw(st.booleans()):
        helper.set_model_props(model, {draw(_names): draw(_names)})
    if draw(st.booleans()):
        _external(model.graph.initializer.add()).name = "ext"
    return model


@SETTINGS
@given(random_model())
def test_random_models_skeleton_is_the_full_parse_without_weights(model: onnx.ModelProto) -> None:
    data = model.SerializeToString()
    full = full_parse(data)
    assert full is not None
    walked = full_parse(onnx_skeleton.skeleton(data, 0))  # every message walked
    assert walked == cleared(full)
    default = full_parse(onnx_skeleton.skeleton(data))  # small ones copied as they are
    assert default is not None
    assert cleared(default) == cleared(full)
    assert_same_verdict(data)


# --- malformed wire data: protobuf's verdict, always an InvalidModel ---


def _small_model() -> bytes:
    """A small model with every kind of field the walker treats apart: raw and packed
    weights, strings, a subgraph, a sparse initializer, a function, metadata."""
    typed = [
        helper.make_tensor("f", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("i", TensorProto.INT64, [2], [-1, 2**40]),
        helper.make_tensor("d", TensorProto.DOUBLE, [1], [0.5]),
        helper.make_tensor("u", TensorProto.UINT64, [1], [2**63]),
        _strings("s", [b"text"]),
        numpy_helper.from_array(np.arange(4, dtype=np.float32), "r"),
    ]
    branch = helper.make_graph(
        [helper.make_node("Identity", ["r"], ["y"])], "b", [], [_io("y")], initializer=typed[-1:]
    )
    values = numpy_helper.from_array(np.arange(3, dtype=np.float32), "sv")
    indices = numpy_helper.from_array(np.arange(3, dtype=np.int64), "si")
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "small",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [_io("y")],
        initializer=typed,
        sparse_initializer=[helper.make_sparse_tensor(values, indices, [5])],
    )
    body = helper.make_node("Constant", [], ["c"], value=typed[0])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[helper.make_function("local", "F", [], ["c"], [body], [])],
    )
    helper.set_model_props(model, {"k": "v"})
    data: bytes = model.SerializeToString()
    return data


SMALL = _small_model()


def test_every_truncation_of_a_small_model() -> None:
    for end in range(len(SMALL)):
        assert_same_verdict(SMALL[:end])


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    assert_same_verdict(data)


@SETTINGS
@given(st.data())
def test_random_mutations_of_a_small_model(data: st.DataObject) -> None:
    mutated = bytearray(SMALL)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    assert_same_verdict(bytes(mutated))


def _field(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def _nested_graphs(levels: int, padding: int = 0) -> bytes:
    """graph -> node -> attribute -> graph ..., `levels` times (3 messages a level)."""
    graph = b""
    for _ in range(levels):
        doc = _field(10, b"d" * padding) if padding else b""  # GraphProto.doc_string
        graph = _field(1, _field(5, _field(6, graph))) + doc
    return b"\x08\x07" + _field(7, graph)  # ir_version 7, graph


@pytest.mark.parametrize("padding", [0, 300])
def test_nesting_at_and_past_protobufs_limit(padding: int) -> None:
    # 33 levels are 99 messages below the model with the graph: protobuf accepts 100.
    assert assert_same_verdict(_nested_graphs(33, padding)) != NOT_PROTOBUF
    assert assert_same_verdict(_nested_graphs(34, padding)) == NOT_PROTOBUF
    assert skeleton_verdict(_nested_graphs(5000, padding)) == NOT_PROTOBUF


def _wire_cases() -> dict[str, bytes]:
    cases = {
        "huge length": b"\x3a\xff\xff\xff\xff\x0f" + b"\x00" * 64,
        "length of 6 bytes": b"\x08\x07\x3a\x81\x80\x80\x80\x80\x00\x00",
        "length of 5 bytes": b"\x08\x07\x3a\x81\x80\x80\x80\x00\x00",
        "truncated varint": b"\x08\x87",
        "overlong varint": b"\x08" + b"\x80" * 10 + b"\x01",
        "ten byte varint": b"\x08" + b"\xff" * 9 + b"\x01",
        "field number 0": b"\x00\x01",
        "tag of 6 bytes": b"\x88\x80\x80\x80\x80\x00\x01",
        "tag over 32 bits": b"\xf8\xff\xff\xff\x1f\x01",
        "largest field number": b"\xf8\xff\xff\xff\x0f\x01",
        "wire type 6": b"\x0e",
        "wire type 7": b"\x0f",
        "end group alone": b"\x0c",
        "unknown group": b"\x08\x07\xab\x06\x08\x01\xac\x06" + _field(7, b""),
        "group wrong end": b"\xab\x06\x08\x01\xb4\x06",
        "group unclosed": b"\xab\x06\x08\x01",
        "graph as a varint": b"\x08\x07\x38\x01",
        "unknown length field": b"\x08\x07" + _field(99, b"\xff" * 40) + _field(7, b""),
        "fixed truncated": b"\x08\x07\x11\x00\x00",
    }
    tensor = numpy_helper.from_array(np.ones(4, np.float32), "t").SerializeToString()
    payloads = {
        "float_data of 3 bytes": b"\x22\x03abc",
        "double_data of 12 bytes": b"\x52\x0c" + b"\x00" * 12,
        "int64_data overlong": b"\x3a\x0b" + b"\x80" * 10 + b"\x00",
        "int64_data of 10 bytes": b"\x3a\x0a" + b"\xff" * 9 + b"\x02",
        "int32_data truncated": b"\x2a\x02\x05\x80",
        "uint64_data empty": b"\x5a\x00",
        "raw_data as a varint": b"\x48\x05",
        "float_data unpacked": b"\x25abcd\x25abcd",
        "raw_data twice": b"\x4a\x01a\x4a\x02bc",
        "raw_data past the end": b"\x4a\x7fa",
        "end of group in a tensor": b"\x0c",
        "group in a tensor": b"\xab\x06\x08\x01\xac\x06",
        "raw_data with a 2 byte tag": b"\xca\x00\x02ab",
        "raw_data with a 5 byte length": b"\x4a\x82\x80\x80\x80\x00ab",
    }
    for name, payload in payloads.items():
        # a graph initializer longer than VERBATIM_BELOW, so that it is walked
        initializer = _field(5, tensor + payload + _field(12, b"d" * 300))
        cases[name] = b"\x08\x07" + _field(7, initializer)
    return cases


WIRE_CASES = _wire_cases()


@pytest.mark.parametrize("data", WIRE_CASES.values(), ids=WIRE_CASES.keys())
def test_wire_format_edge_cases(data: bytes) -> None:
    assert_same_verdict(data)
    assert_same_verdict(data + SMALL)
    assert_same_verdict(SMALL + data)


def test_long_runs_of_scalar_fields() -> None:
    """Runs of scalar fields (skipped by a regular expression, not a Python step each): many
    dims, unpacked weights, unknown fields, mixed one and two byte tags."""
    tensor = numpy_helper.from_array(np.ones(2, np.float32), "t").SerializeToString()
    runs = [
        b"\x08\x01" * 20_000,  # dims
        b"\x25\x00\x00\x80\x3f" * 20_000,  # float_data, unpacked
        b"\x51" + b"\x00" * 8 + b"\x90\x01\x05" * 10_000,  # double_data, unknown field 18
        b"\x08\x01\x25abcd\x80\x01\x07" * 10_000 + b"\x08\x80",  # ends truncated
    ]
    for run in runs:
        assert_same_verdict(b"\x08\x07" + _field(7, _field(5, tensor + run)))
    assert_same_verdict(SMALL + b"\x10\x01\xc8\x01\x02" * 50_000)  # ModelProto scalars


def test_too_many_fields_to_walk_hands_the_whole_model_to_protobuf() -> None:
    """Past the walk's step budget the model is parsed whole (as before the walker): the
    same verdicts, and no Python step per field of a model of millions of empty fields."""
    assert onnx_skeleton.skeleton(SMALL, max_steps=3) == SMALL
    for data in [SMALL, *WIRE_CASES.values()]:
        try:
            whole = onnx_skeleton.skeleton(data, max_steps=3)
        except onnx_skeleton.MalformedModel:
            assert full_verdict(data) == NOT_PROTOBUF
        else:
            assert full_verdict(whole) == full_verdict(data)
    empties = b"\x08\x07" + _field(7, _field(5, b"\x42\x01t" + b"\x6a\x00" * 5_000_000))
    assert onnx_skeleton.skeleton(empties) == empties
    assert_same_verdict(empties)


# --- memory: checking a model held in a memfd does not copy its weights ---

MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    import onnx
    from onnx import TensorProto, helper
    from blindfold.server.limits import Limits
    from blindfold.server.model_bytes import ModelBytesWriter
    from blindfold.server.onnx_check import check_model

    size = int(sys.argv[1])

    def field(number, body_length):
        out, value = bytearray(), number << 3 | 2
        for v in (value, body_length):
            while v >= 0x80:
                out.append(v & 0x7F | 0x80)
                v >>= 7
            out.append(v)
        return bytes(out)

    # The model is written into the memfd piece by piece: its weights never exist in memory
    # other than in the memfd.
    header = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[size // 4])
    tensor = header.SerializeToString()
    tensor_length = len(tensor) + len(field(9, size)) + size
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size // 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", size // 4])
    node = helper.make_node("Add", ["x", "W"], ["y"])
    graph = helper.make_graph([node], "big", [x], [y]).SerializeToString()
    graph += field(5, tensor_length) + tensor + field(9, size)
    head = helper.make_model(
        helper.make_graph([], "", [], []), opset_imports=[helper.make_opsetid("", 17)]
    )
    head.ClearField("graph")
    writer = ModelBytesWriter()
    writer.write(head.SerializeToString() + field(7, len(graph) + size) + graph)
    chunk = b"\\x3f" * (1 << 20)
    for start in range(0, size, len(chunk)):
        writer.write(chunk[: size - start])
    held = writer.finish()

    def peak():
        status = open("/proc/self/status").read()
        return int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    before = peak()
    with held.view() as view:
        model = check_model(view, Limits())
    print(json.dumps({"grew": (peak() - before) * 1024, "model": len(held),
                      "initializers": len(model.graph.initializer)}))
    """
)


def test_checking_a_large_memfd_model_does_not_copy_its_weights() -> None:
    size = 200 * MiB
    source = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(size)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout)
    assert measured["initializers"] == 1
    assert measured["model"] > size
    assert measured["grew"] < 0.2 * size, measured
