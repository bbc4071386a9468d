"""Object detection with YOLOv8n (ultralytics' `yolov8n.yaml`: the anchor-free YOLOv8 nano,
80 COCO classes), with non-maximum suppression inside the ONNX graph: a 640x640 image goes
in, the kept boxes come out.

After the network (raw predictions [1, 84, 8400]: centre x, y, width, height and 80 class
scores per candidate), the graph runs ONNX's `NonMaxSuppression` (IoU 0.45, score 0.25, at
most 100 boxes per class) and returns each kept box as corners (x1, y1, x2, y2 in pixels),
its score and its class. Random weights (with the class biases zeroed, so that every class
scores about 0.5 and NMS has real work), or a local ultralytics checkpoint
(`--checkpoint yolov8n.pt`).

ultralytics names torchvision as a dependency, but PyPI's torchvision does not load beside
the CPU torch on these machines: it is installed only as metadata and never imported here.

    python examples/models/yolo.py https://127.0.0.1:8443 --allow-simulation
"""

from __future__ import annotations

import sys
from argparse import Namespace

import numpy as np
import onnx
from _common import Example, export_torch, hide_torchvision, main
from onnx import TensorProto, helper, numpy_helper

SIZE = 640
IOU = 0.45
SCORE = 0.25
PER_CLASS = 100


def build(args: Namespace) -> Example:
    hide_torchvision()
    import torch
    from ultralytics.nn.modules import Detect
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    torch.manual_seed(0)
    if args.checkpoint:
        model, _ = load_checkpoint(str(args.checkpoint))
    else:
        model = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    model = model.float().eval()
    for module in model.modules():
        if isinstance(module, Detect):
            module.export = True  # return the raw predictions only
            module.format = "onnx"
            if not args.checkpoint:
                for head in module.cv3:
                    torch.nn.init.zeros_(head[-1].bias)
    image = street_scene()
    network = export_torch(model, (torch.from_numpy(image),), ["image"], ["predictions"])

    def describe(outputs: dict[str, np.ndarray]) -> str:
        count = len(outputs["scores"])
        best = f", best: class {int(outputs['classes'][0])} score {outputs['scores'][0]:.2f}"
        return f"{count} boxes after NMS" + (best if count else "")

    return Example("yolov8n-detect", with_nms(network), {"image": image}, describe)


def street_scene() -> np.ndarray:
    """A synthetic RGB scene in [0, 1]: sky, road, and a few box-shaped objects."""
    rng = np.random.default_rng(0)
    image = np.empty((3, SIZE, SIZE), np.float32)
    image[:, : SIZE // 2] = np.array([0.55, 0.7, 0.9])[:, None, None]  # sky
    image[:, SIZE // 2 :] = np.array([0.35, 0.35, 0.37])[:, None, None]  # road
    for x, y, w, h in [(60, 300, 180, 120), (300, 280, 90, 200), (430, 330, 160, 90)]:
        image[:, y : y + h, x : x + w] = rng.uniform(0.1, 0.9, (3, 1, 1))
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)[None]


def with_nms(network: onnx.ModelProto) -> onnx.ModelProto:
    """Appends NonMaxSuppression: predictions [1, 4 + classes, candidates] -> the kept boxes
    (x1, y1, x2, y2) [K, 4], their scores [K] and classes [K]."""
    graph = network.graph
    graph.node.extend(
        [
            helper.make_node("Slice", ["predictions", "zero", "four", "one"], ["xywh_t"]),
            helper.make_node("Transpose", ["xywh_t"], ["xywh"], perm=[0, 2, 1]),  # [1, N, 4]
            helper.make_node("Slice", ["predictions", "four", "end", "one"], ["class_scores"]),
            helper.make_node(
                "NonMaxSuppression",
                ["xywh", "class_scores", "per_class", "iou", "score"],
                ["selected"],  # [K, 3]: batch, class, candidate
                center_point_box=1,
            ),
            helper.make_node("Gather", ["selected", "two"], ["candidate"], axis=1),
            helper.make_node("Gather", ["selected", "one_scalar"], ["classes"], axis=1),
            helper.make_node("GatherND", ["class_scores", "selected"], ["scores"]),
            helper.make_node("Squeeze", ["xywh", "zero"], ["all_boxes"]),
            helper.make_node("Gather", ["all_boxes", "candidate"], ["kept"], axis=0),
            helper.make_node("Split", ["kept", "halves"], ["centre", "extent"], axis=1),
            helper.make_node("Mul", ["extent", "half"], ["half_extent"]),
            helper.make_node("Sub", ["centre", "half_extent"], ["top_left"]),
            helper.make_node("Add", ["centre", "half_extent"], ["bottom_right"]),
            helper.make_node("Concat", ["top_left", "bottom_right"], ["boxes"], axis=1),
        ]
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([4], np.int64), "four"),
            numpy_helper.from_array(np.array([2**62], np.int64), "end"),
            numpy_helper.from_array(np.array(2, np.int64), "two"),
            numpy_helper.from_array(np.array(1, np.int64), "one_scalar"),
            numpy_helper.from_array(np.array([2, 2], np.int64), "halves"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array([PER_CLASS], np.int64), "per_class"),
            numpy_helper.from_array(np.array([IOU], np.float32), "iou"),
            numpy_helper.from_array(np.array([SCORE], np.float32), "score"),
        ]
    )
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["kept", 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["kept"]),
            helper.make_tensor_value_info("classes", TensorProto.INT64, ["kept"]),
        ]
    )
    return network


if __name__ == "__main__":
    sys.exit(main(__doc__, build, checkpoint="ultralytics .pt checkpoint"))
