"""The thread pools of the front process other than inference's, so that no kind of work
waits behind another: attestation (device I/O, signing), model loading (ONNX checks,
session creation, decrypting model files) and the codec (JSON and BYTES tensors, response
encoding, receipt hashing). Inference keeps its own pool (runtime.InferenceRunner)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Pool:
    """A small named thread pool whose work is awaited from the event loop."""

    def __init__(self, name: str, workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Pools:
    def __init__(self) -> None:
        # Two attestation threads: a hardware quote can take a while, and a second client
        # should not queue behind the first one's.
        self.attestation = Pool("attest", 2)
        self.loading = Pool("load", 2)
        self.codec = Pool("codec", 2)

    def shutdown(self) -> None:
        for pool in (self.attestation, self.loading, self.codec):
            pool.shutdown()
