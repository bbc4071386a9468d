"""The model worker process: holds one onnxruntime session for one uploaded model and runs
it for the front process, which sends inputs and receives outputs over one socket.

An uploaded model is untrusted input to a large C++ runtime, so the worker is built to be
worth nothing to an attacker who takes it over: it is forked from a clean fork server (it
never held the TLS key, the receipt key, token hashes or the sealing key), and before it
reads the model it moves into an empty directory (chroot inside a new user and mount
namespace where the kernel allows, else a plain chdir), gives up the right to gain
privileges, and takes an address-space limit and no core dumps. onnxruntime opens the model
by a path to its sealed memfd (a session built from bytes would keep a second copy), and
runs it once on zero inputs (warm-up) before the worker reports it loaded. Each run has a time limit
(onnxruntime's `RunOptions.terminate`); the front kills the worker if that is not enough.

Everything this module imports is imported before confinement: after chroot there is no
file system to import from. For the same reason the one custom-operator library the server
allows (onnxruntime-extensions, when enabled) is registered, and so loaded, before it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from blindfold import tensors
from blindfold.errors import InputError
from blindfold.server import tensor_frames as frames
from blindfold.server.limits import WARMUP_INPUT_LIMIT

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNS = 0x00020000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_M_ARENA_MAX = -8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_FD_DIRECTORY = "fd"  # where the worker sees its own descriptors while it loads the model
MAX_NAME_LENGTH = 256
# What `_confine` achieved, as the worker reports it to the front process.
CONFINED_CHROOT = "chroot into an empty directory"
CONFINED_CHDIR = "empty working directory"


@dataclass(frozen=True)
class WorkerSettings:
    directory: str  # an empty directory made for this worker by the front process
    address_space_bytes: int  # RLIMIT_AS; 0: no limit
    inference_timeout: float  # seconds per run before RunOptions.terminate is set
    intra_op_threads: int  # 0: onnxruntime's default
    concurrency: int  # runs served at once
    # onnxruntime-extensions' shared library ("" when not enabled); registered before
    # confinement, because after chroot its file is out of reach.
    custom_ops_library: str = ""


def main(sock: socket.socket, settings: WorkerSettings) -> None:
    """The worker's entry point (the target of its `multiprocessing.Process`)."""
    options = session_options(settings.intra_op_threads, settings.custom_ops_library)
    # The model's sealed memfd arrives before confinement (nothing of it is read yet), so
    # that confinement can leave a path to it: onnxruntime keeps a second copy of a model
    # given as bytes, none of one given as a path.
    message = frames.receive(sock, extra_fds=True)
    if message is None or len(message.fds) != 1:
        return
    model_fd = message.fds[0]
    confinement, model_path = _confine(settings, model_fd)
    try:
        session = _load(model_fd, model_path, options)
    except Exception as exc:
        # The text goes back to the uploader: it names operators and types, and at this point
        # the worker has seen nothing but the uploader's own model.
        _send(sock, threading.Lock(), {"ok": False, "error": "load_failed", "detail": str(exc)})
        return
    finally:
        _close_model_path(model_path)
        os.close(model_fd)
    _WATCHDOG.start()
    warmup = warm_up(session, settings.inference_timeout)
    lock = threading.Lock()
    _send(
        sock,
        lock,
        {
            "ok": True,
            "confinement": confinement,
            "loaded_from": "bytes" if model_path is None else "path",
            "warmup": warmup,
            "inputs": [tensor_spec(arg) for arg in session.get_inputs()],
            "outputs": [tensor_spec(arg) for arg in session.get_outputs()],
        },
    )
    # The run threads start now, while memory is plentiful: a thread started after a model
    # exhausted the address space could not get its stack. Each reads the socket itself (a
    # SOCK_SEQPACKET read takes one whole message), so no run waits for a hand-off.
    for index in range(settings.concurrency):
        threading.Thread(
            target=_run_loop,
            args=(sock, lock, session, settings.inference_timeout),
            name=f"run-{index}",
            daemon=True,
        ).start()
    threading.Event().wait()  # the run threads end the process


def _run_loop(
    sock: socket.socket, lock: threading.Lock, session: ort.InferenceSession, timeout: float
) -> None:
    try:
        while True:
            message = frames.receive(sock, extra_fds=True)
            if message is None:  # the front closed the socket: nothing more to do
                os._exit(0)
            _serve_run(sock, lock, session, message, timeout)
    except BaseException:
        # Even the error answer failed (say, no memory for it), or the socket broke: the front
        # sees the worker end and fails the request, rather than wait for an answer.
        os._exit(70)


