"""An uploaded model's bytes, held once: in a sealed memfd that the upload (or the decryption
of an encrypted model file) streams into, the
ONNX checker and the store's sealing read through a read-only mapping, and the model's
worker opens by path (and reopens after a crash). No Python `bytes` copy of the model is
made on the way.

`ModelBytesWriter` takes the body chunk by chunk and hashes it (SHA-256) as it goes;
`finish` seals the memfd against writing and resizing (F_SEAL_WRITE | SHRINK | GROW | SEAL),
so nobody, a worker included, can change the bytes the hash names.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import io
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ModelBytes:
    """A sealed memfd holding one model; owns its descriptor until `close`."""

    def __init__(self, fd: int, size: int, sha256: str) -> None:
        self.fd = fd
        self.size = size
        self.sha256 = sha256

    def __len__(self) -> int:
        return self.size

    @contextmanager
    def view(self) -> Iterator[memoryview]:
        """A read-only view of the bytes, unmapped when the block ends."""
        if self.size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
            view = memoryview(mapped)
            try:
                yield view
            finally:
                view.release()

    def reader(self) -> io.BufferedReader:
        """A file object reading the bytes from the start, with its own offset (pread), so
        readers never move each other's position."""
        return io.BufferedReader(_Reader(self.fd, self.size), 1 << 20)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Reader(io.RawIOBase):
    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = os.preadv(self._fd, [buffer], self._position) if self._position < self._size else 0
        self._position += count
        return count


@functools.cache
def memfd_available() -> bool:
    """Whether uploads can stream into a memfd. Gramine's SGX enclaves have none (Python's
    `os.memfd_create` is missing there, or answers ENOSYS); there uploads arrive whole, as
    bytes, and models run in the server process (`--unsafe-no-isolation`)."""
    try:
        os.close(os.memfd_create("blindfold-probe", os.MFD_CLOEXEC))
    except (AttributeError, OSError):
        return False
    return True


class ModelBytesWriter:
    """Receives a model's bytes in chunks into a fresh memfd, hashing them as they come."""

    def __init__(self) -> None:
        self._fd = os.memfd_create("blindfold-model", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        written = 0
        while written < len(view):
            written += os.write(self._fd, view[written:])
        self._hash.update(view)
        self.size += len(view)

    def hexdigest(self) -> str:
        """The SHA-256 of what was written so far."""
        return self._hash.hexdigest()

    def finish(self) -> ModelBytes:
        """Seals the memfd; the returned ModelBytes owns the descriptor."""
        fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, _SEALS)
        fd, self._fd = self._fd, -1
        return ModelBytes(fd, self.size, self._hash.hexdigest())

    def abandon(self) -> None:
        """Frees the memfd of an upload that failed (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def return_freed_memory() -> None:
    """Gives the memory of freed buffers back to the system, in every thread's malloc arena.

    Called after model-sized work (replicating a model, a joiner's snapshot): glibc keeps
    what a thread's arena freed, and a 64 MiB model left a 64 MiB arena behind in a replica.
    A fixed mmap threshold would do the same for every large buffer, but made each tensor
    of a megabyte or more pay for fresh pages (1 MiB in + out: 4.4 -> 6.6 ms)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
        ctypes.CDLL(None).malloc_trim(0)


# A model as the service takes it: streamed uploads and decrypted model files come as
# ModelBytes, models that arrive whole (peer replicas, BlindAI uploads, the store at start,
# anything without memfd) as bytes.
ModelData = bytes | ModelBytes
