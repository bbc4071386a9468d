"""Face embeddings with FaceNet: facenet-pytorch's InceptionResnetV1 (512-dimensional,
L2-normalised embeddings, as used for face verification).

Input: one aligned face crop, float32 [1, 3, 160, 160] standardised to about [-1, 1];
output: its embedding. Random weights (facenet-pytorch's default `pretrained=None`), or a
state_dict saved with torch.save (`--checkpoint facenet.pt`, e.g. the vggface2 weights).

facenet-pytorch's package `__init__` imports MTCNN, which imports torchvision; PyPI's
torchvision does not load beside the CPU torch on these machines, so this script loads only
the `models/inception_resnet_v1` module (which needs torch alone).

    python examples/models/facenet.py https://127.0.0.1:8443 --allow-simulation
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
from _common import Example, export_torch, main


def inception_resnet_v1() -> Any:
    """facenet_pytorch.models.inception_resnet_v1.InceptionResnetV1, without running the
    package's `__init__` (an empty stand-in package takes its place)."""
    if "facenet_pytorch" not in sys.modules:
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("facenet-pytorch is not installed: bin/install-examples")
        package = types.ModuleType("facenet_pytorch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["facenet_pytorch"] = package
    module = importlib.import_module("facenet_pytorch.models.inception_resnet_v1")
    return module.InceptionResnetV1


def face(size: int = 160) -> np.ndarray:
    """A synthetic face crop: skin-toned oval, eyes, mouth, standardised like facenet-pytorch's
    fixed_image_standardization ((pixel - 127.5) / 128)."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.zeros((3, size, size), np.float32)
    oval = ((x - 0.5) / 0.35) ** 2 + ((y - 0.5) / 0.45) ** 2 < 1
    for channel, tone in enumerate((224, 172, 140)):
        rgb[channel] = np.where(oval, tone, 40)
    for eye in (0.36, 0.64):
        rgb[:, ((x - eye) / 0.06) ** 2 + ((y - 0.42) / 0.03) ** 2 < 1] = 30
    rgb[:, (np.abs(x - 0.5) < 0.12) & (np.abs(y - 0.7) < 0.02)] = (150, 60, 60)[0]
    rgb += np.random.default_rng(0).normal(0, 4, rgb.shape)
    return ((np.clip(rgb, 0, 255) - 127.5) / 128.0).astype(np.float32)[None]


def build(args: Namespace) -> Example:
    import torch

    torch.manual_seed(0)
    model = inception_resnet_v1()(pretrained=None, classify=False)
    if args.checkpoint:
        state = torch.load(Path(args.checkpoint), map_location="cpu")
        model.load_state_dict(state, strict=False)  # the logits layer may be absent
    image = face()
    onnx_model = export_torch(model, (torch.from_numpy(image),), ["face"], ["embedding"])

    def describe(outputs: dict[str, np.ndarray]) -> str:
        embedding = outputs["embedding"][0]
        return f"{embedding.shape[0]}-dimensional embedding, norm {np.linalg.norm(embedding):.3f}"

    return Example("facenet", onnx_model, {"face": image}, describe)


if __name__ == "__main__":
    sys.exit(main(__doc__, build, checkpoint="state_dict file saved with torch.save"))
