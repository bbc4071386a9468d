"""Speech to text with Wav2vec2 (transformers' Wav2Vec2ForCTC), with the CTC decoding inside
the ONNX graph: one second of 16 kHz audio goes in, the transcript comes out.

After the network, the graph takes the most likely token of every frame (ArgMax), drops
repeats and the blank token (CTC greedy decoding, in standard ONNX operators), looks up each
token's character and joins them (onnxruntime-extensions' `StringJoin`, domain
ai.onnx.contrib). The character vocabulary is the 32-token English one of the wav2vec2
LibriSpeech models ("|" is the space); the weights are random from the default
Wav2Vec2Config, so the transcript is gibberish until you pass `--checkpoint DIR` (a local
`save_pretrained` directory of an English CTC model with that vocabulary).

    python examples/models/wav2vec2.py https://127.0.0.1:8443 --allow-simulation
"""

from __future__ import annotations

import sys
from argparse import Namespace
from typing import Any

import numpy as np
import onnx
from _common import Example, export_torch, hide_torchvision, main
from onnx import TensorProto, helper, numpy_helper

RATE = 16_000
BLANK = 0  # "<pad>" doubles as the CTC blank
VOCABULARY = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]


def characters() -> list[str]:
    """What each token prints as: special tokens print nothing, "|" is a space."""
    return ["" if t.startswith("<") else " " if t == "|" else t for t in VOCABULARY]


def build(args: Namespace) -> Example:
    hide_torchvision()
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    if args.checkpoint:
        model = Wav2Vec2ForCTC.from_pretrained(args.checkpoint)
    else:
        model = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(VOCABULARY), pad_token_id=BLANK))
    audio = speech_like()
    network = export_torch(_Logits(model), (torch.from_numpy(audio),), ["audio"], ["logits"])

    def describe(outputs: dict[str, np.ndarray]) -> str:
        text = outputs["text"][0]
        return f"transcript {text.decode() if isinstance(text, bytes) else text!r}"

    return Example("wav2vec2-ctc", with_ctc_decoding(network), {"audio": audio}, describe)


def _Logits(model: Any) -> Any:
    """The CTC model with a plain tensor out (transformers returns an output object)."""
    from torch import nn

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, audio: Any) -> Any:
            return self.model(audio).logits

    return Logits()


def speech_like() -> np.ndarray:
    """One second of a voiced, syllable-like sound: a gliding pitch with formants, rising and
    falling in loudness four times, plus a little noise."""
    t = np.arange(RATE) / RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voice = sum(
        np.sin(k * phase) * np.exp(-(((k * 120 - f) / 300) ** 2))
        for k in range(1, 30)
        for f in (700, 1200)
    )
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    audio = voice * envelope + 0.01 * np.random.default_rng(0).standard_normal(RATE)
    return (0.5 * audio / np.abs(audio).max()).astype(np.float32)[None]


def with_ctc_decoding(network: onnx.ModelProto) -> onnx.ModelProto:
    """Appends greedy CTC decoding: logits [1, frames, tokens] -> text [1]."""
    graph = network.graph
    graph.node.extend(
        [
            helper.make_node("ArgMax", ["logits"], ["best2"], axis=-1, keepdims=0),
            helper.make_node("Squeeze", ["best2", "axis0"], ["best"]),  # [frames]
            helper.make_node("Slice", ["best", "zero", "minus1"], ["previous_tail"]),
            helper.make_node("Concat", ["no_token", "previous_tail"], ["previous"], axis=0),
            helper.make_node("Equal", ["best", "previous"], ["repeat"]),
            helper.make_node("Equal", ["best", "blank"], ["is_blank"]),
            helper.make_node("Or", ["repeat", "is_blank"], ["drop"]),
            helper.make_node("Not", ["drop"], ["keep"]),
            helper.make_node("Compress", ["best", "keep"], ["tokens"], axis=0),
            helper.make_node("Gather", ["characters", "tokens"], ["pieces"]),
            helper.make_node(
                "StringJoin",
                ["pieces", "empty", "zero_scalar"],
                ["joined"],
                domain="ai.onnx.contrib",
            ),
            helper.make_node("Reshape", ["joined", "one_shape"], ["text"]),
        ]
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
            numpy_helper.from_array(np.array([-1], np.int64), "no_token"),
            numpy_helper.from_array(np.array(BLANK, np.int64), "blank"),
            numpy_helper.from_array(np.array(characters(), dtype=object), "characters"),
            numpy_helper.from_array(np.array([""], dtype=object), "empty"),
            numpy_helper.from_array(np.array([0], np.int64), "zero_scalar"),
            numpy_helper.from_array(np.array([1], np.int64), "one_shape"),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("text", TensorProto.STRING, [1]))
    network.opset_import.append(helper.make_opsetid("ai.onnx.contrib", 1))
    return network


if __name__ == "__main__":
    sys.exit(main(__doc__, build, checkpoint="transformers save_pretrained directory"))
