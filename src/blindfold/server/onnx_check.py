"""Static checks of uploaded ONNX bytes before onnxruntime ever sees them.

Refuses what would let a model read the host's files (external data in any tensor anywhere
in the protobuf), load code the server does not ship (unknown custom-op domains), hold text
onnxruntime's Python API cannot return (strings that are not UTF-8), exchange values the Open
Inference Protocol cannot carry (non-tensor or unsupported-dtype inputs and outputs), or
exhaust memory through declared shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from blindfold import tensors
from blindfold.server import onnx_skeleton, ort_extensions
from blindfold.server.limits import Limits
from blindfold.server.refusals import InvalidModel

# Operator domains implemented by the onnxruntime wheel itself (CPU execution provider).
ONNXRUNTIME_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.preview",  # ONNX's own preview operators (e.g. FlexAttention)
        "ai.onnx.preview.training",
        "com.microsoft",
        "com.microsoft.nchwc",
        "com.microsoft.experimental",
        "com.ms.internal.nhwc",
    }
)


def check_model(data: bytes | memoryview, limits: Limits) -> onnx.ModelProto:
    """Checks `data` (bytes, or a view of a sealed memfd); raises InvalidModel naming the
    problem. Returns the checked model without its weights: what is parsed is the model's
    skeleton (`onnx_skeleton`), so checking never holds a second copy of the weights, and
    protobuf never holds a reference to `data` (a mapping stays closable after a failure)."""
    try:
        stripped = onnx_skeleton.skeleton(data)
    except onnx_skeleton.MalformedModel:
        raise _bad(_NOT_PROTOBUF) from None
    return check_parsed(_parse(stripped), limits)


def _parse(data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise _bad(_NOT_PROTOBUF) from None
    return model


_NOT_PROTOBUF = "the uploaded bytes are not an ONNX model (protobuf parse failed)"


def check_parsed(model: onnx.ModelProto, limits: Limits) -> onnx.ModelProto:
    """The checks of a parsed model (its weights are never read)."""
    if not model.HasField("graph") or model.ir_version <= 0:
        raise _bad("the uploaded bytes are not an ONNX model (no graph or IR version)")
    _check_every_message(model)
    _check_domains(model, limits.ort_extensions)
    _check_io_types(model)
    _check_declared_shapes(model, limits)
    return model


def _bad(message: str) -> InvalidModel:
    return InvalidModel(message)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graphs(subgraph)


def _all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    yield from _graphs(model.graph)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    yield from _graphs(attribute.g)


# Where a message sits: (parent's location, field name, index in a repeated field or None).
# Built as tuples while walking and spelled out only for an error message.
Location = tuple[Any, str, int | None] | None
Fields = list[tuple[FieldDescriptor, Any]]


def _messages(model: onnx.ModelProto) -> Iterator[tuple[Location, Message, Fields]]:
    """Every message inside `model`, with its location and set fields, found from the protobuf
    descriptors, so a field added to ONNX later cannot be missed."""
    stack: list[tuple[Location, Message]] = [(None, model)]
    while stack:
        location, message = stack.pop()
        fields = _set_fields(message)
        yield location, message, fields
        for field, value in fields:
            if field.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            if _is_repeated(field):
                stack.extend(((location, field.name, i), item) for i, item in enumerate(value))
            else:
                stack.append(((location, field.name, None), value))


# The field types the checks read. Reading a bytes field (a tensor's raw_data) would copy it
# into a Python object: ListFields() would briefly hold every initializer a second time.
_READ_TYPES = (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING)


def _set_fields(message: Message) -> Fields:
    """The set message and string fields of `message` (as ListFields, without the rest)."""
    fields: Fields = []
    for field in message.DESCRIPTOR.fields:
        if field.type not in _READ_TYPES:
            continue
        if _is_repeated(field):
            value = getattr(message, field.name)
            if len(value):
                fields.append((field, value))
        elif message.HasField(field.name):
            fields.append((field, getattr(message, field.name)))
    return fields


def _spell(location: Location, field: str | None = None) -> str:
    parts = [] if field is None else [f".{field}"]
    while location is not None:
        location, name, index = location
        parts.append(f".{name}" if index is None else f".{name}[{index}]")
    return "model" + "".join(reversed(parts))


_REPEATED: dict[FieldDescriptor, bool] = {}


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = _REPEATED.get(field)
    if repeated is None:
        flag = getattr(field, "is_repeated", None)  # protobuf >= 5.29; `label` is deprecated
        if flag is None:
            flag = field.label == FieldDescriptor.LABEL_REPEATED
        repeated = _REPEATED[field] = bool(flag)
    return repeated


def _check_every_message(model: onnx.ModelProto) -> None:
    """External data in any tensor (initializers, sparse tensors, attributes, function
    bodies, subgraphs at any depth, training info) and text that is not UTF-8."""
    for location, message, fields in _messages(model):
        if isinstance(message, onnx.TensorProto) and (
            message.data_location == onnx.TensorProto.EXTERNAL or message.external_data
        ):
            raise _bad(
                f"tensor {message.name!r} at {_spell(location)} references external data; the "
                "server only accepts self-contained models. Re-save it with "
                "onnx.save_model(model, path, save_as_external_data=False)"
            )
        for field, value in fields:
            if field.type != FieldDescriptor.TYPE_STRING:
                continue
            # protobuf hands out string fields that are not UTF-8 as bytes; onnxruntime's
            # Python API cannot return them (e.g. a symbolic dimension name) to anyone.
            if bytes in (map(type, value) if _is_repeated(field) else (type(value),)):
                raise _bad(
                    f"the model's {_spell(location, field.name)} is not valid UTF-8 text; "
                    "ONNX requires names and other strings to be UTF-8"
                )


def _check_domains(model: onnx.ModelProto, extensions: bool) -> None:
    local = {function.domain for function in model.functions}
    known = ONNXRUNTIME_DOMAINS | local
    if extensions:
        known |= {ort_extensions.DOMAIN}
    for opset in model.opset_import:
        if opset.domain not in known:
            raise _bad(
                f"the model imports operator domain {opset.domain!r}, which onnxruntime does "
                "not ship; custom operators cannot be loaded into the TEE"
                + _extensions_hint(opset.domain, extensions)
            )
    for graph in _all_graphs(model):
        for node in graph.node:
            if node.domain not in known:
                raise _bad(
                    f"node {node.name!r} uses operator {node.domain}::{node.op_type}, which "
                    "onnxruntime does not ship; custom operators cannot be loaded into the TEE"
                    + _extensions_hint(node.domain, extensions)
                )


def _extensions_hint(domain: str, extensions: bool) -> str:
    if domain == ort_extensions.DOMAIN and not extensions:
        return (
            " (this server does not enable onnxruntime-extensions; its operator can start it "
            "with --enable-ort-extensions)"
        )
    return " (other than onnxruntime-extensions' ai.onnx.contrib)" if extensions else ""


def _check_io_types(model: onnx.ModelProto) -> None:
    """The Open Inference Protocol carries tensors of the types in blindfold.tensors only;
    anything else (sequences, maps, optionals, bfloat16, float8, int4...) is refused here
    rather than failing, or being mislabelled, at inference time."""
    supported = ", ".join(tensors.SUPPORTED_DATATYPES)
    for role, infos in (("input", model.graph.input), ("output", model.graph.output)):
        for info in infos:
            kind = info.type.WhichOneof("value")
            if kind != "tensor_type":
                what = _TYPE_KINDS.get(kind or "", "value of no declared type")
                raise _bad(
                    f"model {role} {info.name!r} is a {what}; the server exchanges plain "
                    f"tensors only ({supported}). Export the model so that every graph {role} "
                    "is a tensor"
                )
            element = info.type.tensor_type.elem_type
            if tensors.by_onnx(element) is None:
                raise _bad(
                    f"model {role} {info.name!r} has element type {_element_name(element)}, "
                    f"which the server does not support (it supports {supported}); add a Cast "
                    "to a supported type, e.g. FLOAT, at that end of the graph"
                )


def _element_name(element: int) -> str:
    if element in onnx.TensorProto.DataType.values():
        return str(onnx.TensorProto.DataType.Name(element))
    return str(element)


_TYPE_KINDS = {
    "sequence_type": "sequence",
    "map_type": "map",
    "optional_type": "optional value",
    "sparse_tensor_type": "sparse tensor",
    "opaque_type": "opaque value",
}


def _check_declared_shapes(model: onnx.ModelProto, limits: Limits) -> None:
    graph = model.graph
    for info in (*graph.input, *graph.output, *graph.value_info):
        if not info.type.HasField("tensor_type"):
            continue
        count = 1
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                count *= max(dim.dim_value, 0)
        if count > limits.max_tensor_elements:
            raise _bad(
                f"tensor {info.name!r} declares {count} elements, more than the server's limit "
                f"of {limits.max_tensor_elements} (--max-tensor-elements)"
            )
    for tensor in graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= max(dim, 0)
        if count > limits.max_tensor_elements:
            raise _bad(
                f"initializer {tensor.name!r} declares {count} elements, more than the server's "
                f"limit of {limits.max_tensor_elements} (--max-tensor-elements)"
            )
