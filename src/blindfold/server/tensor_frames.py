"""How tensors cross between the front process and a model worker: one message on a
SOCK_SEQPACKET socket holding a small JSON header, plus either the tensor bytes inline (small
tensors) or one sealed memfd holding them (large tensors, never pickled, copied once).

Both directions use this module. The front process treats everything a worker sends as
hostile (the worker runs an untrusted model inside a large C++ runtime): headers are JSON,
never pickle; every name, datatype, shape and offset is checked against the buffer before a
view is made; and a memfd from a worker is mapped only once it is sealed against shrinking
and writing, so the worker can neither crash the front with SIGBUS nor change bytes after
they were checked.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from blindfold import tensors
from blindfold.errors import InputError

# One message holds the header and, when they fit, the tensor bytes: a Unix socket's default
# buffer (212992 bytes) bounds a SOCK_SEQPACKET message, so up to 200 KiB travel inline and
# larger tensors go through a memfd.
MAX_MESSAGE = 200 * 1024
MAX_DIMS = 64
_ALIGN = 64
_LENGTH = struct.Struct("<I")
_REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class FrameError(Exception):
    """A message broke the framing contract (only a misbehaving worker sends one)."""


@dataclass
class Message:
    header: dict[str, Any]
    data: memoryview  # the inline bytes or the mapped memfd (empty when there are none)


def send(sock: socket.socket, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
    """Sends `header` plus `arrays`; adds `header["tensors"]` describing where each lies."""
    # BYTES tensors are serialized once, here; fixed-size ones are copied straight in.
    parts = [tensors.serialize_byte_tensor(a) if _is_bytes(a) else a for a in arrays]
    sizes = [len(p) if isinstance(p, bytes) else p.size * _wire_dtype(p).itemsize for p in parts]
    offsets, total = _layout(sizes)
    descriptors = [
        {
            "datatype": tensors.np_to_oip_dtype(a.dtype),
            "shape": list(a.shape),
            "offset": o,
            "nbytes": n,
        }
        for a, o, n in zip(arrays, offsets, sizes, strict=True)
    ]
    encoded = json.dumps({**header, "tensors": descriptors}).encode()
    if _LENGTH.size + len(encoded) + total <= MAX_MESSAGE:
        payload = bytearray(total)
        _write(memoryview(payload), parts, offsets)
        sock.sendall(_LENGTH.pack(len(encoded)) + encoded + payload)
        return
    fd = os.memfd_create("blindfold-tensors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, total)
        # pwrite, not a mapping: the kernel fills the file's pages in one pass, where writing
        # through a fresh mapping takes one page fault per 4 KiB.
        for part, offset in zip(parts, offsets, strict=True):
            data = part if isinstance(part, bytes) else _contiguous_bytes(part)
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], offset + written)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        socket.send_fds(sock, [_LENGTH.pack(len(encoded)) + encoded], [fd])
    finally:
        os.close(fd)


def receive(sock: socket.socket) -> Message | None:
    """The next message, or None when the peer closed the socket."""
    raw, fds, _flags, _address = socket.recv_fds(sock, MAX_MESSAGE, 1)
    if not raw:
        for fd in fds:
            os.close(fd)
        return None
    try:
        if len(raw) < _LENGTH.size:
            raise FrameError("message shorter than its length prefix")
        (length,) = _LENGTH.unpack_from(raw)
        if _LENGTH.size + length > len(raw):
            raise FrameError("message header is longer than the message")
        try:
            header = json.loads(raw[_LENGTH.size : _LENGTH.size + length])
        except (ValueError, RecursionError):
            raise FrameError("message header is not JSON") from None
        if not isinstance(header, dict):
            raise FrameError("message header is not a JSON object")
        inline = memoryview(raw)[_LENGTH.size + length :]
        if not fds:
            return Message(header, inline)
        if len(fds) != 1 or len(inline):
            raise FrameError("a message carries either inline data or one memfd")
        return Message(header, _map_sealed(fds[0]))
    finally:
        for fd in fds:
            os.close(fd)


def sealed_memfd(data: bytes | memoryview, name: str = "blindfold-model") -> int:
    """A memfd holding `data`, sealed so nobody can change or resize it afterwards."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(data))
        if len(data):
            with mmap.mmap(fd, len(data)) as mapped:
                mapped[:] = data
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        return fd
    except BaseException:
        os.close(fd)
        raise


