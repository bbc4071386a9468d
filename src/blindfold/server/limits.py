"""Every resource limit of the server, in one place; all configurable from the command line.

The memory defaults are derived from the machine, so that the limits hold before the
kernel's out-of-memory killer would step in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GiB = 1 << 30
MiB = 1 << 20


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
