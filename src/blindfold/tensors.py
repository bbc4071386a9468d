"""The one datatype table (Open Inference Protocol <-> numpy <-> ONNX) and the tensor codecs.

Every part of Blindfold (server, SDK, CLI, receipts) converts tensors through this module,
so the wire format is defined exactly once: fixed-size types travel as contiguous
little-endian bytes, BYTES tensors as a 4-byte little-endian length before each element
(Triton's binary tensor data extension).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from blindfold.errors import InputError


@dataclass(frozen=True)
class DataType:
    oip: str  # Open Inference Protocol name, e.g. "FP32"
    numpy: np.dtype[Any]  # little-endian numpy dtype (object for BYTES)
    onnx: int  # onnx.TensorProto element type
    ort: str  # onnxruntime type string, e.g. "tensor(float)"
    # BlindAI 0.6's ModelDatumType (its integer code and name), for its wire-compatible ports;
    # None where BlindAI has no such type.
    blindai: tuple[int, str] | None = None


# Values of onnx.TensorProto.DataType, written out so the SDK does not need to import onnx.
_TABLE = [
    DataType("BOOL", np.dtype("bool"), 9, "tensor(bool)", (10, "Bool")),
    DataType("UINT8", np.dtype("<u1"), 2, "tensor(uint8)", (6, "U8")),
    DataType("UINT16", np.dtype("<u2"), 4, "tensor(uint16)", (7, "U16")),
    DataType("UINT32", np.dtype("<u4"), 12, "tensor(uint32)", (4, "U32")),
    DataType("UINT64", np.dtype("<u8"), 13, "tensor(uint64)", (5, "U64")),
    DataType("INT8", np.dtype("<i1"), 3, "tensor(int8)", (8, "I8")),
    DataType("INT16", np.dtype("<i2"), 5, "tensor(int16)", (9, "I16")),
    DataType("INT32", np.dtype("<i4"), 6, "tensor(int32)", (2, "I32")),
    DataType("INT64", np.dtype("<i8"), 7, "tensor(int64)", (3, "I64")),
    DataType("FP16", np.dtype("<f2"), 10, "tensor(float16)"),
    DataType("FP32", np.dtype("<f4"), 1, "tensor(float)", (0, "F32")),
    DataType("FP64", np.dtype("<f8"), 11, "tensor(double)", (1, "F64")),
    DataType("BYTES", np.dtype("O"), 8, "tensor(string)"),
]
_BY_OIP = {d.oip: d for d in _TABLE}
_BY_ONNX = {d.onnx: d for d in _TABLE}
_BY_ORT = {d.ort: d for d in _TABLE}
_BY_BLINDAI: dict[int | str, DataType] = {}
for _entry in _TABLE:
    if _entry.blindai is not None:
        _BY_BLINDAI.update(dict.fromkeys(_entry.blindai, _entry))
SUPPORTED_DATATYPES = tuple(_BY_OIP)


def by_oip(name: str) -> DataType:
    try:
        return _BY_OIP[name]
    except KeyError:
        raise InputError(
            f"unknown datatype {name!r}; expected one of {', '.join(SUPPORTED_DATATYPES)}"
        ) from None


def by_blindai(datum_type: object) -> DataType:
    """The entry for a BlindAI 0.6 `datum_type`: its integer code (F32 = 0 ... Bool = 10), or
    its name as a string ("F32", "Bool")."""
    entry = None
    if isinstance(datum_type, int | str) and not isinstance(datum_type, bool):
        entry = _BY_BLINDAI.get(datum_type)
    if entry is None:
        known = ", ".join(f"{d.blindai[1]}={d.blindai[0]}" for d in _TABLE if d.blindai)
        raise InputError(f"unknown BlindAI datum_type {str(datum_type)[:40]!r}; expected {known}")
    return entry


def by_ort(type_string: str) -> DataType | None:
    """The entry for an onnxruntime type string, or None for types numpy cannot represent."""
    return _BY_ORT.get(type_string)


def by_onnx(elem_type: int) -> DataType | None:
    return _BY_ONNX.get(elem_type)


def np_to_oip_dtype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype (str/bytes/object arrays are BYTES)."""
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    for entry in _TABLE:
        if entry.numpy.kind == dtype.kind and entry.numpy.itemsize == dtype.itemsize:
            return entry.oip
    raise InputError(
        f"numpy dtype {dtype} has no Open Inference Protocol datatype; convert the array to "
        f"one of {', '.join(SUPPORTED_DATATYPES)}"
    )


def oip_to_np_dtype(name: str) -> np.dtype[Any]:
    return by_oip(name).numpy


# numpy refuses more dimensions, and shapes whose non-zero dimensions multiply (times the
# item size) beyond its index type, even when a zero dimension leaves the tensor empty.
MAX_DIMENSIONS = 64
MAX_SPAN = 2**59


