"""Tiny, torch-free model bundles and image folders for the device tests.

The backbone is a real ONNX graph built with onnx.helper: Conv (fixed random weights) -> Relu ->
GlobalAveragePool -> Flatten, input `images` (N, C, H, W) with a dynamic batch, output `features`
(N, D). It is small enough to run in milliseconds yet separates coloured images well, so
enrollment and prediction can be checked end to end without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mtl_edge.bundle import Bundle, write_bundle
from mtl_edge.preprocess import Preprocess

IMAGE_SIZE = 16
FEATURE_DIM = 8


def tiny_onnx_bytes(
    feature_dim: int = FEATURE_DIM,
    channels: int = 3,
    seed: int = 0,
    static_batch: int | None = None,
    static_size: int | None = None,
) -> bytes:
    """Serialized ONNX model mapping `images` (N, C, H, W) to `features` (N, feature_dim).

    Args:
        static_batch: fix the batch dimension to this size instead of leaving it dynamic.
        static_size: fix H and W to this size (onnxruntime then refuses other sizes).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, 0.5, size=(feature_dim, channels, 3, 3)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=(feature_dim,)).astype(np.float32)
    batch: Any = static_batch if static_batch is not None else "N"
    hw: list[Any] = [static_size, static_size] if static_size is not None else ["H", "W"]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
            helper.make_node("Flatten", ["pool"], ["features"], axis=1),
        ],
        "tiny_backbone",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, channels, *hw])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, feature_dim])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_bundle(
    out: Path,
    feature_dim: int = FEATURE_DIM,
    seed: int = 0,
    head: dict[str, Any] | None = None,
    meta_ways: int | None = None,
    extra_variants: tuple[str, ...] = (),
    static_batch: int | None = None,
) -> Bundle:
    """Write a tiny bundle to `out` and return it loaded.

    Args:
        head: overrides of the head recipe (steps, lr, init, normalize, weight_decay).
        meta_ways: also store a meta-learned FC initialisation for this many classes.
        extra_variants: more variant names ("fp16", "int8", "int8-cpu"); they reuse the FP32
            graph (enough to test variant selection, not quantization).
    """
    cfg = Preprocess(size=IMAGE_SIZE)
    onnx_bytes = tiny_onnx_bytes(feature_dim, seed=seed, static_batch=static_batch)
    files: dict[str, Path | bytes] = {"backbone.onnx": onnx_bytes}
    variants: dict[str, Any] = {"fp32": {"file": "backbone.onnx", "precision": "fp32"}}
    for name in extra_variants:
        files[f"backbone.{name}.onnx"] = onnx_bytes
        variants[name] = {"file": f"backbone.{name}.onnx", "precision": name}
    recipe: dict[str, Any] = {
        "steps": 50,
        "lr": 0.5,
        "init": "zeros",
        "normalize": True,
        "weight_decay": 0.0,
        "meta_init": None,
    }
    recipe.update(head or {})
    if meta_ways is not None:
        import io

        rng = np.random.default_rng(seed + 1)
        for key, shape in (("weight", (meta_ways, feature_dim)), ("bias", (meta_ways,))):
            buf = io.BytesIO()
            np.save(buf, rng.normal(0.0, 0.1, size=shape).astype(np.float32))
            files[f"head_init_{key}.npy"] = buf.getvalue()
        recipe["meta_init"] = {
            "weight": "head_init_weight.npy",
            "bias": "head_init_bias.npy",
            "ways": meta_ways,
        }
    manifest = {
        "backbone": {
            "name": "tiny-test",
            "args": {"seed": seed},
            "feature_dim": feature_dim,
            "input_name": "images",
            "output_name": "features",
        },
        "preprocess": cfg.to_dict(),
        "head": recipe,
        "variants": variants,
        "provenance": {"dataset": "synthetic", "seed": seed},
        "metrics": {},
    }
    return write_bundle(out, manifest, files)


#: Base colours of the synthetic classes; each image is its class colour plus noise.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "purple": (150, 30, 180),
    "cyan": (30, 210, 210),
}


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 20) -> Path:
    """Save a JPEG of one colour with noise and a random bright square."""
    rng = np.random.default_rng(seed)
    arr = np.clip(
        np.asarray(colour, dtype=np.float64) + rng.normal(0, 12, size=(size, size, 3)), 0, 255
    ).astype(np.uint8)
    x, y = rng.integers(0, size // 2, size=2)
    arr[y : y + 4, x : x + 4] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)
    return path


def make_class_folders(
    root: Path,
    classes: tuple[str, ...] = ("red", "green", "blue"),
    per_class: int = 4,
    seed: int = 0,
) -> Path:
    """root/<class>/<i>.jpg for each class name of COLOURS, `per_class` images each."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{i}.jpg", COLOURS[name], seed=seed * 1000 + c * 100 + i)
    return root
