"""The scheduler between the inference routes and `Session.run`: who runs next, and which
requests run together.

It owns three things:
- **Slots.** At most `--max-concurrent-inferences` session runs at once over all models, and
  at most a model's own `max_concurrency` for that model (a load option; default: the
  server's limit, as before there were per-model limits).
- **A fair queue across models.** When no slot is free, requests wait in their model's FIFO
  queue, and a freed slot goes to the next model in round-robin order, so a model flooded by
  many clients takes one turn per round and cannot starve another model's requests.
- **Dynamic batching** (Triton's `dynamic_batching`), opt-in per model with `max_batch_size`:
  queued requests whose tensors agree on everything but the first axis are concatenated
  along it, run once, and the outputs are split back by rows. A batch is sent when it
  reaches `max_batch_size` or one of the `preferred_batch_sizes`, or when its oldest request
  has waited `max_queue_delay_us`. A batched run that fails is repeated member by member, so
  one bad request cannot fail its neighbours.

When nothing waits and a slot is free, a request runs at once in its own task: the path of a
model without batching costs two counter updates.

`SchedulingOptions` also carries the owner's other per-model option, `warmup_shapes` (Triton's
`model_warmup`): the shapes of the zero inputs the model service runs once, through this
scheduler, before the model is reported ready.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from blindfold import tensors
from blindfold.server.limits import WARMUP_INPUT_LIMIT
from blindfold.server.refusals import InvalidRequest

if TYPE_CHECKING:
    from blindfold.server.runtime import Session

MAX_BATCH_SIZE = 1024
MAX_QUEUE_DELAY_US = 10_000_000  # 10 s: longer only hides a client that should batch itself
LARGE_BATCH = 1 << 20  # bytes of inputs concatenated off the event loop

MAX_WARMUP_INPUTS = 64
MAX_WARMUP_DIMS = 64  # numpy's own limit (tensors.MAX_DIMENSIONS)
MAX_WARMUP_DIM = (1 << 31) - 1
MAX_WARMUP_NAME = 256

# The option names, as the load URL's query, Triton's load parameters and the SDK spell them.
OPTION_NAMES = (
    "max_batch_size",
    "max_queue_delay_us",
    "preferred_batch_sizes",
    "max_concurrency",
    "warmup_shapes",
)

# Input name -> the dimensions of its warm-up zeros, sorted by name (options are compared
# and hashed: the scheduler keys its queues by them).
WarmupShapes = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class SchedulingOptions:
    """How one model is scheduled; chosen by its owner at upload. The defaults are the
    behaviour without options: no batching, the server's concurrency limit."""

    max_batch_size: int = 0  # 0: requests run one by one
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_concurrency: int = 0  # 0: --max-concurrent-inferences
    warmup_shapes: WarmupShapes = ()  # (): only the worker's warm-up on the declared shapes

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> SchedulingOptions | None:
        """Options from query parameters (strings) or JSON load parameters; None when none
        was given. Every wrong value is a 400 naming the option and what it takes."""
        given = {name: values[name] for name in OPTION_NAMES if name in values}
        if not given:
            return None
        batch = _integer(given, "max_batch_size", 0, MAX_BATCH_SIZE)
        delay = _integer(given, "max_queue_delay_us", 0, MAX_QUEUE_DELAY_US)
        concurrency = _integer(given, "max_concurrency", 0, 1 << 16)
        preferred = _sizes(given.get("preferred_batch_sizes"))
        if (delay or preferred) and not batch:
            raise InvalidRequest(
                "max_queue_delay_us and preferred_batch_sizes apply to dynamic batching only: "
                "give max_batch_size too",
            )
        if any(size > batch for size in preferred):
            raise InvalidRequest(
                f"preferred_batch_sizes {list(preferred)} must each be at most max_batch_size "
                f"({batch})",
            )
        warmup = _warmup_shapes(given.get("warmup_shapes"))
        return cls(batch, delay, preferred, concurrency, warmup)

    def check_model(self, session: Session) -> None:
        """Whether the model can take these options (400 at upload, naming the tensors):
        the warm-up shapes must fit its inputs, and batching splits outputs by their first
        axis, so every input and output needs a dynamic one."""
        self._warmup_plan(session)
        if not self.batching:
            return
        fixed = [
            f"{kind} {spec.name!r} has shape {list(spec.shape)}"
            for kind, specs in (("input", session.inputs), ("output", session.outputs))
            for spec in specs
            if not spec.shape or spec.shape[0] != -1
        ]
        if fixed:
            raise InvalidRequest(
                "dynamic batching (max_batch_size) needs a dynamic first axis, the batch axis, "
                f"on every input and output, but {'; '.join(fixed)}. Export the model with a "
                "dynamic batch dimension (e.g. torch.onnx.export(dynamic_axes=...)) or upload "
                "it without max_batch_size",
            )

    def warmup_dimensions(self) -> str:
        """The warm-up shapes as logs show them, `1x3x640x640, 1x128`: dimensions only,
        never input names (they come from the model)."""
        return ", ".join("x".join(map(str, dims)) for _, dims in self.warmup_shapes)

    def warmup_feeds(self, session: Session) -> dict[str, np.ndarray] | None:
        """The zero inputs of the configured warm-up (None when none is configured): the
        named inputs in their configured shapes, the others in their declared shapes with
        dynamic dimensions 1 (as the worker's own warm-up)."""
        shapes = self._warmup_plan(session)
        if shapes is None:
            return None
        feeds: dict[str, np.ndarray] = {}
        for name, (shape, entry) in shapes.items():
            if entry.oip == "BYTES":  # the wire's BYTES elements are bytes objects
                feeds[name] = np.full(shape, b"", dtype=object)
            else:
                feeds[name] = np.zeros(shape, dtype=entry.numpy)
        return feeds

    def _warmup_plan(
        self, session: Session
    ) -> dict[str, tuple[tuple[int, ...], tensors.DataType]] | None:
        """Each input's warm-up shape and datatype; a 400 when a configured name is not an
        input, a shape does not fit its input or the zeros exceed WARMUP_INPUT_LIMIT."""
        if not self.warmup_shapes:
            return None
        configured = dict(self.warmup_shapes)
        specs = {spec.name: spec for spec in session.inputs}
        unknown = [name for name in configured if name not in specs]
        if unknown:
            raise InvalidRequest(
                f"warmup_shapes names {_names(unknown)}, not an input of the model; its "
                f"inputs are {_names(list(specs))}",
            )
        plan: dict[str, tuple[tuple[int, ...], tensors.DataType]] = {}
        total = 0
        for name, spec in specs.items():
            if spec.datatype not in _DATATYPES:
                raise InvalidRequest(
                    f"warmup_shapes: input {name!r} is a {spec.datatype[:64]}, not a tensor "
                    "Blindfold can send, so the model cannot be warmed up: upload it without "
                    "warmup_shapes",
                )
            entry = tensors.by_oip(spec.datatype)
            shape = configured.get(name)
            if shape is None:
                shape = tuple(dim if dim >= 0 else 1 for dim in spec.shape)
            else:
                _check_fits(name, shape, spec.shape)
            plan[name] = (shape, entry)
            total += tensors.element_count(shape) * entry.numpy.itemsize
            if total > WARMUP_INPUT_LIMIT:
                raise InvalidRequest(
                    f"warmup_shapes: the warm-up inputs would take more than "
                    f"{WARMUP_INPUT_LIMIT >> 20} MiB of zeros; configure smaller shapes",
                )
        return plan

    def to_json(self) -> dict[str, Any]:
        # warmup_shapes only when set: stored rows MAC this document (ModelRecord.canonical),
        # and rows written before the option existed must still authenticate.
        document: dict[str, Any] = {
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "max_concurrency": self.max_concurrency,
        }
        if self.warmup_shapes:
            document["warmup_shapes"] = {name: list(dims) for name, dims in self.warmup_shapes}
        return document


