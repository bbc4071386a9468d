"""onnxruntime sessions as the rest of the server sees them, and the runner that admits runs.

A session is one model (one SHA-256) ready to run. By default it lives in its own worker
process (`IsolatedSession`, see `workers.py` and `worker.py`): the model never shares memory
with the TLS key, the receipt key, token hashes or the sealing key, cannot read the
server's files, and runs under memory and time limits. `InProcessSession` runs it inside the
front process instead; it exists only for `--unsafe-no-isolation` benchmarks.

Every session costs memory; `MemoryBudget` admits a new one only while the estimated total
stays under `--max-model-memory`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from blindfold import tensors
from blindfold.server import ort_extensions, workers
from blindfold.server import tensor_frames as frames
from blindfold.server.limits import Limits, MiB
from blindfold.server.model_bytes import ModelBytes, ModelData
from blindfold.server.refusals import (
    Conflict,
    InferenceTimeout,
    InvalidInput,
    InvalidModel,
    OutOfMemory,
    Refusal,
    Unavailable,
    WorkerFailed,
)
from blindfold.server.scheduler import (
    DEFAULT,
    RunTiming,
    Scheduler,
    SchedulingOptions,
    WarmupShapes,
)
from blindfold.server.worker import (
    CONFINED_CHDIR,
    CONFINED_CHROOT,
    WorkerSettings,
    session_options,
    tensor_spec,
    to_ort,
    warm_up,
)
from blindfold.server.workers import ModelWorker, WorkerDied

logger = logging.getLogger("blindfold.server")

# What a worker needs besides the model: interpreter, libraries, thread stacks, arenas.
WORKER_ADDRESS_SPACE = 1024 * MiB
WORKER_RESIDENT = 64 * MiB
# onnxruntime holds the bytes it was given plus the initializers it made of them, and the
# graph optimizer briefly holds another copy while loading.
MODEL_COPIES_LOADING = 4
MODEL_COPIES_RESIDENT = 3
LARGE_INPUTS = 1 << 20  # bytes of inputs copied to the worker off the event loop
TIMEOUT_GRACE = 5.0  # seconds the front waits past --inference-timeout before killing
MAX_SPEC_NAME = 4096


def memory_cost(model_size: int, isolated: bool = True) -> int:
    """The memory a loaded model is expected to hold, for admission (an estimate)."""
    return MODEL_COPIES_RESIDENT * model_size + (WORKER_RESIDENT if isolated else 0)


class MemoryBudget:
    """Admits sessions while the sum of their estimated costs stays under the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, cost: int) -> None:
        with self._lock:
            if self.used + cost > self.limit:
                raise OutOfMemory(
                    f"loading this model needs about {cost >> 20} MiB, and the loaded models "
                    f"already hold {self.used >> 20} of the {self.limit >> 20} MiB the server "
                    "allows (--max-model-memory); unload a model or raise the limit",
                )
            self.used += cost

    def release(self, cost: int) -> None:
        with self._lock:
            self.used = max(0, self.used - cost)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP datatype, or onnxruntime's type string for types the wire lacks
    shape: tuple[int, ...]  # -1 for dynamic dimensions

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Session:
    """What every session offers: its identity, its tensor specs, input checks, `run`."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def __init__(self, sha256: str, size: int, budget: MemoryBudget, cost: int) -> None:
        self.sha256 = sha256
        self.size = size
        self._budget = budget
        self._cost = cost
        self.closed = False

    keeps_model_bytes = False  # whether `model_bytes` can hand the model back

    def remember_warmup(self, options: SchedulingOptions) -> None:
        """Keeps a model's configured warm-up (`warmup_shapes`) that ran: a session whose
        worker is restarted after a crash runs it again."""

    def reopen_from(self, source: Callable[[], ModelData]) -> None:
        """Lets go of the copy of the model's bytes this session keeps for restarts (if it
        keeps one), to get them from `source` when needed: the model store's sealed blob,
        so that the server's memory holds each stored model once, as its session."""

    def model_bytes(self) -> ModelBytes | None:
        """A new handle on the model's bytes when this session keeps them (the caller closes
        it); None when it does not."""
        return None

    @property
    def admitted_memory(self) -> int:
        """The memory this session was admitted with (an estimate, see `memory_cost`)."""
        return self._cost

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        specs = {spec.name: spec for spec in self.inputs}
        missing = [name for name in specs if name not in feeds]
        if missing:
            raise InvalidInput(f"missing model inputs {missing}; the model expects {list(specs)}")
        for name, array in feeds.items():
            spec = specs.get(name)
            if spec is None:
                raise InvalidInput(f"unknown input {name!r}; the model expects {list(specs)}")
            datatype = tensors.np_to_oip_dtype(array.dtype)
            if datatype != spec.datatype:
                raise InvalidInput(
                    f"input {name!r} has datatype {datatype}, the model expects {spec.datatype}",
                )
            if len(array.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
            ):
                raise InvalidInput(
                    f"input {name!r} has shape {list(array.shape)}, the model expects "
                    f"{list(spec.shape)} (-1 = any size)",
                )

    async def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs the model; BYTES tensors are object arrays of bytes on both sides."""
        raise NotImplementedError

    def close(self) -> None:
        """Frees the session (idempotent); called when no model name refers to it any more."""
        if not self.closed:
            self.closed = True
            self._budget.release(self._cost)


class IsolatedSession(Session):
    """A session whose onnxruntime lives in a confined worker process, restarted on demand
    when it dies. The model bytes wait for the next start in a sealed memfd, or, once
    `reopen_from` names a source (the store's sealed blob), there."""

    def __init__(
        self,
        data: ModelData,
        sha256: str,
        limits: Limits,
        budget: MemoryBudget,
        threads: int,
        custom_ops_library: str = "",
    ) -> None:
        cost = memory_cost(len(data))
        budget.reserve(cost)
        super().__init__(sha256, len(data), budget, cost)
        self._limits = limits
        self._settings = WorkerSettings(
            directory="",
            address_space_bytes=_address_space(limits, len(data)),
            inference_timeout=limits.inference_timeout,
            intra_op_threads=threads,
            concurrency=limits.max_concurrent_inferences,
            custom_ops_library=custom_ops_library,
        )
        # The restart copy: the upload's own sealed memfd when it streamed into one; None
        # once `reopen_from` gave a source to reopen it from.
        self._model_fd: int | None = _memfd_of(data)
        self._reopen: Callable[[], ModelData] | None = None
        self._start_lock = threading.Lock()
        self._worker: ModelWorker | None = None
        self._warmups: dict[WarmupShapes, SchedulingOptions] = {}
        try:
            started = self._start()
            ready = started.ready if started is not None else {}
            self.inputs = _specs(ready.get("inputs"))
            self.outputs = _specs(ready.get("outputs"))
            self.confinement = _confinement(ready)
        except BaseException:
            self.close()
            raise

    def _start(self) -> ModelWorker | None:
        """Starts a worker unless a live one exists; returns the one this call started."""
        with self._start_lock:
            if self.closed:
                raise Conflict("the model was unloaded while this request waited")
            if self._worker is not None and self._worker.alive:
                return None
            timeout = max(120.0, self._limits.inference_timeout)
            model_fd = self._model_fd if self._model_fd is not None else self._reopened()
            try:
                worker = ModelWorker(model_fd, self._settings, timeout)
            except WorkerDied as exc:
                # SIGKILL: the kernel ended it at its memory limit.
                refused = OutOfMemory if "SIGKILL" in exc.reason else InvalidModel
                raise refused(
                    f"onnxruntime could not load the model: its worker process stopped "
                    f"({exc.reason}); a model needing more than --max-inference-memory "
                    "while loading is refused",
                ) from None
            finally:
                if model_fd != self._model_fd:  # reopened for this start only
                    os.close(model_fd)
            if not worker.ready.get("ok"):
                worker.close()
                detail = _printable(str(worker.ready.get("detail", "")))
                raise InvalidModel(f"onnxruntime cannot load the model: {detail}")
            self._worker = worker
            _report_confinement(_confinement(worker.ready))
            _report_warmup(self.sha256, worker.ready)
            return worker

    def _reopened(self) -> int:
        """A new sealed memfd of the model, from the source `reopen_from` gave."""
        if self._reopen is None:  # (only when closed, which `_start` refuses first)
            raise Conflict("the model was unloaded while this request waited")
        data = self._reopen()
        try:
            return _memfd_of(data)
        finally:
            if isinstance(data, ModelBytes):
                data.close()

    def remember_warmup(self, options: SchedulingOptions) -> None:
        if options.warmup_shapes:
            self._warmups[options.warmup_shapes] = options

    def reopen_from(self, source: Callable[[], ModelData]) -> None:
        with self._start_lock:
            if self.closed or self._model_fd is None:
                return
            self._reopen = source
            os.close(self._model_fd)
            self._model_fd = None

    async def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        worker = self._worker
        if worker is None or not worker.alive:
            started = await asyncio.to_thread(self._start)
            worker = self._worker
            if worker is None:  # close() ran between the start and here
                raise Conflict("the model was unloaded while this request waited")
            if started is not None:
                await self._warm_up_restarted(started)
        names = list(feeds)
        arrays = [feeds[name] for name in names]
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the run in a task of
            # its own, one more trip through the event loop on every inference.
            async with asyncio.timeout(self._limits.inference_timeout + TIMEOUT_GRACE):
                message = await worker.run(
                    names, arrays, output_names, send_off_loop=_heavy(arrays)
                )
        except TimeoutError:
            worker.kill("a run exceeded --inference-timeout")
            raise _timeout(self._limits) from None
        except WorkerDied as exc:
            raise Unavailable(
                f"the worker process running this model stopped during the request "
                f"({exc.reason}); the server keeps serving and restarts the model on the next "
                "request",
            ) from None
        header = message.header
        if not header.get("ok"):
            if header.get("error") == "memory":
                worker.retire()
            raise _run_error(header.get("error"), self._limits)
        try:
            if len(message.data) > LARGE_INPUTS or _has_bytes_tensors(header):
                return await asyncio.to_thread(frames.arrays_of, message, output_names)
            return frames.arrays_of(message, output_names)
        except frames.FrameError:
            worker.kill("it answered with malformed tensors")
            raise WorkerFailed(
                "the model's worker process answered with malformed tensors"
            ) from None

    async def _warm_up_restarted(self, worker: ModelWorker) -> None:
        """Runs the remembered configured warm-ups on a worker restarted after a crash, before
        the request that restarted it: the worker's own warm-up covers only the declared
        shapes. Straight to the worker, not through the scheduler, whose slot that request
        holds. An outcome other than "ok" is only logged: the request then finds the worker
        as the warm-up left it."""
        for options in list(self._warmups.values()):
            shapes = options.warmup_dimensions()
            try:
                feeds = await asyncio.to_thread(options.warmup_feeds, self)
            except Refusal:
                continue
            if feeds is None:
                continue
            names = list(feeds)
            try:
                async with asyncio.timeout(self._limits.inference_timeout + TIMEOUT_GRACE):
                    message = await worker.run(
                        names,
                        [feeds[name] for name in names],
                        self.output_names,
                        send_off_loop=True,
                    )
                error = message.header.get("error")
                outcome = (
                    "ok" if message.header.get("ok") else f"failed ({_printable(str(error))[:40]})"
                )
            except TimeoutError:
                worker.kill("a run exceeded --inference-timeout")
                outcome = "failed (it exceeded --inference-timeout)"
            except WorkerDied as exc:
                outcome = f"failed (the worker stopped: {exc.reason})"
            finally:
                del feeds
            logger.info(
                "model sha256:%s: its restarted worker ran the configured warm-up "
                "(warmup_shapes %s): %s",
                self.sha256,
                shapes,
                outcome,
            )
            if not worker.alive:
                return

    keeps_model_bytes = True

    def model_bytes(self) -> ModelBytes | None:
        """The model's sealed memfd, as a new descriptor: replicas copy models from it rather
        than keep a second copy in memory."""
        with self._start_lock:
            if self.closed:
                return None
            if self._model_fd is not None:
                return ModelBytes(os.dup(self._model_fd), self.size, self.sha256)
            try:
                return ModelBytes(self._reopened(), self.size, self.sha256)
            except Refusal:
                return None  # the caller has other ways, or reports the model as missing

    def close(self) -> None:
        with self._start_lock:
            if self.closed:
                return
            super().close()
            if self._worker is not None:
                self._worker.close()
            if self._model_fd is not None:
                os.close(self._model_fd)


def _memfd_of(data: ModelData) -> int:
    """A new descriptor of a sealed memfd holding `data` (its own, when it has one)."""
    return os.dup(data.fd) if isinstance(data, ModelBytes) else frames.sealed_memfd(data)


def _confinement(ready: Mapping[str, Any]) -> str:
    # The answer comes from a process that has run an untrusted model: only known values pass.
    value = ready.get("confinement")
    return value if value in (CONFINED_CHROOT, CONFINED_CHDIR) else "unknown"


def _report_warmup(sha256: str, ready: Mapping[str, Any]) -> None:
    """Logs whether the worker ran the model once on zero inputs before reporting it ready
    (so the first user request pays no first-run cost). A failed warm-up does not refuse
    the model: some models need particular shapes or values."""
    # The answer comes from a process that has run an untrusted model: printable, bounded.
    warmup = _printable(str(ready.get("warmup", "not reported")))[:200]
    if warmup == "ok":
        logger.info("model sha256:%s warmed up (one run on zero inputs) before ready", sha256)
    else:
        logger.warning(
            "model sha256:%s was not warmed up (%s); its first request pays onnxruntime's "
            "first-run cost, unless a model using it has warm-up shapes (warmup_shapes)",
            sha256,
            warmup,
        )


_reported_confinements: set[str] = set()
_report_lock = threading.Lock()


def _report_confinement(confinement: str) -> None:
    """Logs what confinement model workers got, once per kind: it depends on what the host
    (or container runtime) allows, which the operator must know."""
    with _report_lock:
        if confinement in _reported_confinements:
            return
        _reported_confinements.add(confinement)
    if confinement == CONFINED_CHROOT:
        logger.info(
            "model workers are confined: chroot into an empty directory inside their own "
            "user and mount namespace, no new privileges, memory and time limits"
        )
    elif confinement == CONFINED_CHDIR:
        logger.warning(
            "model workers are confined only to an empty working directory: the system refused "
            "them a user namespace (unshare), so a model that takes over its worker could read "
            "every file this server's user can read. Allow user namespaces (in a container: a "
            "seccomp profile that permits unshare) to get chroot"
        )
    else:
        logger.warning("a model worker reported no known confinement")


class InProcessSession(Session):
    """UNSAFE: onnxruntime inside the front process, next to every secret. Only for
    measuring what isolation costs (`--unsafe-no-isolation`)."""

    def __init__(
        self,
        data: bytes,
        sha256: str,
        budget: MemoryBudget,
        threads: int,
        executor: ThreadPoolExecutor,
        custom_ops_library: str = "",
    ) -> None:
        import onnxruntime as ort

        cost = memory_cost(len(data), isolated=False)
        budget.reserve(cost)
        super().__init__(sha256, len(data), budget, cost)
        self._executor = executor
        options = session_options(threads, custom_ops_library)
        try:
            self._session = ort.InferenceSession(
                data, sess_options=options, providers=["CPUExecutionProvider"]
            )
            self._session._model_bytes = None  # see worker._load: a second copy otherwise
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            self.close()
            raise InvalidModel(
                f"onnxruntime cannot load the model: {_printable(str(exc))}"
            ) from None
        self.inputs = [_trusted_spec(arg) for arg in self._session.get_inputs()]
        self.outputs = [_trusted_spec(arg) for arg in self._session.get_outputs()]
        # No watchdog runs in the front process, and this unsafe mode enforces no time limit.
        _report_warmup(sha256, {"warmup": warm_up(self._session, 3600.0)})

    async def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._run, output_names, feeds)
        except Refusal:
            raise
        except Exception:
            raise _run_error("run_failed", None) from None

    def _run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ort_feeds = {name: _to_ort(array) for name, array in feeds.items()}
        return [_from_ort(value) for value in self._session.run(output_names, ort_feeds)]


