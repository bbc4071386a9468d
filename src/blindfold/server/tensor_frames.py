"""How tensors cross between the front process and a model worker: one message on a
SOCK_SEQPACKET socket holding a small JSON header, plus the tensor bytes in one of three
places (never pickled, copied once): inline in the message (small tensors), in a shared
buffer the front process made for the run's slot and both sides reuse from run to run (the
usual place for large tensors: its pages are already mapped, so a megabyte costs a memcpy,
not 256 page faults), or in a fresh sealed memfd (tensors larger than any shared buffer).

Both directions use this module. The front process treats everything a worker sends as
hostile (the worker runs an untrusted model inside a large C++ runtime): headers are JSON,
never pickle; every name, datatype, shape and offset is checked against the buffer before a
view is made; and a memfd from a worker is mapped only once it is sealed against shrinking
and writing, so the worker can neither crash the front with SIGBUS nor change bytes after
they were checked. Shared buffers are sealed against resizing, and the front copies a
worker's answer out of one before it checks a single byte of it.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from blindfold import tensors
from blindfold.errors import InputError

# One message holds the header and, when they fit, the tensor bytes: a Unix socket's default
# buffer (212992 bytes) bounds a SOCK_SEQPACKET message, so up to 200 KiB travel inline and
# larger tensors go through a memfd.
MAX_MESSAGE = 200 * 1024
# Tensors smaller than this travel inline even when a shared buffer has room: one socket
# message carries them as cheaply.
SHARED_FROM = 32 * 1024
MAX_DIMS = 64
_ALIGN = 64
_LENGTH = struct.Struct("<I")
_RESIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_REQUIRED_SEALS = _RESIZE_SEALS | fcntl.F_SEAL_WRITE


class FrameError(Exception):
    """A message broke the framing contract (only a misbehaving worker sends one)."""


@dataclass
class Message:
    header: dict[str, Any]
    # The inline bytes or the mapped memfd (empty when there are none, or when the header's
    # "data" is "shared": the receiver then points this at the slot's shared buffer).
    data: memoryview
    # Descriptors that came with the message beyond its data memfd (a slot's new shared
    # buffers); the receiver owns them and must close them.
    fds: list[int] = field(default_factory=list)


class SharedBuffer:
    """A memfd that the front process makes and both processes map read-write, reused by
    the runs of one slot. It is sealed against resizing: neither side can shrink it under
    the other's mapping (which would make that side's next access die of SIGBUS)."""

    def __init__(self, fd: int) -> None:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & _RESIZE_SEALS != _RESIZE_SEALS:
            raise FrameError("shared buffer is not sealed against resizing")
        self.fd = fd
        self.size = os.fstat(fd).st_size
        # MAP_POPULATE: every page is mapped once, here, instead of faulting on each run.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(fd, self.size, flags) if self.size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    @classmethod
    def create(cls, size: int) -> SharedBuffer:
        fd = os.memfd_create("blindfold-shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _RESIZE_SEALS | fcntl.F_SEAL_SEAL)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Closes the descriptor and unmaps, or leaves the unmapping to the garbage collector
        while a view on the buffer still lives."""
        os.close(self.fd)
        try:
            self.view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:
            pass


def send(
    sock: socket.socket,
    header: dict[str, Any],
    arrays: Sequence[np.ndarray] = (),
    *,
    shared: memoryview | None = None,
    fds: Sequence[int] = (),
) -> None:
    """Sends `header` plus `arrays` (and `fds`, which the caller keeps); adds
    `header["tensors"]` describing where each tensor lies and `header["data"]` saying where
    their bytes are: "inline", "memfd", or "shared" (written into `shared`, when given and
    large enough)."""
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
    header = {**header, "tensors": descriptors, "nbytes": total}
    if shared is not None and SHARED_FROM <= total <= len(shared):
        _write(shared, parts, offsets)
        _send_header(sock, {**header, "data": "shared"}, fds)
        return
    encoded = orjson.dumps({**header, "data": "inline"})
    if _LENGTH.size + len(encoded) + total <= MAX_MESSAGE:
        payload = bytearray(total)
        _write(memoryview(payload), parts, offsets)
        message = _LENGTH.pack(len(encoded)) + encoded + payload
        if fds:
            socket.send_fds(sock, [message], list(fds))
        else:
            sock.sendall(message)
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
        _send_header(sock, {**header, "data": "memfd"}, [fd, *fds])
    finally:
        os.close(fd)


def _send_header(sock: socket.socket, header: dict[str, Any], fds: Sequence[int]) -> None:
    encoded = orjson.dumps(header)
    socket.send_fds(sock, [_LENGTH.pack(len(encoded)) + encoded], list(fds))


def receive(
    sock: socket.socket, *, nonblocking: bool = False, extra_fds: bool = False
) -> Message | None:
    """The next message, or None when the peer closed the socket. With `nonblocking`, raises
    BlockingIOError when no message is waiting. Descriptors beyond the data memfd are
    refused unless `extra_fds` (the worker accepts its slots' buffers; the front accepts
    nothing more from a worker)."""
    raw, fds = _receive_with_fds(sock, socket.MSG_DONTWAIT if nonblocking else 0)
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
            header = orjson.loads(memoryview(raw)[_LENGTH.size : _LENGTH.size + length])
        except (ValueError, RecursionError):
            raise FrameError("message header is not JSON") from None
        if not isinstance(header, dict):
            raise FrameError("message header is not a JSON object")
        inline = memoryview(raw)[_LENGTH.size + length :]
        placement = header.get("data", "memfd" if fds else "inline")
        data_fds = 1 if placement == "memfd" else 0
        if placement not in ("inline", "memfd", "shared") or len(fds) < data_fds:
            raise FrameError("message data is neither inline, in a memfd, nor shared")
        if len(inline) and placement != "inline":
            raise FrameError("a message carries either inline data or one memfd")
        if len(fds) > data_fds and not extra_fds:
            raise FrameError("message carries descriptors it should not")
        data = _map_sealed(fds[0]) if data_fds else inline
        message = Message(header, data, fds[data_fds:])
        fds = fds[:data_fds]  # the caller owns the rest now
        return message
    finally:
        for fd in fds:
            os.close(fd)


def _receive_with_fds(sock: socket.socket, flags: int) -> tuple[bytes, list[int]]:
    # By hand: Python 3.11's socket.recv_fds accepts `flags` but never passes them on.
    raw, ancillary, _flags, _address = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(4 * 4), flags)
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return raw, list(fds)


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


def shared_data(message: Message, buffer: SharedBuffer) -> memoryview:
    """The view on `buffer` that a "shared" message's tensors lie in, after checking that
    its declared size fits."""
    nbytes = message.header.get("nbytes")
    if type(nbytes) is not int or not 0 <= nbytes <= buffer.size:
        raise FrameError("shared tensor bytes lie outside the shared buffer")
    return buffer.view[:nbytes]


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
