"""The front process's side of a model worker: start it from a clean fork server, hand it the
model, send it runs, read its answers on the event loop, notice when it dies, kill it.

Each run in flight holds one of the worker's slots: a pair of shared buffers (inputs,
outputs) that the front makes, hands to the worker once, and reuses for the slot's next runs,
growing them when tensors do not fit. A slot returns to the pool only when its run's answer
has arrived (or the worker is gone), never when a waiter gives up, so a late answer cannot
land in a buffer another run already uses.

Workers are forked from multiprocessing's fork server, a fresh interpreter that imports
onnxruntime once and never sees the front's secrets (forking the front itself would copy its
TLS and sealing keys into every worker). Answers are read as data, never unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import multiprocessing
import shutil
import signal
import socket
import tempfile
import threading
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
# Shared buffers per worker: at most MAX_SLOTS runs at once use them (more wait in fresh
# memfds); each buffer holds at most SHARED_LIMIT bytes (larger tensors go in fresh memfds).
MAX_SLOTS = 8
SHARED_LIMIT = 16 << 20
_SHARED_MINIMUM = 256 << 10
_COPY_OFF_LOOP = 1 << 20  # answers larger than this are copied out on a thread


class _Slot:
    """One run's shared buffers; `announced` once the worker has been sent them."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.inputs = frames.SharedBuffer.create(_SHARED_MINIMUM)
        self.outputs = frames.SharedBuffer.create(_SHARED_MINIMUM)
        self.announced = False

    def fit(self, input_bytes: int, output_bytes: int) -> None:
        """Replaces a buffer too small for what this run should need (up to the limit)."""
        if self.inputs.size < min(input_bytes, SHARED_LIMIT):
            self.inputs.close()
            self.inputs = frames.SharedBuffer.create(_capacity(input_bytes))
            self.announced = False
        if self.outputs.size < min(output_bytes, SHARED_LIMIT):
            self.outputs.close()
            self.outputs = frames.SharedBuffer.create(_capacity(output_bytes))
            self.announced = False

    def close(self) -> None:
        self.inputs.close()
        self.outputs.close()


def _capacity(size: int) -> int:
    """Buffers grow to the next power of two, so a slowly growing tensor costs few remaps."""
    return min(SHARED_LIMIT, max(_SHARED_MINIMUM, 1 << (size - 1).bit_length()))


