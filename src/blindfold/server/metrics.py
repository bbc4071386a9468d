"""Every Prometheus metric the server exports (`GET /metrics`), defined once, on a registry
of its own per app (several servers may live in one process, e.g. in tests).

What may appear here: counts, durations, sizes, and the names of public models. What never
does: anything derived from tensor contents, tokens, or the name of a restricted model
(whoever scrapes may not know it exists): those are labelled `(restricted)`. Routes are
labelled by their template (`/v2/models/{name}/infer`), never by the path a client sent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from blindfold.errors import RequestRejected
from blindfold.server import http_errors
from blindfold.server.refusals import Refusal
from blindfold.server.scheduler import RunTiming

RESTRICTED = "(restricted)"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: from sub-millisecond runs of small models to the default 60 s inference timeout.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip


def model_label(name: str, public: bool) -> str:
    """A model's name as metrics may show it: only public models are named."""
    return name if public else RESTRICTED


def outcome(status: int) -> str:
    """`ok`, `rejected` (the client's request was refused, 4xx) or `failed` (5xx)."""
    if status < 400:
        return "ok"
    return "rejected" if status < 500 else "failed"


@dataclass(frozen=True)
class LoadedModel:
    """What the live gauges need to know of a loaded model."""

    name: str
    public: bool
    memory_bytes: int  # the estimate the memory budget admitted it with


@dataclass(frozen=True)
class Snapshot:
    """The server's state at scrape time, read by the collector."""

    tee_kind: str
    started: float
    models: list[LoadedModel]
    unavailable_models: int
    sessions: int
    memory_budget_bytes: int
    collateral_valid_until: float | None
    evidence_made_at: float | None
    cluster_members: int | None = None  # None: not a cluster replica
    queued_inferences: int = 0  # waiting for a slot or a batch (server/scheduler.py)
    batches: int = 0  # batched session runs
    batched_requests: int = 0  # requests that ran in them


class _LiveState(Collector):
    """Gauges computed when scraped (models, memory, evidence and collateral ages)."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        state = self._snapshot()
        info = GaugeMetricFamily(
            "blindfold_tee_info", "The TEE this server runs in", labels=["kind"]
        )
        info.add_metric([state.tee_kind], 1)
        yield info
        yield GaugeMetricFamily(
            "blindfold_uptime_seconds",
            "Seconds since the server started",
            value=now - state.started,
        )
        yield GaugeMetricFamily(
            "blindfold_models", "Models loaded and ready", value=len(state.models)
        )
        yield GaugeMetricFamily(
            "blindfold_queued_inferences",
            "Inferences waiting for a slot or for their batch to fill",
            value=state.queued_inferences,
        )
        yield CounterMetricFamily(
            "blindfold_batches", "Batched session runs (dynamic batching)", value=state.batches
        )
        yield CounterMetricFamily(
            "blindfold_batched_requests",
            "Requests that ran inside a batched session run",
            value=state.batched_requests,
        )
        if state.cluster_members is not None:
            yield GaugeMetricFamily(
                "blindfold_cluster_members",
                "Replicas this one knows of and replicates to (itself excluded)",
                value=state.cluster_members,
            )
        yield GaugeMetricFamily(
            "blindfold_models_unavailable",
            "Stored models the server could not load",
            value=state.unavailable_models,
        )
        yield GaugeMetricFamily(
            "blindfold_sessions",
            "onnxruntime sessions (one per distinct model bytes, each in its worker)",
            value=state.sessions,
        )
        memory = GaugeMetricFamily(
            "blindfold_model_memory_bytes",
            "Estimated memory of each loaded model (restricted models summed as (restricted))",
            labels=["model"],
        )
        by_label: dict[str, int] = {}
        for model in state.models:
            label = model_label(model.name, model.public)
            by_label[label] = by_label.get(label, 0) + model.memory_bytes
        for label, size in sorted(by_label.items()):
            memory.add_metric([label], size)
        yield memory
        yield GaugeMetricFamily(
            "blindfold_model_memory_budget_bytes",
            "The memory loaded models may take (--max-model-memory)",
            value=state.memory_budget_bytes,
        )
        if state.evidence_made_at is not None:
            yield GaugeMetricFamily(
                "blindfold_evidence_age_seconds",
                "Age of the standing attestation evidence",
                value=now - state.evidence_made_at,
            )
        if state.collateral_valid_until is not None:
            yield GaugeMetricFamily(
                "blindfold_collateral_seconds_remaining",
                "Seconds until the attestation collateral expires (then clients refuse the server)",
                value=state.collateral_valid_until - now,
            )


class Metrics:
    """The server's metrics; `render()` is the body of `GET /metrics`."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        # (metric, label values) -> its child. prometheus_client's labels() checks the values
        # and takes a lock on every call, about 1.5 us, seven times per inference; the child
        # for given values never changes (none is ever removed), so each is looked up once.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "blindfold_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "blindfold_request_duration_seconds",
            "Whole HTTP request, from routing to the answer, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes_in = Counter(
            "blindfold_request_body_bytes",
            "Request body bytes received (as declared by Content-Length), by route template",
            ["route"],
            registry=registry,
        )
        self.bytes_out = Counter(
            "blindfold_response_body_bytes",
            "Response body bytes sent, by route template",
            ["route"],
            registry=registry,
        )
        self.inferences = Counter(
            "blindfold_inferences",
            "Inference requests by model and outcome (ok, rejected, failed)",
            ["model", "outcome"],
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "blindfold_inference_queue_seconds",
            "Time an inference waited for a slot (--max-concurrent-inferences)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "blindfold_inference_duration_seconds",
            "Time the model ran (in its worker), without queueing or tensor coding",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.attestations = Counter(
            "blindfold_attestation_requests",
            "Attestation requests: fresh (with the client's nonce) or standing evidence",
            ["evidence", "outcome"],
            registry=registry,
        )
        registry.register(_LiveState(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def request(
        self, route: str, method: str, status: int, seconds: float, received: int, sent: int
    ) -> None:
        """One answered HTTP request (`route` is its template, never the path sent)."""
        self._child(self.requests, route, method, str(status)).inc()
        self._child(self.request_seconds, route).observe(seconds)
        self._child(self.bytes_in, route).inc(received)
        self._child(self.bytes_out, route).inc(sent)

    @contextlib.contextmanager
    def inference(self, name: str, public: bool) -> Iterator[RunTiming]:
        """Counts one inference of a resolved model by outcome, and observes its queue and
        run times once it reached the model."""
        label = model_label(name, public)
        timing = RunTiming()
        status = 200
        try:
            yield timing
        except (RequestRejected, Refusal) as exc:
            status = http_errors.rejection(exc).status
            raise
        except BaseException:
            status = 500
            raise
        finally:
            self._child(self.inferences, label, outcome(status)).inc()
            if timing.ran:
                self._child(self.queue_seconds, label).observe(timing.queued)
                self._child(self.inference_seconds, label).observe(timing.ran)