def element_count(shape: Sequence[int]) -> int:
    if len(shape) > MAX_DIMENSIONS:
        raise InputError(
            f"shape has {len(shape)} dimensions; at most {MAX_DIMENSIONS} are supported"
        )
    count = 1
    span = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise InputError(
                f"shape {_short_shape(shape)} is invalid: dimensions must be integers >= 0"
            )
        count *= dim
        span *= max(dim, 1)
    # A non-empty shape this large is refused by callers' element limits (or its byte size).
    if count == 0 and span > MAX_SPAN:
        raise InputError(
            f"shape {_short_shape(shape)} is too large: even with a zero dimension, the "
            "product of its other dimensions must stay below 2**59"
        )
    return count


def _short_shape(shape: Sequence[Any]) -> str:
    text = str(list(shape))
    return text if len(text) <= 200 else text[:200] + "...]"


# --- BYTES codec ---


def serialize_byte_tensor(array: np.ndarray) -> bytes:
    """Each element as a 4-byte little-endian length followed by its bytes, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_byte_tensor(buffer: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of serialize_byte_tensor; the buffer must hold exactly `count` elements."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(view):
            raise InputError(
                f"BYTES tensor data ends after {index} of {count} elements; "
                "each element needs a 4-byte length prefix"
            )
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InputError(
                f"BYTES tensor element {index} declares {length} bytes but only "
                f"{len(view) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise InputError(
            f"BYTES tensor data has {len(view) - offset} bytes after its {count} elements"
        )
    result = np.empty(count, dtype=object)
    result[:] = items
    return result


# --- whole tensors ---


def tensor_to_bytes(array: np.ndarray) -> bytes | memoryview:
    """The wire bytes of a tensor; fixed-size types are returned without a copy when the
    array is already contiguous and little-endian."""
    if array.dtype.kind in ("U", "S", "O"):
        return serialize_byte_tensor(array)
    wire = by_oip(np_to_oip_dtype(array.dtype)).numpy
    if array.dtype != wire or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=wire)
    if array.size == 0:
        return b""  # memoryview.cast refuses shapes with a zero dimension
    return array.data.cast("B")


def tensor_from_bytes(
    buffer: bytes | memoryview, datatype: str, shape: Sequence[int]
) -> np.ndarray:
    """Decodes wire bytes into an array of `shape`; the size must match exactly."""
    entry = by_oip(datatype)
    count = element_count(shape)
    if entry.oip == "BYTES":
        return deserialize_byte_tensor(buffer, count).reshape(tuple(shape))
    expected = count * entry.numpy.itemsize
    if len(buffer) != expected:
        raise InputError(
            f"{datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(buffer)}"
        )
    array = np.frombuffer(buffer, dtype=entry.numpy)
    return array.reshape(tuple(shape))


def tensor_from_json(data: Any, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """Decodes the JSON `data` of an OIP tensor (flat or nested, row-major)."""
    entry = by_oip(datatype)
    count = element_count(shape)
    if entry.oip == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1)
        if flat.size != count:
            raise InputError(
                f"BYTES tensor of shape {list(shape)} needs {count} elements, got {flat.size}"
            )
        try:
            values = [v.encode("utf-8") if isinstance(v, str) else v for v in flat]
        except UnicodeEncodeError:  # JSON can spell lone surrogates, which UTF-8 cannot
            raise InputError("BYTES tensor elements must be valid Unicode text") from None
        if not all(isinstance(v, bytes) for v in values):
            raise InputError("BYTES tensor elements must be strings")
        out = np.empty(count, dtype=object)
        out[:] = values
        return out.reshape(tuple(shape))
    try:
        array = np.asarray(data, dtype=entry.numpy)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"tensor data cannot be read as {datatype}") from None
    if array.size != count:
        raise InputError(
            f"{datatype} tensor of shape {list(shape)} needs {count} elements, got {array.size}"
        )
    return array.reshape(tuple(shape))


def tensor_to_json_data(array: np.ndarray) -> list[Any]:
    """Flat row-major JSON values (BYTES as UTF-8 text where possible)."""
    if array.dtype.kind in ("U", "S", "O"):
        values = []
        for item in array.reshape(-1):
            if isinstance(item, bytes):
                try:
                    values.append(item.decode("utf-8"))
                except UnicodeDecodeError:
                    raise InputError(
                        "BYTES data is not UTF-8 text, which JSON cannot carry"
                    ) from None
            else:
                values.append(str(item))
        return values
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # Bare NaN/Infinity is not JSON, and the Open Inference Protocol defines no spelling.
        raise InputError("the data holds NaN or infinite values, which JSON cannot carry")
    flat: list[Any] = array.reshape(-1).tolist()
    return flat
