"""Speaker recognition with M5, the 1-D CNN on raw waveforms of Dai et al., "Very Deep
Convolutional Neural Networks for Raw Waveforms" (arXiv:1610.00087), in torch.

Input: 8000 raw audio samples (float32 [1, 1, 8000]: half a second at 16 kHz); output: the
probability of each of 10 enrolled speakers. Random weights, or a state_dict saved with
torch.save (`--checkpoint m5.pt`).

    python examples/models/m5.py https://127.0.0.1:8443 --allow-simulation
"""

from __future__ import annotations

import sys
from argparse import Namespace

import numpy as np
from _common import Example, export_torch, main

SPEAKERS = 10
SAMPLES = 8000


def m5(speakers: int = SPEAKERS) -> object:
    from torch import nn

    def block(inputs: int, outputs: int, kernel: int, stride: int = 1) -> list[nn.Module]:
        return [
            nn.Conv1d(inputs, outputs, kernel, stride=stride, padding=kernel // 2),
            nn.BatchNorm1d(outputs),
            nn.ReLU(),
            nn.MaxPool1d(4),
        ]

    return nn.Sequential(
        *block(1, 128, 80, stride=4),  # the receptive field of one 10 ms window
        *block(128, 128, 3),
        *block(128, 256, 3),
        *block(256, 512, 3),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(512, speakers),
        nn.Softmax(dim=-1),
    )


def build(args: Namespace) -> Example:
    import torch

    torch.manual_seed(0)
    model = m5()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))  # type: ignore[attr-defined]
    # Half a second of a voiced sound: a 140 Hz fundamental, its harmonics and some noise.
    t = np.arange(SAMPLES) / 16_000
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    voice += 0.05 * np.random.default_rng(0).standard_normal(SAMPLES)
    audio = (0.3 * voice / np.abs(voice).max()).astype(np.float32).reshape(1, 1, SAMPLES)
    onnx_model = export_torch(
        model, (torch.from_numpy(audio),), ["audio"], ["speaker_probabilities"]
    )

    def describe(outputs: dict[str, np.ndarray]) -> str:
        p = outputs["speaker_probabilities"][0]
        return f"most likely speaker #{int(p.argmax())} (p={p.max():.2f})"

    return Example("m5-speaker", onnx_model, {"audio": audio}, describe)


if __name__ == "__main__":
    sys.exit(main(__doc__, build, checkpoint="state_dict file saved with torch.save"))
