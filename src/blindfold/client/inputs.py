"""Turning what users pass to `run_model` (numpy, torch, lists, dicts) into named arrays
that match the model's declared inputs, with a clear error instead of silent casting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from blindfold import tensors
from blindfold.errors import InputError


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_array(value: Any, name: str, datatype: str, dtype: Any = None) -> np.ndarray:
    if _is_torch(value):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        array: np.ndarray = value if dtype is None else value.astype(dtype, copy=False)
        found = tensors.np_to_oip_dtype(array.dtype)
        if found != datatype:
            raise InputError(
                f"input {name!r} is {array.dtype} ({found}) but the model expects {datatype}; "
                f"convert it, e.g. array.astype({tensors.oip_to_np_dtype(datatype).name!r})"
                if datatype != "BYTES"
                else f"input {name!r} is {array.dtype} but the model expects strings (BYTES)"
            )
        return array
    if isinstance(value, (list, tuple, int, float, bool, str, bytes)):
        target = dtype if dtype is not None else tensors.oip_to_np_dtype(datatype)
        try:
            array = np.array(value, dtype=target)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"input {name!r} cannot be converted to {target}: {exc}") from None
        return to_array(array, name, datatype)
    raise InputError(
        f"input {name!r} is a {type(value).__name__}; pass a numpy array, a torch tensor or "
        "a nested list"
    )


def normalize_inputs(
    inputs: Any, declared: Sequence[Mapping[str, Any]], dtype: Any = None
) -> dict[str, np.ndarray]:
    """`declared` is the model metadata's "inputs" list (name, datatype, shape)."""
    names = [spec["name"] for spec in declared]
    types = {spec["name"]: spec["datatype"] for spec in declared}
    if isinstance(inputs, Mapping):
        unknown = [key for key in inputs if key not in types]
        if unknown:
            raise InputError(f"unknown inputs {unknown}; the model's inputs are {names}")
        missing = [key for key in names if key not in inputs]
        if missing:
            raise InputError(f"missing inputs {missing}; the model's inputs are {names}")
        return {key: to_array(inputs[key], key, types[key], dtype) for key in names}
    positional = (
        isinstance(inputs, (list, tuple))
        and inputs
        and all(isinstance(item, np.ndarray) or _is_torch(item) for item in inputs)
    )
    if positional:
        if len(inputs) != len(names):
            raise InputError(
                f"{len(inputs)} positional inputs given, the model has {len(names)}: {names}"
            )
        return {
            key: to_array(item, key, types[key], dtype)
            for key, item in zip(names, inputs, strict=True)
        }
    if len(names) != 1:
        raise InputError(
            f"the model has {len(names)} inputs {names}; pass a list of arrays or a dict by name"
        )
    return {names[0]: to_array(inputs, names[0], types[names[0]], dtype)}
