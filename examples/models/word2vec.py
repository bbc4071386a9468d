"""Document search with Word2Vec embeddings: an embedding lookup and mean pooling, then
cosine similarity against the embedded documents, all inside one ONNX graph.

A full Word2Vec table (3M words x 300) is 3.6 GB; this example uses a 20,000-word vocabulary
of 300-dimensional vectors: random ones, or the first 20,000 words of a local word2vec text
file (`--checkpoint vectors.txt`, one "word v1 ... v300" per line). The graph holds the
embedded document collection; the query arrives as token ids (int64 [1, L], 0 = padding) and
the answer is every document's score and the five best documents, best first.

    python examples/models/word2vec.py https://127.0.0.1:8443 --allow-simulation
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
from _common import Example, main
from onnx import TensorProto, helper, numpy_helper

VOCABULARY = 20_000
DIMENSIONS = 300
TOP = 5
DOCUMENTS = [
    "the patient shows signs of pneumonia in the left lung",
    "quarterly revenue grew while operating costs fell",
    "the court dismissed the appeal for lack of standing",
    "a new vaccine trial reports strong immune response",
    "the central bank raised interest rates again",
    "rainfall this winter was far below the seasonal average",
    "the striker scored twice in the final minutes",
    "researchers trained a neural network on chest x rays",
]


def load_vectors(args: Namespace) -> tuple[list[str], np.ndarray]:
    """Words (index 0 is padding) and their vectors, float32 [VOCABULARY, DIMENSIONS]."""
    if args.checkpoint:
        words, rows = ["<pad>"], [np.zeros(DIMENSIONS, np.float32)]
        with Path(args.checkpoint).open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parts = line.rstrip().split(" ")
                if len(parts) != DIMENSIONS + 1:
                    continue  # the "count dimensions" header line, or a damaged row
                words.append(parts[0])
                rows.append(np.asarray(parts[1:], dtype=np.float32))
                if len(words) == VOCABULARY:
                    break
        return words, np.stack(rows)
    words = sorted({word for text in DOCUMENTS for word in text.split()})
    words = ["<pad>", *words, *(f"word{i}" for i in range(VOCABULARY - len(words) - 1))]
    vectors = np.random.default_rng(0).standard_normal((VOCABULARY, DIMENSIONS))
    vectors[0] = 0
    return words, vectors.astype(np.float32)


def token_ids(text: str, index: dict[str, int], length: int = 16) -> np.ndarray:
    ids = [index[word] for word in text.lower().split() if word in index][:length]
    return np.array([ids + [0] * (length - len(ids))], dtype=np.int64)


def build(args: Namespace) -> Example:
    words, vectors = load_vectors(args)
    index = {word: i for i, word in enumerate(words)}

    def embed(ids: np.ndarray) -> np.ndarray:  # what the graph computes, for the documents
        mask = (ids != 0)[..., None]
        pooled = (vectors[ids] * mask).sum(1) / np.maximum(mask.sum(1), 1)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    documents = embed(np.concatenate([token_ids(text, index) for text in DOCUMENTS]))
    constants = [
        numpy_helper.from_array(vectors, "vectors"),
        numpy_helper.from_array(documents.T.astype(np.float32).copy(), "documents_t"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "tiny"),
        numpy_helper.from_array(np.array([TOP], np.int64), "top"),
    ]
    nodes = [
        helper.make_node("Gather", ["vectors", "token_ids"], ["embedded"]),  # [1, L, D]
        helper.make_node("Not", ["is_pad"], ["is_word"]),
        helper.make_node("Equal", ["token_ids", "zero"], ["is_pad"]),
        helper.make_node("Cast", ["is_word"], ["weights"], to=TensorProto.FLOAT),  # [1, L]
        helper.make_node("Unsqueeze", ["weights", "minus1"], ["weights3"]),
        helper.make_node("Mul", ["embedded", "weights3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["weights", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["pooled"]),  # mean pooling
        helper.make_node("ReduceL2", ["pooled"], ["norm"], axes=[-1], keepdims=1),
        helper.make_node("Max", ["norm", "tiny"], ["norm1"]),
        helper.make_node("Div", ["pooled", "norm1"], ["query"]),
        helper.make_node("MatMul", ["query", "documents_t"], ["scores2"]),  # cosine
        helper.make_node("Squeeze", ["scores2", "zero1"], ["scores"]),
        helper.make_node("TopK", ["scores", "top"], ["best_scores", "best_documents"]),
    ]
    constants += [
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
        numpy_helper.from_array(np.array([0], np.int64), "zero1"),
    ]
    graph = helper.make_graph(
        _topological(nodes, {"token_ids", *(c.name for c in constants)}),
        "word2vec_search",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, [1, "length"])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [len(DOCUMENTS)]),
            helper.make_tensor_value_info("best_documents", TensorProto.INT64, [TOP]),
        ],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    query = "neural network finds pneumonia on x rays"

    def describe(outputs: dict[str, np.ndarray]) -> str:
        best = outputs["best_documents"][0]
        return f"best match for {query!r}: {DOCUMENTS[int(best)]!r}"

    return Example("word2vec-search", model, {"token_ids": token_ids(query, index)}, describe)


def _topological(nodes: list, known: set[str]) -> list:
    ordered, waiting = [], list(nodes)
    while waiting:
        ready = [n for n in waiting if all(name in known for name in n.input)]
        if not ready:
            raise ValueError("the graph has a cycle or an undefined input")
        for node in ready:
            ordered.append(node)
            known.update(node.output)
            waiting.remove(node)
    return ordered


if __name__ == "__main__":
    sys.exit(main(__doc__, build, checkpoint="word2vec text file (first 20,000 words are used)"))