def _heavy(arrays: list[np.ndarray]) -> bool:
    """Inputs whose copy or BYTES encoding would hold the event loop for too long."""
    return any(a.dtype == object for a in arrays) or sum(a.nbytes for a in arrays) > LARGE_INPUTS


def _has_bytes_tensors(header: dict[str, Any]) -> bool:
    described = header.get("tensors")
    return isinstance(described, list) and any(
        isinstance(t, dict) and t.get("datatype") == "BYTES" for t in described
    )


def _trusted_spec(arg: Any) -> TensorSpec:
    spec = tensor_spec(arg)  # made in this process: nothing to check
    return TensorSpec(spec["name"], spec["datatype"], tuple(spec["shape"]))


def _to_ort(array: np.ndarray) -> np.ndarray:
    try:
        return to_ort(array)
    except UnicodeDecodeError:
        raise _run_error("bad_input", None) from None


def _from_ort(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise _run_error("unsupported_output", None)
    if value.dtype.kind in ("U", "O"):
        out = np.empty(value.shape, dtype=object)
        flat = out.reshape(-1)
        for index, item in enumerate(value.reshape(-1)):
            flat[index] = item.encode() if isinstance(item, str) else bytes(item)
        return out
    return value


def _run_error(kind: Any, limits: Limits | None) -> Refusal:
    # Only the kind of failure is reported: onnxruntime's messages can quote input values.
    if kind == "timeout" and limits is not None:
        return _timeout(limits)
    if kind == "memory":
        limit = f" ({limits.max_inference_memory >> 20} MiB)" if limits else ""
        return OutOfMemory(
            f"the model needed more memory for these inputs than the server allows per "
            f"inference{limit}, --max-inference-memory; send smaller inputs",
        )
    if kind == "bad_input":
        return InvalidInput("BYTES inputs must be UTF-8 text for ONNX models")
    if kind == "unsupported_output":
        return InvalidModel(
            "the model returned an output Blindfold cannot send (a sequence, a map or an "
            "unsupported datatype)",
        )
    return InvalidInput(
        "onnxruntime could not run the model on these inputs; names, datatypes and shapes "
        "were accepted, so check the input values' ranges",
    )


def _printable(text: str, limit: int = 300) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _timeout(limits: Limits) -> InferenceTimeout:
    return InferenceTimeout(
        f"the inference took longer than the server's limit of {limits.inference_timeout:g} s "
        "(--inference-timeout) and was stopped",
    )


def _address_space(limits: Limits, model_size: int) -> int:
    if not limits.max_inference_memory:
        return 0
    # The slots' shared buffers are mapped in the worker too; they are the front's memory,
    # not the model's, so they come on top of what the model may take.
    shared = workers.MAX_SLOTS * 2 * workers.SHARED_LIMIT
    return (
        WORKER_ADDRESS_SPACE
        + shared
        + MODEL_COPIES_LOADING * model_size
        + limits.max_inference_memory
    )


def _specs(raw: Any) -> list[TensorSpec]:
    """Tensor specs as a worker described them, checked (a worker is not trusted)."""
    if not isinstance(raw, list):
        raise WorkerFailed("the model's worker process described no tensors")
    specs = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        datatype = item.get("datatype") if isinstance(item, dict) else None
        shape = item.get("shape") if isinstance(item, dict) else None
        if (
            not isinstance(name, str)
            or len(name) > MAX_SPEC_NAME
            or not isinstance(datatype, str)
            or len(datatype) > 64
            or not isinstance(shape, list)
            or len(shape) > frames.MAX_DIMS
            or not all(type(dim) is int and dim >= -1 for dim in shape)
        ):
            raise WorkerFailed("the model's worker process described its tensors wrongly")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return specs


class InferenceRunner:
    """Runs inferences through the scheduler (at most `max_concurrent_inferences` at once,
    fair across models, batched where a model asks for it), makes sessions of the kind the
    server was started with, and runs other blocking work off the event loop."""

    def __init__(self, limits: Limits, intra_op_threads: int = 0) -> None:
        self.limits = limits
        self.budget = MemoryBudget(limits.max_model_memory)
        self._threads = intra_op_threads
        self._custom_ops = ort_extensions.library_path() if limits.ort_extensions else ""
        self.scheduler = Scheduler(limits.max_concurrent_inferences)
        self._executor = ThreadPoolExecutor(
            max_workers=limits.max_concurrent_inferences, thread_name_prefix="infer"
        )

    def new_session(self, data: ModelData, sha256: str) -> Session:
        """A ready session for `data` (blocking: loads the model)."""
        if self.limits.isolation:
            return IsolatedSession(
                data, sha256, self.limits, self.budget, self._threads, self._custom_ops
            )
        if isinstance(data, ModelBytes):  # onnxruntime in this process takes only bytes
            with data.view() as view:
                data = bytes(view)
        return InProcessSession(
            data, sha256, self.budget, self._threads, self._executor, self._custom_ops
        )

    async def run(
        self,
        session: Session,
        output_names: list[str],
        feeds: dict[str, np.ndarray],
        options: SchedulingOptions = DEFAULT,
        timing: RunTiming | None = None,
    ) -> list[np.ndarray]:
        return await self.scheduler.run(session, output_names, feeds, options, timing)

    async def call(self, function: Any, *args: Any) -> Any:
        """Runs other blocking work (model parsing, session creation) on the same pool."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
