"""onnxruntime sessions and the thread pool that runs them off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from blindfold import tensors
from blindfold.errors import RequestRejected


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP datatype
    shape: tuple[int, ...]  # -1 for dynamic dimensions

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Session:
    """One onnxruntime session for one ONNX byte string, created once."""

    def __init__(self, data: bytes, sha256: str, intra_op_threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # FATAL only: ORT logs kernel errors with their values (e.g. "idx=<index>" for an
        # out-of-range Gather), and tensor contents must never reach the server's log.
        options.log_severity_level = 4
        try:
            self._session = ort.InferenceSession(
                data, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise RequestRejected(
                400, f"onnxruntime cannot load the model: {_short(str(exc))}"
            ) from None
        self.sha256 = sha256
        self.size = len(data)
        self.inputs = [_spec(arg) for arg in self._session.get_inputs()]
        self.outputs = [_spec(arg) for arg in self._session.get_outputs()]
        self._input_specs = {spec.name: spec for spec in self.inputs}
        self.output_names = [spec.name for spec in self.outputs]

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        missing = [name for name in self._input_specs if name not in feeds]
        if missing:
            raise RequestRejected(
                400, f"missing model inputs {missing}; the model expects {list(self._input_specs)}"
            )
        for name, array in feeds.items():
            spec = self._input_specs.get(name)
            if spec is None:
                raise RequestRejected(
                    400, f"unknown input {name!r}; the model expects {list(self._input_specs)}"
                )
            datatype = tensors.np_to_oip_dtype(array.dtype)
            if datatype != spec.datatype:
                raise RequestRejected(
                    400,
                    f"input {name!r} has datatype {datatype}, the model expects {spec.datatype}",
                )
            if len(array.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
            ):
                raise RequestRejected(
                    400,
                    f"input {name!r} has shape {list(array.shape)}, the model expects "
                    f"{list(spec.shape)} (-1 = any size)",
                )

    def run(self, output_names: list[str], feeds: dict[str, Any]) -> list[np.ndarray]:
        outputs: list[np.ndarray] = self._session.run(output_names, feeds)
        return outputs


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + "..."


def _spec(arg: Any) -> TensorSpec:
    entry = tensors.by_ort(arg.type)
    datatype = entry.oip if entry else arg.type
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape or [])
    return TensorSpec(arg.name, datatype, shape)


class InferenceRunner:
    """Runs sessions on a bounded thread pool, so at most `workers` inferences run at once
    and the event loop keeps serving other requests meanwhile."""

    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")

    async def run(
        self, session: Session, output_names: list[str], feeds: dict[str, Any]
    ) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, session.run, output_names, feeds)
        except RequestRejected:
            raise
        except Exception as exc:
            # onnxruntime's messages can quote input values (e.g. an out-of-range index), and
            # tensor contents must never reach an error message: only the error's kind is kept.
            raise RequestRejected(
                400,
                f"onnxruntime could not run the model on these inputs ({type(exc).__name__}); "
                "names, datatypes and shapes were accepted, so check the input values' ranges",
            ) from None

    async def call(self, function: Any, *args: Any) -> Any:
        """Runs other blocking work (model parsing, session creation) on the same pool."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
