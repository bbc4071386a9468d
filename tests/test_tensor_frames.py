"""The front process reads what a model worker sends as hostile data: a worker taken over by
a malicious model must not crash the front, make it read outside a buffer, or change bytes
after they were checked. Real sockets and memfds, no mocks."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from blindfold.server import tensor_frames as frames


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


def raw_send(sock: socket.socket, header: dict[str, object], data: bytes = b"") -> None:
    encoded = json.dumps(header).encode()
    sock.send(struct.pack("<I", len(encoded)) + encoded + data)


@pytest.mark.parametrize(
    "arrays",
    [
        [np.arange(12, dtype=np.float32).reshape(3, 4)],
        [np.ones((600, 600), np.float64), np.array([b"a", b"", "\u00e9".encode()], dtype=object)],
        [np.zeros((0, 5), np.int64), np.array(True)],
    ],
    ids=["inline", "memfd", "empty-and-scalar"],
)
def test_round_trip(pair: tuple[socket.socket, socket.socket], arrays: list[np.ndarray]) -> None:
    ours, theirs = pair
    frames.send(theirs, {"id": 7}, arrays)
    message = frames.receive(ours)
    assert message is not None and message.header["id"] == 7
    received = frames.arrays_of(message, ["a"] * len(arrays))
    for got, want in zip(received, arrays, strict=True):
        assert got.shape == want.shape
        assert np.array_equal(got, want)


@pytest.mark.parametrize(
    "descriptor",
    [
        {"datatype": "FP32", "shape": [4], "offset": 0, "nbytes": 64},  # past the data
        {"datatype": "FP32", "shape": [4], "offset": -16, "nbytes": 16},
        {"datatype": "FP32", "shape": [5], "offset": 0, "nbytes": 16},  # size mismatch
        {"datatype": "EVIL", "shape": [4], "offset": 0, "nbytes": 16},
        {"datatype": "FP32", "shape": [-4], "offset": 0, "nbytes": 16},
        {"datatype": "FP32", "shape": [1] * 65, "offset": 0, "nbytes": 4},
        {"datatype": "FP32", "shape": "4", "offset": 0, "nbytes": 16},
        {"datatype": "BYTES", "shape": [1], "offset": 0, "nbytes": 16},  # length prefix lies
        "not an object",
    ],
)
def test_descriptors_that_do_not_fit_the_data_are_refused(
    pair: tuple[socket.socket, socket.socket], descriptor: object
) -> None:
    ours, theirs = pair
    data = struct.pack("<I", 1 << 30) + bytes(12)
    raw_send(theirs, {"id": 1, "tensors": [descriptor]}, data)
    message = frames.receive(ours)
    assert message is not None
    with pytest.raises(frames.FrameError):
        frames.arrays_of(message)


def test_headers_that_are_not_json_objects_are_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    for body in (b"\x05\x00\x00\x00[1,2]", b"\xff\xff\xff\x00{}", b"\x02\x00\x00\x00{x", b"ab"):
        theirs.send(body)
        with pytest.raises(frames.FrameError):
            frames.receive(ours)


def test_a_memfd_that_could_still_shrink_or_change_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Shrinking a mapped file makes the reader's next access SIGBUS; writing after the check
    changes checked bytes. A worker's memfd is mapped only once sealed against both."""
    ours, theirs = pair
    fd = os.memfd_create("hostile", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)  # sealed, but not enough
    header = json.dumps({"id": 1, "tensors": []}).encode()
    socket.send_fds(theirs, [struct.pack("<I", len(header)) + header], [fd])
    with pytest.raises(frames.FrameError, match="sealed"):
        frames.receive(ours)
    os.close(fd)


def test_a_sealed_memfd_is_read_only_for_everyone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    frames.send(theirs, {"id": 1}, [np.ones(100_000, np.float32)])
    _raw, fds, _flags, _address = socket.recv_fds(ours, frames.MAX_MESSAGE, 1)
    (fd,) = fds
    with pytest.raises(PermissionError):
        mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    os.close(fd)


# --- shared buffers: reused by a slot's runs, written by both sides ---


def test_tensors_round_trip_through_a_shared_buffer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    buffer = frames.SharedBuffer.create(1 << 20)
    arrays: list[np.ndarray] = [
        np.arange(50_000, dtype=np.float32),
        np.full((3, 70_000), 7, np.int16),
    ]
    frames.send(theirs, {"id": 3}, arrays, shared=buffer.view)
    message = frames.receive(ours)
    assert message is not None and message.header["data"] == "shared"
    message.data = frames.shared_data(message, buffer)
    for got, want in zip(frames.arrays_of(message, ["a", "b"]), arrays, strict=True):
        assert np.array_equal(got, want)
    del message, got
    buffer.close()


def test_tensors_too_large_for_the_shared_buffer_go_in_a_memfd(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    buffer = frames.SharedBuffer.create(64 * 1024)
    array = np.ones(300_000, np.float32)
    frames.send(theirs, {"id": 4}, [array], shared=buffer.view)
    message = frames.receive(ours)
    assert message is not None and message.header["data"] == "memfd"
    assert np.array_equal(frames.arrays_of(message)[0], array)
    buffer.close()


def test_a_shared_buffer_that_could_be_resized_is_refused() -> None:
    """A worker that could shrink a buffer the front has mapped could kill the front with
    SIGBUS on its next access."""
    fd = os.memfd_create("resizable", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(frames.FrameError, match="resizing"):
            frames.SharedBuffer(fd)
    finally:
        os.close(fd)
    buffer = frames.SharedBuffer.create(4096)
    with pytest.raises(OSError):  # noqa: PT011 (EPERM: the message is the C library's)
        os.ftruncate(buffer.fd, 0)
    buffer.close()


def test_a_shared_answer_larger_than_its_buffer_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    buffer = frames.SharedBuffer.create(64 * 1024)
    raw_send(theirs, {"id": 1, "data": "shared", "nbytes": 64 * 1024 + 1, "tensors": []})
    message = frames.receive(ours)
    assert message is not None
    with pytest.raises(frames.FrameError, match="outside the shared buffer"):
        frames.shared_data(message, buffer)
    buffer.close()


def test_the_front_refuses_descriptors_a_worker_should_not_send(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Only the front hands out shared buffers; a worker passing descriptors is misbehaving."""
    ours, theirs = pair
    buffer = frames.SharedBuffer.create(4096)
    frames.send(theirs, {"id": 1}, [np.ones(4, np.float32)], fds=[buffer.fd, buffer.fd])
    with pytest.raises(frames.FrameError, match="descriptors"):
        frames.receive(ours)
    frames.send(theirs, {"id": 2}, [np.ones(4, np.float32)], fds=[buffer.fd, buffer.fd])
    message = frames.receive(ours, extra_fds=True)  # what the worker accepts from the front
    assert message is not None and len(message.fds) == 2
    for fd in message.fds:
        os.close(fd)
    buffer.close()
