"""Static checks of uploaded ONNX bytes before onnxruntime ever sees them.

Refuses what would let a model read the host's files (external data), load code the server
does not ship (unknown custom-op domains), or exhaust memory through declared shapes.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from google.protobuf.message import DecodeError

from blindfold.errors import RequestRejected
from blindfold.server.limits import Limits

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


def check_model(data: bytes, limits: Limits) -> onnx.ModelProto:
    """Parses and checks `data`; raises RequestRejected(400) naming the problem."""
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        raise _bad("the uploaded bytes are not an ONNX model (protobuf parse failed)") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise _bad("the uploaded bytes are not an ONNX model (no graph or IR version)")
    _check_external_data(model)
    _check_domains(model)
    _check_declared_shapes(model, limits)
    return model


def _bad(message: str) -> RequestRejected:
    return RequestRejected(400, message)


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


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors


def _check_external_data(model: onnx.ModelProto) -> None:
    for graph in _all_graphs(model):
        for tensor in _tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                raise _bad(
                    f"tensor {tensor.name!r} references external data; the server only accepts "
                    "self-contained models. Re-save it with onnx.save_model(model, path, "
                    "save_as_external_data=False)"
                )


def _check_domains(model: onnx.ModelProto) -> None:
    local = {function.domain for function in model.functions}
    known = ONNXRUNTIME_DOMAINS | local
    for opset in model.opset_import:
        if opset.domain not in known:
            raise _bad(
                f"the model imports operator domain {opset.domain!r}, which onnxruntime does "
                "not ship; custom operators cannot be loaded into the TEE"
            )
    for graph in _all_graphs(model):
        for node in graph.node:
            if node.domain not in known:
                raise _bad(
                    f"node {node.name!r} uses operator {node.domain}::{node.op_type}, which "
                    "onnxruntime does not ship; custom operators cannot be loaded into the TEE"
                )


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
