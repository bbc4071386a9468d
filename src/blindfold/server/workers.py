"""The front process's side of a model worker: start it from a clean fork server, hand it the
model, send it runs, read its answers on a watcher thread, notice when it dies, kill it.

Workers are forked from multiprocessing's fork server, a fresh interpreter that imports
onnxruntime once and never sees the front's secrets (forking the front itself would copy its
TLS and sealing keys into every worker). Answers are read as data, never unpickled.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import shutil
import signal
import socket
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import numpy as np

from blindfold.server import tensor_frames as frames
from blindfold.server import worker
from blindfold.server.worker import WorkerSettings

logger = logging.getLogger("blindfold.workers")

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["blindfold.server.worker"])


_RETIRED = "it ran out of memory; a fresh worker serves the model"


class WorkerDied(Exception):
    """The worker process ended (or was killed) before it answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkerMisbehaved(Exception):
    """The worker answered something outside the protocol; it has been killed."""


class ModelWorker:
    """One worker process serving one model. Thread-safe; `submit` may be called from any
    thread, answers arrive as `concurrent.futures.Future`s."""

    def __init__(self, model_fd: int, settings: WorkerSettings, load_timeout: float) -> None:
        self._directory = tempfile.mkdtemp(prefix="blindfold-worker-")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._socket = ours
        self._process = _CONTEXT.Process(
            target=worker.main,
            args=(theirs, replace(settings, directory=self._directory)),
            name="blindfold-model-worker",
            daemon=True,
        )
        self._lock = threading.Lock()
        self._pending: dict[int, Future[frames.Message]] = {}
        self._ids = itertools.count(1)
        self._death: str | None = None
        self._retiring = False
        self._killed_because: str | None = None
        try:
            self._process.start()
        finally:
            theirs.close()
        self.ready = self._load(model_fd, load_timeout)
        threading.Thread(target=self._watch, name="worker-watch", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        """True while the worker takes new runs."""
        return self._death is None and not self._retiring

    def retire(self) -> None:
        """Takes no new runs and ends once those in flight are answered: after onnxruntime
        ran out of memory its arena still holds the memory, and new threads or buffers in
        that process could fail anywhere."""
        with self._lock:
            self._retiring = True
            idle = not self._pending
        if idle:
            self.kill(_RETIRED)

    def _load(self, model_fd: int, timeout: float) -> dict[str, Any]:
        """Sends the model and waits for the worker's description of it (or its failure)."""
        try:
            frames.send_sealed(self._socket, {"op": "load"}, model_fd)
            self._socket.settimeout(timeout)
            message = frames.receive(self._socket)
        except TimeoutError:
            self.kill("it took longer than the load timeout")
            raise WorkerDied(f"loading took longer than {timeout:.0f} s") from None
        except (OSError, frames.FrameError):
            message = None
        finally:
            self._socket.settimeout(None)
        if message is None:
            self._death = self._exit_reason()
            self._cleanup()
            raise WorkerDied(self._death)
        return message.header

    def submit(
        self, input_names: list[str], arrays: list[np.ndarray], output_names: list[str]
    ) -> Future[frames.Message]:
        future: Future[frames.Message] = Future()
        with self._lock:
            if self._death is not None:
                raise WorkerDied(self._death)
            request_id = next(self._ids)
            self._pending[request_id] = future
        header = {"id": request_id, "inputs": input_names, "outputs": output_names}
        try:
            frames.send(self._socket, header, arrays)
        except OSError:
            with self._lock:
                self._pending.pop(request_id, None)
            raise WorkerDied(self._death or "its socket closed") from None
        return future

    def kill(self, because: str) -> None:
        """Ends the worker now; its pending runs fail with `because`."""
        if self._killed_because is None:
            self._killed_because = because
        if self._process.pid is not None and self._process.exitcode is None:
            self._process.kill()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the watcher thread
        except OSError:
            pass

    def close(self) -> None:
        self.kill("the model was unloaded")

    def _watch(self) -> None:
        while True:
            try:
                message = frames.receive(self._socket)
            except (OSError, frames.FrameError):
                message = None
            if message is None:
                break
            with self._lock:
                future = self._pending.pop(message.header.get("id"), None)  # type: ignore[arg-type]
                drained = self._retiring and not self._pending
            if future is None:
                self.kill("it answered a request that was never sent")
                break
            if not future.cancelled():  # cancelled: the front gave up waiting (time limit)
                future.set_result(message)
            if drained:
                self.kill(_RETIRED)
        if self._killed_because is None:
            self._process.join(timeout=2)
            if self._process.exitcode is None:  # closed its socket yet lives on
                self._process.kill()
        reason = self._exit_reason()
        with self._lock:
            self._death = reason
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.cancelled():
                future.set_exception(WorkerDied(reason))
        self._cleanup()
        if self._killed_because not in ("the model was unloaded", _RETIRED):
            logger.warning("model worker %s stopped: %s", self._process.pid, reason)

    def _exit_reason(self) -> str:
        self._process.join(timeout=5)
        code = self._process.exitcode
        if self._killed_because is not None:
            return f"killed because {self._killed_because}"
        if code is None:
            return "it stopped answering"
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return f"it was killed by {name}"
        return f"it exited with status {code}"

    def _cleanup(self) -> None:
        self._socket.close()
        shutil.rmtree(self._directory, ignore_errors=True)
