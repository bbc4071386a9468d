"""KServe's `ModelServer` serving ONNX files with onnxruntime: the peer in benchmarks/peers.py.

    PYTHON benchmarks/kserve_server.py --model NAME=PATH [--model ...] --http_port P
                                       [KServe's own ModelServer flags]

PYTHON is an interpreter with the `peers` extra (kserve) installed; peers.py creates one under
~/.cache/blindfold/ when the project's own environment cannot take kserve. This file imports
nothing from Blindfold, so that it runs there.

Each model is a `kserve.Model` subclass whose `predict` runs one onnxruntime session (default
session options, CPU, like Blindfold's server) and answers in the Open Inference Protocol v2,
with binary outputs whenever the request asks for them (as tritonclient does with
`binary_data=True`). `predict` is synchronous, as in KServe's own model servers and custom
model examples: KServe then runs it on its event loop.
"""

from __future__ import annotations

import argparse
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, model_server
from kserve.utils.numpy_codec import from_np_dtype


class OnnxModel(kserve.Model):  # type: ignore[misc]  # kserve ships no type hints
    """One ONNX file behind KServe's v2 endpoints."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> Any:
        assert self.session is not None, "load() runs before the server starts"
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        results = self.session.run(None, feeds)
        outputs = []
        for meta, value in zip(self.session.get_outputs(), results, strict=True):
            value = np.ascontiguousarray(value)
            output = InferOutput(meta.name, list(value.shape), from_np_dtype(value.dtype))
            output.set_data_from_numpy(value, binary_data=payload.use_binary_outputs)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id,
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,  # each one says binary or JSON
        )


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="an ONNX file to serve under NAME (repeatable)",
    )
    args = parser.parse_args()
    models = []
    for spec in args.model:
        name, separator, path = spec.partition("=")
        if not separator or not name or not path:
            parser.error(f"--model wants NAME=PATH, got {spec!r}")
        model = OnnxModel(name, path)
        model.load()
        models.append(model)
    kserve.ModelServer().start(models)


if __name__ == "__main__":
    main()
