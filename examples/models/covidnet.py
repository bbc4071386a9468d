"""Chest X-ray classification with a COVID-Net-CXR-2-style CNN: a compact residual network
(projection-expansion blocks in the spirit of COVID-Net's PEPX modules) defined here in torch.

Input: one 480x480 chest X-ray as float32 [1, 3, 480, 480] in [0, 1]; output: the
probabilities of negative and positive for COVID-19, as COVID-Net CXR-2 reports them.
Random weights, or a state_dict saved with torch.save (`--checkpoint covidnet.pt`).

    python examples/models/covidnet.py https://127.0.0.1:8443 --allow-simulation
"""

from __future__ import annotations

import sys
from argparse import Namespace

import numpy as np
from _common import Example, export_torch, main

CLASSES = ["negative", "positive"]


def covidnet() -> object:
    import torch
    from torch import nn

    class PEPX(nn.Module):
        """Projection, expansion, depth-wise, projection, extension; with a residual."""

        def __init__(self, channels: int, squeeze: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(channels, squeeze, 1),
                nn.ReLU(),
                nn.Conv2d(squeeze, squeeze * 2, 1),
                nn.ReLU(),
                nn.Conv2d(squeeze * 2, squeeze * 2, 3, padding=1, groups=squeeze * 2),
                nn.ReLU(),
                nn.Conv2d(squeeze * 2, squeeze, 1),
                nn.ReLU(),
                nn.Conv2d(squeeze, channels, 1),
                nn.BatchNorm2d(channels),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.body(x))

    def stage(inputs: int, outputs: int) -> list[nn.Module]:
        return [
            nn.Conv2d(inputs, outputs, 3, stride=2, padding=1),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
            PEPX(outputs, outputs // 2),
            PEPX(outputs, outputs // 2),
        ]

    return nn.Sequential(
        nn.Conv2d(3, 32, 7, stride=2, padding=3),  # 240x240
        nn.ReLU(),
        nn.MaxPool2d(2),  # 120x120
        *stage(32, 64),  # 60x60
        *stage(64, 128),  # 30x30
        *stage(128, 256),  # 15x15
        *stage(256, 256),  # 8x8
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, len(CLASSES)),
        nn.Softmax(dim=-1),
    )


def radiograph(size: int = 480) -> np.ndarray:
    """A synthetic frontal chest radiograph: bright body, two darker lungs, ribs, a spine."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = 0.75 * np.exp(-((((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 2) ** 2))
    for side in (0.3, 0.7):
        lung = ((x - side) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
        image[lung] *= 0.45
    image += 0.08 * (np.sin(y * 60) > 0.7) * (np.abs(x - 0.5) > 0.05)  # ribs
    image[np.abs(x - 0.5) < 0.04] += 0.2  # spine
    image += 0.02 * np.random.default_rng(0).standard_normal(image.shape)
    image = np.clip(image, 0, 1).astype(np.float32)
    return np.repeat(image[None, None], 3, axis=1)  # grey scale into three channels


def build(args: Namespace) -> Example:
    import torch

    torch.manual_seed(0)
    model = covidnet()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))  # type: ignore[attr-defined]
    image = radiograph()
    onnx_model = export_torch(model, (torch.from_numpy(image),), ["image"], ["probabilities"])

    def describe(outputs: dict[str, np.ndarray]) -> str:
        p = outputs["probabilities"][0]
        return f"{CLASSES[int(p.argmax())]} (p={p.max():.2f})"

    return Example("covidnet-cxr", onnx_model, {"image": image}, describe)


if __name__ == "__main__":
    sys.exit(main(__doc__, build, checkpoint="state_dict file saved with torch.save"))