def _confine(settings: WorkerSettings, model_fd: int) -> tuple[str, str | None]:
    """Cuts the worker off from the server's files and privileges; returns what it got and
    the path onnxruntime opens the model by (None: only its bytes can be reached)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.environ.clear()
    os.chdir(settings.directory)
    confinement = CONFINED_CHDIR
    model_path: str | None = f"/proc/self/fd/{model_fd}"
    # A new user namespace gives the right to chroot without real root, and takes away
    # every capability in the server's own namespace (no ptrace of the front process).
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) == 0:
        model_path = _bind_own_descriptors(libc, model_fd)
        try:
            os.chroot(".")
            os.chdir("/")
            confinement = CONFINED_CHROOT
        except OSError:
            if model_path is not None:
                libc.umount2(_FD_DIRECTORY.encode(), _MNT_DETACH)
                os.rmdir(_FD_DIRECTORY)
            model_path = f"/proc/self/fd/{model_fd}"
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.mallopt(_M_ARENA_MAX, 2)  # glibc reserves 64 MiB of address space per arena
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core dump would hold tensors
    if settings.address_space_bytes:
        limit = settings.address_space_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return confinement, model_path


def _bind_own_descriptors(libc: ctypes.CDLL, model_fd: int) -> str | None:
    """Makes this process's own descriptor directory visible as `/fd` inside the chroot (in
    the worker's private mount namespace), so the model opens as `/fd/N` without a copy.
    Only until the model is loaded: `_close_model_path` removes it before any run. None when
    the kernel refuses (the model is then loaded from its bytes)."""
    # Private first: nothing mounted here may propagate back to the server's namespace.
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return None
    try:
        os.mkdir(_FD_DIRECTORY)
    except OSError:
        return None
    source = f"/proc/{os.getpid()}/fd".encode()
    if libc.mount(source, _FD_DIRECTORY.encode(), None, _MS_BIND, None) != 0:
        os.rmdir(_FD_DIRECTORY)
        return None
    return f"/{_FD_DIRECTORY}/{model_fd}"


def _close_model_path(model_path: str | None) -> None:
    """Unmounts `/fd` once the session holds the model: a run never sees a path to the
    worker's descriptors (through it a descriptor could be reopened with other rights)."""
    if model_path is None or not model_path.startswith(f"/{_FD_DIRECTORY}/"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(f"/{_FD_DIRECTORY}".encode(), _MNT_DETACH) != 0:
        # A mount that would not go: the process cannot be trusted to run without it.
        os._exit(71)
    os.rmdir(f"/{_FD_DIRECTORY}")


def session_options(threads: int, custom_ops_library: str) -> ort.SessionOptions:
    """Options for a model's session; registering the custom-op library loads it now."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # FATAL only: ORT logs kernel errors with their values, and tensor contents must never
    # reach a log.
    options.log_severity_level = 4
    if custom_ops_library:
        options.register_custom_ops_library(custom_ops_library)
    return options


def _load(
    model_fd: int, model_path: str | None, options: ort.SessionOptions
) -> ort.InferenceSession:
    if model_path is not None:
        return ort.InferenceSession(
            model_path, sess_options=options, providers=["CPUExecutionProvider"]
        )
    with mmap.mmap(model_fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
        data = mapped[:]
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    # onnxruntime's Python wrapper keeps the bytes it was given for as long as the session
    # lives (only to rebuild the session on a provider fallback, which the CPU provider never
    # needs): drop that copy.
    session._model_bytes = None
    return session


def warm_up(session: ort.InferenceSession, timeout: float) -> str:
    """Runs the model once on zero inputs of its declared shape (dynamic dimensions 1,
    strings empty) so that onnxruntime's first-run cost is paid before the model is
    reported ready. Returns "ok", or why it did not run: only an error kind and exception
    type, never a message (its text could quote the model's initializers). A model whose
    warm-up fails (one needing particular shapes or values) still loads."""
    feeds: dict[str, np.ndarray] = {}
    total = 0
    for arg in session.get_inputs():
        entry = tensors.by_ort(arg.type)
        if entry is None:
            return "skipped: an input is not a tensor"  # names come from the model: not logged
        shape = [dim if isinstance(dim, int) and dim >= 0 else 1 for dim in arg.shape or []]
        total += int(np.prod(shape, dtype=np.float64)) * entry.numpy.itemsize
        if total > WARMUP_INPUT_LIMIT:
            return f"skipped: its declared inputs exceed {WARMUP_INPUT_LIMIT >> 20} MiB"
        if entry.numpy == np.dtype(object):
            feeds[arg.name] = np.full(shape, "", dtype=object)
        else:
            feeds[arg.name] = np.zeros(shape, dtype=entry.numpy)
    options = ort.RunOptions()
    options.log_severity_level = 4
    _WATCHDOG.watch(options, timeout)
    try:
        session.run(None, feeds, options)
    except Exception as exc:
        error = "timeout" if options.terminate else _error_kind(exc)
        return f"failed: {error} ({_kind(exc)})"
    finally:
        _WATCHDOG.forget(options)
    return "ok"


def tensor_spec(arg: Any) -> dict[str, Any]:
    """How a session input or output is described, here and by the in-process session."""
    entry = tensors.by_ort(arg.type)
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape or []]
    return {
        "name": arg.name,
        "datatype": entry.oip if entry else str(arg.type),
        "shape": shape,
    }


def _serve_run(
    sock: socket.socket,
    lock: threading.Lock,
    session: ort.InferenceSession,
    message: frames.Message,
    timeout: float,
) -> None:
    header = message.header
    request_id = header.get("id")
    try:
        buffers = _slot_buffers(message)
        if header.get("data") == "shared":
            if buffers is None:
                raise frames.FrameError("shared data without a slot")
            message.data = frames.shared_data(message, buffers[0])
        arrays = frames.arrays_of(message)
        feeds = {name: to_ort(a) for name, a in zip(header["inputs"], arrays, strict=True)}
    except (frames.FrameError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        _send(
            sock, lock, {"id": request_id, "ok": False, "error": "bad_input", "detail": _kind(exc)}
        )
        return
    options = ort.RunOptions()
    options.log_severity_level = 4
    _WATCHDOG.watch(options, timeout)
    try:
        results = session.run(header["outputs"], feeds, options)
        outputs = [_checked_output(value) for value in results]
    except Exception as exc:
        error = "timeout" if options.terminate else _error_kind(exc)
        _send(sock, lock, {"id": request_id, "ok": False, "error": error, "detail": _kind(exc)})
        return
    finally:
        _WATCHDOG.forget(options)
        message.data.release()
    with lock:
        shared = buffers[1].view if buffers is not None else None
        frames.send(sock, {"id": request_id, "ok": True}, outputs, shared=shared)


# The shared buffers of each slot (inputs, outputs), by slot number. The front uses a slot for
# one run at a time and sends a slot's buffers again whenever it replaces them, so no lock.
_SLOTS: dict[int, tuple[frames.SharedBuffer, frames.SharedBuffer]] = {}


def _slot_buffers(
    message: frames.Message,
) -> tuple[frames.SharedBuffer, frames.SharedBuffer] | None:
    slot = message.header.get("slot")
    if message.fds:
        adopted: list[frames.SharedBuffer] = []
        try:
            if type(slot) is not int or len(message.fds) != 2:
                raise frames.FrameError("a slot's buffers come as a pair with its number")
            for fd in message.fds:
                adopted.append(frames.SharedBuffer(fd))
        except BaseException:
            for fd in message.fds[len(adopted) :]:
                os.close(fd)
            for buffer in adopted:
                buffer.close()
            raise
        finally:
            message.fds = []
        replaced = _SLOTS.get(slot)
        _SLOTS[slot] = (adopted[0], adopted[1])
        if replaced is not None:
            for buffer in replaced:
                buffer.close()
    return _SLOTS.get(slot) if type(slot) is int else None


class _Watchdog:
    """Sets `terminate` on runs past their deadline. One thread for all runs, started with
    the run threads: a timer thread per run would cost a thread start on every inference."""

    def __init__(self) -> None:
        self._deadlines: dict[ort.RunOptions, float] = {}
        self._changed = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="watchdog", daemon=True).start()

    def watch(self, options: ort.RunOptions, timeout: float) -> None:
        with self._changed:
            self._deadlines[options] = time.monotonic() + timeout
            self._changed.notify()

    def forget(self, options: ort.RunOptions) -> None:
        with self._changed:
            self._deadlines.pop(options, None)

    def _loop(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for options, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        options.terminate = True
                        del self._deadlines[options]
                nearest = min(self._deadlines.values(), default=now + 3600)
                self._changed.wait(timeout=max(nearest - now, 0.001))


_WATCHDOG = _Watchdog()


def to_ort(array: np.ndarray) -> np.ndarray:
    # onnxruntime takes string tensors as str objects; the wire carries UTF-8 bytes.
    if array.dtype == object:
        decoded = [item.decode("utf-8") for item in array.reshape(-1)]
        return np.array(decoded, dtype=object).reshape(array.shape)
    return array


class UnsupportedOutput(Exception):
    """The model produced a sequence, a map or a dtype the wire cannot carry."""


def _checked_output(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise UnsupportedOutput(type(value).__name__)
    tensors.np_to_oip_dtype(value.dtype)  # raises for dtypes the wire cannot carry
    return value


def _error_kind(exc: Exception) -> str:
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, (UnsupportedOutput, InputError)):
        return "unsupported_output"
    text = str(exc)
    if "bad_alloc" in text or "Failed to allocate" in text or "failed to allocate" in text:
        return "memory"
    return "run_failed"


def _kind(exc: BaseException) -> str:
    # Only the exception's type travels: its text can quote tensor values.
    return type(exc).__name__[:MAX_NAME_LENGTH]


def _send(sock: socket.socket, lock: threading.Lock, header: dict[str, Any]) -> None:
    with lock:
        frames.send(sock, header)
