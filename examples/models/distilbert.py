"""Sentiment of a sentence with DistilBERT (transformers' DistilBertForSequenceClassification),
with the tokenizer inside the ONNX graph: the raw sentence goes in, the label and its
probability come out, and nothing meaningful is computed outside the TEE.

The graph is onnxruntime-extensions' `BertTokenizer` operator (domain ai.onnx.contrib; the
server accepts it with --enable-ort-extensions, its default when the package is installed)
feeding DistilBERT (input_ids + attention_mask, int64, at most 128 tokens), then Softmax,
ArgMax and a lookup of the label's name. The WordPiece vocabulary is built here (special
tokens, a small sentiment lexicon, single characters and their ## continuations, padded with
[unusedN] to the default 30,522 entries); the weights are random from the default
DistilBertConfig. `--checkpoint DIR` loads a local `save_pretrained` directory instead,
with its own vocab.txt.

    python examples/models/distilbert.py https://127.0.0.1:8443 --allow-simulation
"""

from __future__ import annotations

import string
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import onnx
from _common import Example, export_torch, hide_torchvision, main
from onnx import TensorProto, helper, numpy_helper

LABELS = ["NEGATIVE", "POSITIVE"]
MAX_TOKENS = 128
SENTENCE = "The staff were wonderful and the treatment worked, I feel great!"
WORDS = """the a an and or but not no very really so too i you we they it this that was were is
are be been feel felt great good wonderful excellent happy love loved like best amazing
bad terrible awful sad hate hated worst poor boring slow rude pain staff treatment worked
work movie food service doctor nurse hospital day time!""".split()  # noqa: SIM905 (a paragraph of words reads better than a list)


def vocabulary(size: int) -> list[str]:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [w.strip(string.punctuation) for w in WORDS]
    tokens = list(dict.fromkeys(special + characters + [f"##{c}" for c in characters] + words))
    tokens = [t for t in tokens if t]
    return tokens + [f"[unused{i}]" for i in range(size - len(tokens))]


def build(args: Namespace) -> Example:
    hide_torchvision()
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    if args.checkpoint:
        model = DistilBertForSequenceClassification.from_pretrained(args.checkpoint)
        vocab = Path(args.checkpoint, "vocab.txt").read_text(encoding="utf-8").splitlines()
    else:
        config = DistilBertConfig(num_labels=len(LABELS))
        model = DistilBertForSequenceClassification(config)
        vocab = vocabulary(config.vocab_size)
    model.config.return_dict = False
    sample = torch.ones((1, 8), dtype=torch.int64)
    bert = export_torch(
        model,
        (sample, sample),
        ["input_ids", "attention_mask"],
        ["logits"],
        {name: {1: "tokens"} for name in ("input_ids", "attention_mask")},
    )
    return Example(
        "distilbert-sentiment",
        with_text_in_and_label_out(bert, vocab),
        {"text": [SENTENCE]},
        describe,
    )


def with_text_in_and_label_out(bert: onnx.ModelProto, vocab: list[str]) -> onnx.ModelProto:
    """Wraps the exported DistilBERT: a string tensor in, the label and its probability out."""
    graph = bert.graph
    tokenizer = helper.make_node(
        "BertTokenizer",
        ["text"],
        ["token_ids", "token_type_ids", "token_mask"],
        domain="ai.onnx.contrib",
        name="tokenizer",
        vocab_file="\n".join(vocab),
        do_lower_case=1,
        strip_accents=1,
        max_length=MAX_TOKENS,
    )
    before = [
        tokenizer,
        helper.make_node("Unsqueeze", ["token_ids", "axis0"], ["input_ids"]),
        helper.make_node("Unsqueeze", ["token_mask", "axis0"], ["attention_mask"]),
    ]
    after = [
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["probabilities"], ["label_id"], axis=-1, keepdims=0),
        helper.make_node("Gather", ["label_names", "label_id"], ["label"]),
        helper.make_node("ReduceMax", ["probabilities"], ["probability"], axes=[-1], keepdims=0),
    ]
    nodes = [*before, *graph.node, *after]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array(LABELS, dtype=object), "label_names"),
        ]
    )
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("text", TensorProto.STRING, [1]))
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("label", TensorProto.STRING, [1]),
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, [1]),
        ]
    )
    bert.opset_import.append(helper.make_opsetid("ai.onnx.contrib", 1))
    return bert


def describe(outputs: dict[str, np.ndarray]) -> str:
    label = outputs["label"][0]
    label = label.decode() if isinstance(label, bytes) else label
    return f"{SENTENCE!r} is {label} (p={float(outputs['probability'][0]):.3f})"


if __name__ == "__main__":
    sys.exit(main(__doc__, build, checkpoint="transformers save_pretrained directory"))
