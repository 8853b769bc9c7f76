"""Static INT8 quantization of the FP32 backbone with onnxruntime (QDQ, per-channel weights).

Two variants, because their consumers want different activations:

- "int8": symmetric int8 activations and int8 per-channel weights (S8S8). TensorRT reads the
  QDQ pairs as explicit quantization and needs symmetric int8.
- "int8-cpu": uint8 activations and int8 per-channel weights (U8S8). onnxruntime's CPU kernels
  run U8S8 convs as QLinearConv; with int8 activations it left about half the convs in FP32.

Both are calibrated (MinMax) on the same few hundred base-class images. The report records
how many convs onnxruntime really runs quantized after its graph optimisations, and the
accuracy change against FP32 on fixed episodes.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError, MtlEdgeError
from mtl_edge.export.parity import ort_session
from mtl_edge.preprocess import Preprocess

log = logging.getLogger(__name__)

#: variant name -> (activation type, symmetric activations)
VARIANTS = {"int8": ("QInt8", True), "int8-cpu": ("QUInt8", False)}
DEFAULT_CALIB_IMAGES = 300
QUANTIZED_CONV_OPS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv")
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv")


class ArrayCalibrationReader:
    """Feeds preprocessed images (N, C, H, W) float32 to onnxruntime's calibrator in batches
    (implements `onnxruntime.quantization.CalibrationDataReader`)."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 16) -> None:
        self.images = images
        self.input_name = input_name
        self.batch_size = batch_size
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.images):
            return None
        batch = self.images[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        self._pos = 0


def calibration_split(folder: str | Path, color_mode: str) -> ImageSplit:
    """The images under `folder`: class folders (`<folder>/<class>/<image>`) or a flat folder.

    Raises:
        DatasetError: no such folder, or no images in it.
    """
    from mtl_edge.data.folders import images_in, list_class_dirs, read_class_folders

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--calib {folder}: no such folder; give a folder of base-class images")
    if list_class_dirs(folder):
        return read_class_folders(folder, None, color_mode=color_mode, on_error="skip")
    files = images_in(folder, on_error="skip")
    if not files:
        raise DatasetError(f"--calib {folder}: holds no images (jpg, png, ...)")
    return ImageSplit(
        name=folder.name,
        class_names=["calib"],
        labels=np.zeros(len(files), dtype=np.int64),
        paths=list(files),
        color_mode=color_mode,
    )


def sample_calibration(
    split: ImageSplit, preprocess: Preprocess, count: int = DEFAULT_CALIB_IMAGES, seed: int = 0
) -> np.ndarray:
    """Up to `count` images of `split`, spread evenly over its classes (seeded), preprocessed.

    Returns:
        float32 array of shape (n, C, H, W), n = min(count, len(split)).
    """
    from mtl_edge.export.parity import split_images

    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(idx) for idx in split.indices_by_class() if len(idx)]
    picks: list[int] = []
    depth = 0
    while len(picks) < min(count, len(split)):
        picks += [int(idx[depth]) for idx in by_class if depth < len(idx)]
        depth += 1
    return split_images(split.take(sorted(picks[:count])), preprocess)


def quantize_variant(
    fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, variant: str
) -> dict[str, Any]:
    """Write the QDQ INT8 `variant` ("int8" or "int8-cpu") of an FP32 ONNX backbone.

    Args:
        calib: preprocessed calibration images of shape (N, C, H, W).

    Returns:
        the settings used: {"activations", "weights", "per_channel", "calibration_images", ...}.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if variant not in VARIANTS:
        raise ValueError(f"unknown INT8 variant {variant!r}")
    act_name, symmetric = VARIANTS[variant]
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            ArrayCalibrationReader(calib, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=getattr(QuantType, act_name),
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
    return {
        "format": "QDQ",
        "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
        "weights": "int8 symmetric per-channel",
        "calibration": "MinMax",
        "calibration_images": len(calib),
    }


def qdq_conv_count(path: str | Path) -> dict[str, int]:
    """Convs in a QDQ graph, and how many have DequantizeLinear on both input and weight."""
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    wrapped = sum(all(producers.get(i) == "DequantizeLinear" for i in n.input[:2]) for n in convs)
    return {"convs": len(convs), "convs_with_qdq": wrapped}


def runtime_conv_kernels(path: str | Path) -> dict[str, Any]:
    """The conv kernels onnxruntime (CPU) really runs after its graph optimisations.

    Returns:
        {"quantized": QLinearConv-like nodes, "float": Conv-like nodes, "ops": {op: count}}.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, threads=1, optimized_path=optimized)
        ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return {
        "quantized": sum(ops[o] for o in QUANTIZED_CONV_OPS),
        "float": sum(ops[o] for o in FLOAT_CONV_OPS),
        "ops": dict(sorted(ops.items())),
    }


def require_quantized(report: dict[str, Any], variant: str, path: Path) -> None:
    """Refuse an INT8 file in which no conv got quantization nodes (calibration went wrong)."""
    if report["qdq"]["convs"] and not report["qdq"]["convs_with_qdq"]:
        raise MtlEdgeError(
            f"{path}: {variant} has no quantized conv; check the calibration images (--calib)"
        )