def send_sealed(sock: socket.socket, header: dict[str, Any], fd: int) -> None:
    """Sends `header` with an already sealed memfd (the caller keeps its descriptor)."""
    encoded = json.dumps(header).encode()
    socket.send_fds(sock, [_LENGTH.pack(len(encoded)) + encoded], [fd])


def arrays_of(message: Message, expected_names: Sequence[str] | None = None) -> list[np.ndarray]:
    """The tensors a message describes, as views on its data, after checking every field.
    Raises FrameError when the description does not fit the data."""
    descriptors = message.header.get("tensors")
    if not isinstance(descriptors, list):
        raise FrameError("message has no tensor list")
    if expected_names is not None and len(descriptors) != len(expected_names):
        raise FrameError(f"expected {len(expected_names)} tensors, got {len(descriptors)}")
    return [_array(message.data, descriptor) for descriptor in descriptors]


def _array(data: memoryview, descriptor: Any) -> np.ndarray:
    if not isinstance(descriptor, dict):
        raise FrameError("tensor descriptor is not an object")
    datatype, shape = descriptor.get("datatype"), descriptor.get("shape")
    offset, nbytes = descriptor.get("offset"), descriptor.get("nbytes")
    if not isinstance(datatype, str) or datatype not in tensors.SUPPORTED_DATATYPES:
        raise FrameError("tensor datatype is not one Blindfold knows")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(dim) is int and 0 <= dim < 1 << 62 for dim in shape)
    ):
        raise FrameError("tensor shape is not a list of at most 64 non-negative integers")
    if not isinstance(offset, int) or not isinstance(nbytes, int):
        raise FrameError("tensor offset and size must be integers")
    if offset < 0 or nbytes < 0 or offset + nbytes > len(data):
        raise FrameError("tensor bytes lie outside the message's data")
    try:
        return tensors.tensor_from_bytes(data[offset : offset + nbytes], datatype, shape)
    except InputError as exc:
        raise FrameError(f"tensor bytes do not match their description: {exc}") from None


def _is_bytes(array: np.ndarray) -> bool:
    return array.dtype.kind in ("U", "S", "O")


def _wire_dtype(array: np.ndarray) -> np.dtype[Any]:
    return tensors.oip_to_np_dtype(tensors.np_to_oip_dtype(array.dtype))


def _layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    offsets, position = [], 0
    for size in sizes:
        offsets.append(position)
        position += -(-size // _ALIGN) * _ALIGN
    return offsets, position


def _write(view: memoryview, parts: Sequence[np.ndarray | bytes], offsets: Sequence[int]) -> None:
    for part, offset in zip(parts, offsets, strict=True):
        if isinstance(part, bytes):
            view[offset : offset + len(part)] = part
        elif part.size:
            target = np.frombuffer(view, _wire_dtype(part), part.size, offset)
            target.reshape(part.shape)[...] = part  # the one copy of this tensor


def _contiguous_bytes(array: np.ndarray) -> memoryview:
    wire = np.ascontiguousarray(array, dtype=_wire_dtype(array))  # a copy only if needed
    return wire.data.cast("B") if wire.size else memoryview(b"")


def _map_sealed(fd: int) -> memoryview:
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
        raise FrameError("tensor memfd is not sealed against writing and resizing")
    size = os.fstat(fd).st_size
    if size == 0:
        return memoryview(b"")
    # MAP_POPULATE maps every page now, in one call, instead of faulting them in one by one.
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(fd, size, flags, mmap.PROT_READ))
