"""Every resource limit of the server, in one place; all configurable from the command line.

The memory defaults are derived from the machine, so that the limits hold before the
kernel's out-of-memory killer would step in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GiB = 1 << 30
MiB = 1 << 20
# Warm-up inputs (zeros, `worker.warm_up` and an owner's `warmup_shapes`) larger than this
# over all inputs are not made: a model declaring (or configured with) huge inputs would
# spend its memory limit on zeros before any user asked for a run.
WARMUP_INPUT_LIMIT = 256 * MiB


def machine_memory() -> int:
    """Physical memory in bytes (4 GiB when the machine does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 4 * GiB


def default_model_memory() -> int:
    """Half the machine for loaded models; the rest is for runs and the front process."""
    return machine_memory() // 2


def default_inference_memory() -> int:
    """Run-time memory one model's worker may take beyond its model: a quarter of the
    machine, at least 1 GiB and at most 16 GiB."""
    return min(max(machine_memory() // 4, 1 * GiB), 16 * GiB)


@dataclass(frozen=True)
class Limits:
    max_model_bytes: int = 1 * GiB
    max_request_bytes: int = 256 * MiB
    # JSON documents and BYTES tensors become one Python object per element, which costs
    # far more time and memory per byte than binary tensors: they get a much smaller limit.
    max_json_bytes: int = 1 * MiB
    max_tensor_elements: int = 64 * 1024 * 1024
    max_models: int = 64
    max_concurrent_inferences: int = 4
    max_model_memory: int = field(default_factory=default_model_memory)
    max_inference_memory: int = field(default_factory=default_inference_memory)  # 0: none
    inference_timeout: float = 60.0
    isolation: bool = True  # False only with --unsafe-no-isolation (benchmarks)
    # Accept the `ai.onnx.contrib` custom operators of onnxruntime-extensions (--enable-ort-
    # extensions); off here, on by default in `blindfold serve` when the package is installed.
    ort_extensions: bool = False
    # Bytes of request bodies being received or held at once, over all requests; 0: a
    # quarter of the machine's memory, and never less than one largest request.
    max_inflight_body_bytes: int = 0

    def inflight_body_bytes(self) -> int:
        if self.max_inflight_body_bytes:
            return self.max_inflight_body_bytes
        return max(self.max_model_bytes, self.max_request_bytes, machine_memory() // 4)


@dataclass(frozen=True)
class ConnectionLimits:
    """What slow or idle clients may hold (all times in seconds)."""

    max_connections: int = 1000
    header_timeout: float = 10.0  # from a request's first byte (or the connection's start)
    max_header_bytes: int = 64 * 1024
    body_timeout: float = 10.0  # a window in which a body must make progress...
    min_body_rate: int = 1024  # ...of at least this many bytes per second
    keep_alive_timeout: float = 15.0  # idle between requests
    tls_handshake_timeout: float = 10.0
