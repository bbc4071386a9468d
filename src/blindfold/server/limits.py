"""Every resource limit of the server, in one place; all configurable from the command line."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_model_bytes: int = 1 * GiB
    max_request_bytes: int = 256 * MiB
    max_tensor_elements: int = 64 * 1024 * 1024
    max_models: int = 64
    max_concurrent_inferences: int = 4
