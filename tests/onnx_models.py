"""Small real ONNX models built with onnx.helper, shared by the tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def identity_model(
    elem_type: int, shape: list[int | str] | None = None, name: str = "identity"
) -> onnx.ModelProto:
    shape = shape if shape is not None else ["N", 3]
    x = helper.make_tensor_value_info("x", elem_type, shape)
    y = helper.make_tensor_value_info("y", elem_type, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], name, [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add_mul_model() -> onnx.ModelProto:
    """Two inputs a, b (float32 [N, 4]) -> sum = a + b, product = a * b."""
    return _sum_and_product("add_mul", reverse_outputs=False)


def _sum_and_product(name: str, *, reverse_outputs: bool) -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 4])
    p = helper.make_tensor_value_info("product", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["product"]),
        ],
        name,
        [a, b],
        [p, s] if reverse_outputs else [s, p],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmul_model(size: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x [N, size] @ W [size, size]."""
    weights = np.random.default_rng(seed).standard_normal((size, size)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", size])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [x],
        [y],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def product_sum_model() -> onnx.ModelProto:
    """Like add_mul_model, but declares its outputs as (product, sum): the reverse of the
    order in which its nodes compute them."""
    return _sum_and_product("product_sum", reverse_outputs=True)


def gather_model(rows: int = 5) -> onnx.ModelProto:
    """indices (int64 [N]) -> Gather(table [rows, 2], indices): out-of-range indices fail."""
    table = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    indices = helper.make_tensor_value_info("indices", TensorProto.INT64, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "indices"], ["y"], axis=0)],
        "gather",
        [indices],
        [y],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external_data_model(location: str = "../../etc/passwd") -> onnx.ModelProto:
    """x + W where the initializer W claims to live in an external file at `location`."""
    weights = TensorProto()
    weights.name = "W"
    weights.data_type = TensorProto.FLOAT
    weights.dims.extend([3])
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "12")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "external", [x], [y], initializer=[weights]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def custom_domain_model(domain: str = "com.evil") -> onnx.ModelProto:
    """One node of a custom operator domain that onnxruntime does not ship."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(
        [helper.make_node("Pwn", ["x"], ["y"], domain=domain)], "custom", [x], [y]
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    )


def weights_model(megabytes: int, seed: int = 0) -> onnx.ModelProto:
    """y = x @ W with W a random float32 [1024, megabytes * 256]: `megabytes` MiB of weights
    that no compression or deduplication can shrink."""
    columns = megabytes * 256
    weights = np.random.default_rng(seed).random((1024, columns), dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", columns])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "weights",
        [x],
        [y],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
