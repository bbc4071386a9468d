"""What every script in examples/models shares: its command line, ONNX export, the upload and
run through an attested Blindfold connection, and the check against in-process onnxruntime.

Each script builds one model of BlindAI's catalogue (random weights from the library's
default configuration, or a local checkpoint), exports it to ONNX, uploads it to a running
server, runs it on a realistic input and prints what came back. The server's outputs must
equal in-process onnxruntime's to 1e-4 relative; the script exits 1 when they do not.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import blindfold

RTOL = 1e-4
ATOL = 1e-5  # for values that should be zero: a relative bound alone cannot hold there


@dataclass
class Example:
    """A built model: its ONNX graph, the input to run it on, and how to say the answer."""

    name: str
    model: onnx.ModelProto
    inputs: dict[str, Any]
    describe: Callable[[dict[str, np.ndarray]], str] = field(default=lambda outputs: "")


def parser(description: str | None, checkpoint: str | None = None) -> argparse.ArgumentParser:
    """The command line every example takes; `checkpoint` says what --checkpoint loads."""
    result = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    result.add_argument("url", nargs="?", default="https://127.0.0.1:8443", help="server URL")
    result.add_argument(
        "--allow-simulation",
        action="store_true",
        help="accept the simulation TEE (it protects nothing; for trying things out)",
    )
    result.add_argument("--policy", type=Path, help="attestation policy TOML file")
    result.add_argument("--token", help="upload key, if the server requires one")
    result.add_argument("--save", type=Path, help="also write the ONNX model to this file")
    if checkpoint:
        result.add_argument("--checkpoint", type=Path, help=checkpoint)
    return result


def hide_torchvision() -> None:
    """Makes `import torchvision` fail cleanly and `find_spec` report it missing.

    PyPI's torchvision is installed only as metadata for ultralytics: it does not load beside
    the CPU torch on these machines ("operator torchvision::nms does not exist"), and
    transformers would import it whenever it finds it."""
    sys.modules.setdefault("torchvision", None)  # type: ignore[arg-type]


def export_torch(
    module: Any,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """Exports an eval-mode torch module with the TorchScript exporter (no onnxscript)."""
    import torch

    module.eval()
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            buffer,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    return onnx.load_model_from_string(buffer.getvalue())


def local_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """onnxruntime in this process, with onnxruntime-extensions when the model needs it."""
    options = ort.SessionOptions()
    if any(opset.domain == "ai.onnx.contrib" for opset in model.opset_import):
        import onnxruntime_extensions

        options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_local(model: onnx.ModelProto, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    session = local_session(model)
    feeds = {name: np.asarray(value) for name, value in inputs.items()}
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def mismatches(server: dict[str, np.ndarray], local: dict[str, np.ndarray]) -> list[str]:
    """What differs between the server's outputs and onnxruntime's, one line each."""
    problems = []
    for name, expected in local.items():
        got = server.get(name)
        if got is None:
            problems.append(f"{name}: missing from the server's answer")
            continue
        got = np.asarray(got)
        if got.shape != expected.shape:
            problems.append(f"{name}: shape {got.shape}, onnxruntime gives {expected.shape}")
        elif expected.dtype == object or expected.dtype.kind in "SUb":
            as_text = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else str(v))
            if expected.size and not np.array_equal(as_text(got), as_text(expected)):
                problems.append(f"{name}: text differs from onnxruntime's")
        elif not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
            worst = float(np.max(np.abs(got.astype(np.float64) - expected)))
            problems.append(f"{name}: differs from onnxruntime by up to {worst:g}")
    return problems


def main(description: str | None, build: Callable[[argparse.Namespace], Example], **kw: Any) -> int:
    """Parses the command line, builds, uploads, runs and checks; returns the exit code."""
    args = parser(description, **kw).parse_args()
    started = time.monotonic()
    example = build(args)
    onnx.checker.check_model(example.model)
    data = example.model.SerializeToString()
    print(
        f"{example.name}: built in {time.monotonic() - started:.1f} s, {len(data) / 2**20:.1f} MiB"
    )
    if args.save:
        args.save.write_bytes(data)
    local = run_local(example.model, example.inputs)
    with blindfold.connect(
        args.url, policy=args.policy, allow_simulation=args.allow_simulation, token=args.token
    ) as client:
        uploaded = client.upload_model(data, name=example.name)
        print(f"{example.name}: uploaded as sha256:{uploaded.sha256}")
        try:
            answer = client.run_model(f"sha256:{uploaded.sha256}", example.inputs)
            server = {name: np.asarray(answer[name]) for name in local}
        finally:
            client.delete_model(example.name)
    print(f"{example.name}: {example.describe(server)}")
    problems = mismatches(server, local)
    for problem in problems:
        print(f"{example.name}: MISMATCH {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{example.name}: outputs match in-process onnxruntime (rtol {RTOL:g})")
    return 0