class WorkerDied(Exception):
    """The worker process ended (or was killed) before it answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelWorker:
    """One worker process serving one model.

    Starting it (and loading the model) blocks; call it off the event loop. Runs are made on
    the event loop: answers are read there as they arrive (`loop.add_reader`), so a run costs
    no thread hand-off in the front process. `kill` and `close` may be called from any
    thread."""

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
        self._pending: dict[int, tuple[asyncio.Future[frames.Message], _Slot | None]] = {}
        self._free_slots: list[_Slot] = []
        self._slot_count = 0
        self._largest_answer = 0  # bytes: what a slot's output buffer should hold
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended = False  # its socket closed: no new runs, whatever the reason
        self._reader_removed = False
        self._send_room: asyncio.Future[None] | None = None
        self._death: str | None = None
        self._retiring = False
        self._killed_because: str | None = None
        self._cleaned = threading.Lock()
        try:
            self._process.start()
        finally:
            theirs.close()
        self.ready = self._load(model_fd, load_timeout)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        """True while the worker takes new runs."""
        return not self._ended and self._killed_because is None and not self._retiring

    def _load(self, model_fd: int, timeout: float) -> dict[str, Any]:
        """Sends the model and waits for the worker's description of it (or its failure)."""
        try:
            frames.send(self._socket, {"op": "load"}, fds=(model_fd,))
            self._socket.settimeout(timeout)
            message = frames.receive(self._socket)
        except TimeoutError:
            self.kill("it took longer than the load timeout")
            self._death = f"loading took longer than {timeout:.0f} s"
            self._finish()
            raise WorkerDied(self._death) from None
        except (OSError, frames.FrameError):
            message = None
        finally:
            if self._socket.fileno() != -1:
                self._socket.settimeout(None)
        if message is None:
            self._ended = True
            self._death = self._exit_reason()
            self._finish()
            raise WorkerDied(self._death)
        return message.header

    async def run(
        self,
        input_names: list[str],
        arrays: list[np.ndarray],
        output_names: list[str],
        *,
        send_off_loop: bool = False,
    ) -> frames.Message:
        """Sends one run and waits for its answer (cancel the wait to give up on it)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._socket.fileno(), self._readable)
        if not self.alive:
            raise WorkerDied(self._death or "it is being replaced")
        request_id = next(self._ids)
        answer: asyncio.Future[frames.Message] = loop.create_future()
        header: dict[str, Any] = {"id": request_id, "inputs": input_names, "outputs": output_names}
        slot = self._take_slot(sum(a.nbytes for a in arrays))
        shared: memoryview | None = None
        fds: tuple[int, ...] = ()
        if slot is not None:
            header["slot"], shared = slot.number, slot.inputs.view
            if not slot.announced:
                fds = (slot.inputs.fd, slot.outputs.fd)
        self._pending[request_id] = (answer, slot)
        send = functools.partial(frames.send, shared=shared, fds=fds)
        while True:
            try:
                if send_off_loop:  # large or BYTES tensors: their copy would hold the loop
                    await asyncio.to_thread(send, self._socket, header, arrays)
                else:
                    send(self._socket, header, arrays)
                break
            except BlockingIOError:
                # The event loop made the socket non-blocking and the worker has not read
                # what waits: every run thread is busy. Wait until it takes more.
                await self._writable(loop)
            except OSError:
                self._pending.pop(request_id, None)
                self._release(slot)
                raise WorkerDied(self._death or "its socket closed") from None
        if slot is not None:
            slot.announced = True
        # Cancelling this wait leaves the run pending: its slot returns when the answer comes.
        message = await answer
        try:
            if message.header.get("data") == "shared":
                # Copied out before anything is checked: the worker can still write there.
                if len(message.data) > _COPY_OFF_LOOP:
                    message.data = memoryview(await asyncio.to_thread(bytes, message.data))
                else:
                    message.data = memoryview(bytes(message.data))
        finally:
            self._release(slot)
        return message

    def _take_slot(self, input_bytes: int) -> _Slot | None:
        if self._free_slots:
            slot = self._free_slots.pop()
        elif self._slot_count < MAX_SLOTS:
            slot = _Slot(self._slot_count)
            self._slot_count += 1
        else:
            return None
        slot.fit(input_bytes, self._largest_answer)
        return slot

    def _release(self, slot: _Slot | None) -> None:
        if slot is None:
            return
        if self._ended or self._killed_because is not None:
            slot.close()
        else:
            self._free_slots.append(slot)

    def _writable(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """One future for everyone waiting to send (a loop keeps one writer per socket)."""
        if self._send_room is None or self._send_room.done():
            room: asyncio.Future[None] = loop.create_future()
            descriptor = self._socket.fileno()

            def ready() -> None:
                loop.remove_writer(descriptor)
                if not room.done():
                    room.set_result(None)

            loop.add_writer(descriptor, ready)
            self._send_room = room
        return self._send_room

    def retire(self) -> None:
        """Takes no new runs and ends once those in flight are answered: after onnxruntime
        ran out of memory its arena still holds the memory, and new threads or buffers in
        that process could fail anywhere. Called on the event loop."""
        self._retiring = True
        if not self._pending:
            self.kill(_RETIRED)

    def kill(self, because: str) -> None:
        """Ends the worker now; its pending runs fail with `because`."""
        if self._killed_because is None:
            self._killed_because = because
        if self._process.pid is not None and self._process.exitcode is None:
            self._process.kill()
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)  # the reader sees the end at once
        if self._death is None and (self._loop is None or not self._loop.is_running()):
            # No event loop reads its socket (it never ran, or the server is stopping): no
            # reader will see the end, so tidy up here.
            self._ended = True
            threading.Thread(target=self._finish_unattached, daemon=True).start()

    def close(self) -> None:
        self.kill("the model was unloaded")

    def _readable(self) -> None:
        """Reads every answer waiting on the socket (the event loop calls it)."""
        while True:
            try:
                message = frames.receive(self._socket, nonblocking=True)
            except BlockingIOError:
                return
            except (OSError, frames.FrameError):
                message = None
            if message is None:
                self._end()
                return
            entry = self._pending.pop(message.header.get("id"), None)  # type: ignore[arg-type]
            try:
                if entry is None:
                    raise frames.FrameError("it answered a request that was never sent")
                answer, slot = entry
                if message.header.get("data") == "shared":
                    if slot is None:
                        raise frames.FrameError("it answered in a buffer it was not given")
                    message.data = frames.shared_data(message, slot.outputs)
            except frames.FrameError as exc:
                self.kill(str(exc))
                self._end()
                return
            nbytes = message.header.get("nbytes")
            if type(nbytes) is int and nbytes > self._largest_answer:
                self._largest_answer = min(nbytes, SHARED_LIMIT)
            if answer.done():  # the front gave up waiting (time limit, cancelled request)
                self._release(slot)
            else:
                answer.set_result(message)
            if self._retiring and not self._pending:
                self.kill(_RETIRED)

    def _end(self) -> None:
        """The socket closed: stop reading, learn why off the loop, then fail what waits."""
        loop = self._loop
        if loop is None or self._reader_removed:
            return
        self._reader_removed = True
        self._ended = True
        loop.remove_reader(self._socket.fileno())
        if self._send_room is not None and not self._send_room.done():
            loop.remove_writer(self._socket.fileno())
            self._send_room.set_result(None)  # the retry then fails: the worker is gone

        def learn_why() -> None:
            if self._killed_because is None:
                self._process.join(timeout=2)
                if self._process.exitcode is None:  # closed its socket yet lives on
                    self._process.kill()
            reason = self._exit_reason()
            try:
                loop.call_soon_threadsafe(self._fail_pending, reason)
            except RuntimeError:  # the loop closed meanwhile (server shutdown)
                self._death = reason
            self._finish()

        threading.Thread(target=learn_why, name="worker-end", daemon=True).start()

    def _fail_pending(self, reason: str) -> None:
        self._death = reason
        pending, self._pending = self._pending, {}
        for answer, slot in pending.values():
            if slot is not None:
                slot.close()
            if not answer.done():
                answer.set_exception(WorkerDied(reason))
        if self._killed_because not in ("the model was unloaded", _RETIRED):
            logger.warning("model worker %s stopped: %s", self._process.pid, reason)

    def _finish_unattached(self) -> None:
        self._death = self._exit_reason()
        self._finish()

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

    def _finish(self) -> None:
        if self._cleaned.acquire(blocking=False):
            for slot in self._free_slots:
                slot.close()
            self._socket.close()
            shutil.rmtree(self._directory, ignore_errors=True)