DEFAULT = SchedulingOptions()


def _integer(values: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = values.get(name, 0)
    if _digits(value):
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}")
    return value


def _digits(value: Any) -> bool:
    # ASCII only: str.isdigit() also accepts '²', which int() refuses (a 500, not a 400).
    return isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()


def _sizes(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or len(items) > 64:
        raise InvalidRequest("preferred_batch_sizes must be a list of sizes, e.g. [4, 8] or '4,8'")
    sizes = tuple(
        _integer({"preferred_batch_sizes": item}, "preferred_batch_sizes", 1, MAX_BATCH_SIZE)
        for item in items
        if not (isinstance(item, str) and not item.strip())
    )
    return tuple(sorted(set(sizes)))


_DATATYPES = frozenset(tensors.SUPPORTED_DATATYPES)
_WARMUP_FORMS = (
    'warmup_shapes must map input names to dimensions: {"input": [1, 3, 640, 640]} in a '
    "JSON load request, or 'input:1x3x640x640,mask:1x128' (or that JSON) as a query parameter"
)


def _warmup_shapes(value: Any) -> WarmupShapes:
    """The configured warm-up shapes, as given: their fit to the model's inputs is checked
    once it is loaded (`warmup_feeds`). "" or {} configure none."""
    if value is None:
        return ()
    if isinstance(value, str) and value.lstrip().startswith("{"):
        # The JSON form in a query parameter (the SDK's): names may hold ',' there.
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: nesting beyond Python's
            raise InvalidRequest(f"{_WARMUP_FORMS}; the JSON given does not parse") from None
    if isinstance(value, str):
        # Split at each item's last ':': input names exported from TensorFlow end in ':0'.
        items: list[tuple[Any, Any]] = []
        for item in value.split(","):
            if not item.strip():
                continue
            name, colon, dims = item.rpartition(":")
            if not colon or not name:
                raise InvalidRequest(f"{_WARMUP_FORMS}; got an item without 'name:dims'")
            items.append((name, dims))
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise InvalidRequest(_WARMUP_FORMS)
    if len(items) > MAX_WARMUP_INPUTS:
        raise InvalidRequest(f"warmup_shapes names at most {MAX_WARMUP_INPUTS} inputs")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in items:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_WARMUP_NAME:
            raise InvalidRequest(
                f"warmup_shapes: input names must be 1 to {MAX_WARMUP_NAME} characters"
            )
        if name in shapes:
            raise InvalidRequest(f"warmup_shapes names input {name!r} twice")
        shapes[name] = _dims(name, dims)
    return tuple(sorted(shapes.items()))


def _dims(name: str, value: Any) -> tuple[int, ...]:
    items = value.split("x") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or len(items) > MAX_WARMUP_DIMS:
        raise InvalidRequest(
            f"warmup_shapes: the shape of {name!r} must be a list of at most {MAX_WARMUP_DIMS} "
            "dimensions, e.g. [1, 3, 640, 640] or '1x3x640x640'",
        )
    dims = []
    for item in items:
        if _digits(item):
            item = int(item)
        if type(item) is not int or not 1 <= item <= MAX_WARMUP_DIM:
            raise InvalidRequest(
                f"warmup_shapes: the dimensions of {name!r} must be whole numbers from 1 to "
                f"{MAX_WARMUP_DIM}",
            )
        dims.append(item)
    return tuple(dims)


def _check_fits(name: str, shape: tuple[int, ...], declared: tuple[int, ...]) -> None:
    fits = len(shape) == len(declared) and all(
        want in (-1, dim) for dim, want in zip(shape, declared, strict=True)
    )
    if not fits:
        shown = ["?" if dim == -1 else dim for dim in declared]
        raise InvalidRequest(
            f"warmup_shapes gives input {name!r} the shape {list(shape)}, but the model "
            f"declares {shown} ('?': any size): give as many dimensions, and the declared "
            "size for each fixed one",
        )


def _names(names: list[str], shown: int = 8) -> str:
    text = ", ".join(repr(name[:MAX_WARMUP_NAME]) for name in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


@dataclass
class RunTiming:
    """Where a run's time went, for the metrics: waiting for a slot, then in the model."""

    queued: float = 0.0
    ran: float = 0.0


@dataclass(eq=False)
class _Pending:
    """One request waiting in its model's queue."""

    output_names: list[str]
    feeds: dict[str, np.ndarray]
    future: asyncio.Future[list[np.ndarray]]
    arrival: float
    rows: int  # its size along the batch axis
    key: Hashable | None  # what must agree for requests to share a batch; None: runs alone
    started: float = 0.0  # perf_counter() when its run began


@dataclass(eq=False)
class _ModelQueue:
    session: Session
    options: SchedulingOptions
    limit: int
    waiting: deque[_Pending] = field(default_factory=deque)
    running: int = 0
    timer: asyncio.TimerHandle | None = None

    def take(self, now: float) -> list[_Pending] | None:
        """The next batch to run, or None while the model is at its limit or its batch is
        still waiting for company (within `max_queue_delay_us`)."""
        if self.running >= self.limit or not self.waiting:
            return None
        head = self.waiting[0]
        options = self.options
        if not options.batching or head.key is None or head.rows >= options.max_batch_size:
            return [self.waiting.popleft()]
        members, total, full = [], 0, False
        for item in self.waiting:
            if item.key != head.key:
                continue
            if total + item.rows > options.max_batch_size:
                full = True
                break
            members.append(item)
            total += item.rows
        full = full or total == options.max_batch_size
        # The largest preferred size an arrival-ordered prefix reaches exactly.
        sizes = itertools.accumulate(item.rows for item in members)
        preferred = [n for n, size in enumerate(sizes, 1) if size in options.preferred_batch_sizes]
        if preferred:
            members = members[: preferred[-1]]
        elif not full and now < head.arrival + options.max_queue_delay_us / 1e6:
            return None
        chosen = set(map(id, members))
        self.waiting = deque(item for item in self.waiting if id(item) not in chosen)
        return members

    def deadline(self) -> float:
        return self.waiting[0].arrival + self.options.max_queue_delay_us / 1e6


class Scheduler:
    """Admits session runs within the slots, fairly across models, batching where asked."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._queues: dict[tuple[int, SchedulingOptions], _ModelQueue] = {}
        self._ring: deque[_ModelQueue] = deque()  # models with waiting requests, in turn
        self._tasks: set[asyncio.Task[None]] = set()  # running batches (the loop keeps weak refs)
        self.batches = 0  # batched session runs (for /metrics)
        self.batched_requests = 0

    @property
    def queued(self) -> int:
        return sum(len(queue.waiting) for queue in self._ring)

    async def run(
        self,
        session: Session,
        output_names: list[str],
        feeds: dict[str, np.ndarray],
        options: SchedulingOptions = DEFAULT,
        timing: RunTiming | None = None,
    ) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        arrival = time.perf_counter()  # not loop.time(): uvloop's counts whole milliseconds
        limited = 0 < options.max_concurrency < self.slots
        if self._free and not self._ring and not options.max_queue_delay_us:
            # Nothing waits anywhere: run now, in this task. Only a model with its own
            # limit needs its count of runs; the free slots bound every other model.
            queue = self._queue(session, options) if limited else None
            if queue is None or queue.running < queue.limit:
                self._free -= 1
                if queue is not None:
                    queue.running += 1
                try:
                    return await session.run(output_names, feeds)
                finally:
                    self._finished(queue)
                    if timing is not None:
                        timing.ran = time.perf_counter() - arrival
        queue = self._queue(session, options)
        rows, key = _batch_key(output_names, feeds) if options.batching else (0, None)
        pending = _Pending(output_names, feeds, loop.create_future(), loop.time(), rows, key)
        if not queue.waiting:
            self._ring.append(queue)
        queue.waiting.append(pending)
        self._dispatch()
        try:
            result = await pending.future
        except asyncio.CancelledError:
            if pending in queue.waiting:  # gone before its turn: leave no trace
                queue.waiting.remove(pending)
                if not queue.waiting:
                    self._ring.remove(queue)
            raise
        if timing is not None and pending.started:
            timing.queued = pending.started - arrival
            timing.ran = time.perf_counter() - pending.started
        return result

    def _queue(self, session: Session, options: SchedulingOptions) -> _ModelQueue:
        key = (id(session), options)
        queue = self._queues.get(key)
        if queue is None or queue.session is not session:
            limit = min(options.max_concurrency or self.slots, self.slots)
            queue = self._queues[key] = _ModelQueue(session, options, limit)
        return queue

    def _finished(self, queue: _ModelQueue | None) -> None:
        self._free += 1
        if queue is not None:
            queue.running -= 1
            key = (id(queue.session), queue.options)
            if not queue.running and not queue.waiting and self._queues.get(key) is queue:
                del self._queues[key]  # idle queues are not kept (nor those of unloaded models)
        if self._ring:
            self._dispatch()

    def _dispatch(self) -> None:
        """Hands free slots to waiting models in round-robin order."""
        loop = asyncio.get_running_loop()
        while self._free and self._ring:
            now = loop.time()
            for _ in range(len(self._ring)):
                queue = self._ring.popleft()
                batch = queue.take(now)
                if queue.waiting:
                    self._ring.append(queue)
                    if batch is None and queue.running < queue.limit:
                        self._wake_at(queue, queue.deadline())
                if batch:
                    break
            else:
                return
            self._free -= 1
            queue.running += 1
            task = loop.create_task(self._execute(queue, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _wake_at(self, queue: _ModelQueue, deadline: float) -> None:
        if queue.timer is not None and queue.timer.when() <= deadline:
            return
        if queue.timer is not None:
            queue.timer.cancel()

        def wake() -> None:
            queue.timer = None
            self._dispatch()

        queue.timer = asyncio.get_running_loop().call_at(deadline, wake)

    async def _execute(self, queue: _ModelQueue, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        for item in batch:
            item.started = started
        try:
            if len(batch) == 1:
                await _run_alone(queue.session, batch[0])
            else:
                await self._run_batch(queue.session, batch)
        except Exception as exc:  # never leave a member waiting forever
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._finished(queue)

    async def _run_batch(self, session: Session, batch: list[_Pending]) -> None:
        self.batches += 1
        self.batched_requests += len(batch)
        names = list(batch[0].feeds)
        total = sum(item.rows for item in batch)
        size = sum(a.nbytes for item in batch for a in item.feeds.values())
        if size > LARGE_BATCH:
            feeds = await asyncio.to_thread(_concatenate, names, batch)
        else:
            feeds = _concatenate(names, batch)
        try:
            outputs = await session.run(batch[0].output_names, feeds)
        except Exception:  # a refusal, or anything a member's values provoked
            outputs = None
        del feeds
        if outputs is None or any(out.ndim == 0 or out.shape[0] != total for out in outputs):
            # A member made the run fail (or the model does not keep rows apart): every
            # member runs alone, so only a failing request fails.
            for item in batch:
                await _run_alone(session, item)
            return
        start = 0
        for item in batch:
            stop = start + item.rows
            if not item.future.done():  # its client may have gone
                item.future.set_result([out[start:stop] for out in outputs])
            start = stop


async def _run_alone(session: Session, item: _Pending) -> None:
    try:
        result = await session.run(item.output_names, item.feeds)
    except Exception as exc:  # handed to the request's own task, which reports it
        if not item.future.done():
            item.future.set_exception(exc)
        return
    if not item.future.done():
        item.future.set_result(result)


def _batch_key(
    output_names: list[str], feeds: Mapping[str, np.ndarray]
) -> tuple[int, Hashable | None]:
    """The request's rows, and what another request must match to join its batch: the
    same inputs with the same datatypes and the same shapes beyond the first axis, and
    the same outputs asked for. Requests whose inputs disagree on the rows run alone."""
    rows = {array.shape[0] if array.ndim else -1 for array in feeds.values()}
    if len(rows) != 1 or -1 in rows:
        return 0, None
    key = tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(feeds.items()))
    return rows.pop(), (key, tuple(output_names))


def _concatenate(names: list[str], batch: list[_Pending]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([item.feeds[name] for item in batch]) for name in names}
