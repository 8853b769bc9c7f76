"""The bundle's reduced-precision variants and TensorRT engines, each checked as it is made.

INT8: the "int8" (S8S8, for TensorRT) and "int8-cpu" (U8S8, for onnxruntime's CPU kernels)
files, calibrated on base-class images (`mtl_edge.export.quantize`); FP16 for GPUs. Each
variant's accuracy change against FP32 is measured on the same episodes with the bundle's head
and the centroid head (`mtl_edge.export.parity.accuracy_change`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.bundle import Bundle
from mtl_edge.data.split import ImageSplit
from mtl_edge.export import fp16, parity, quantize
from mtl_edge.fewshot.heads import HeadFactory
from mtl_edge.preprocess import Preprocess

log = logging.getLogger(__name__)

#: Feature images and their FP32 features, the reference of every variant's check.
Reference = tuple[ImageSplit, np.ndarray, np.ndarray]


def int8_variants(
    fp32: Path,
    tmp: Path,
    calib_split: ImageSplit,
    preprocess: Preprocess,
    reference: Reference,
    heads: dict[str, HeadFactory],
    calib_images: int,
    episodes: int,
    seed: int,
    names: tuple[str, ...] = tuple(quantize.VARIANTS),
) -> tuple[dict[str, Any], dict[str, Path], dict[str, dict[str, Any]]]:
    """Quantize, check and describe the INT8 files `names` (default both).

    Args:
        reference: (evaluation split, its preprocessed images (N, C, H, W), FP32 features).

    Returns:
        (the report, {file name: path}, {variant: manifest entry}).
    """
    split, images, fp32_feats = reference
    calib = quantize.sample_calibration(calib_split, preprocess, calib_images, seed)
    report: dict[str, Any] = {"calibration_data": calib_split.name}
    files: dict[str, Path] = {}
    variants: dict[str, dict[str, Any]] = {}
    for name in names:
        file = f"backbone.{name}.onnx"
        target = tmp / file
        log.info("quantizing %s on %d calibration images", name, len(calib))
        settings = quantize.quantize_variant(fp32, target, calib, name)
        feats = parity.ort_features(parity.ort_session(target), images)
        entry = {
            "settings": settings,
            "qdq": quantize.qdq_conv_count(target),
            "onnxruntime_cpu_kernels": quantize.runtime_conv_kernels(target),
            "accuracy": parity.accuracy_change(fp32_feats, feats, split, heads, episodes, seed),
        }
        quantize.require_quantized(entry, name, target)
        report[name], files[file] = entry, target
        variants[name] = {
            "file": file,
            "precision": "int8",
            "activations": settings["activations"],
            "target": "tensorrt" if name == "int8" else "onnxruntime-cpu",
        }
    return report, files, variants


def fp16_variant(
    fp32: Path,
    tmp: Path,
    reference: Reference,
    heads: dict[str, HeadFactory],
    episodes: int,
    seed: int,
) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Convert, check and describe the FP16 file: (report, path, manifest entry)."""
    split, images, fp32_feats = reference
    target = tmp / "backbone.fp16.onnx"
    log.info("converting to fp16")
    settings = fp16.convert_fp16(fp32, target)
    feats = parity.ort_features(parity.ort_session(target), images)
    report = {
        "settings": settings,
        "accuracy": parity.accuracy_change(fp32_feats, feats, split, heads, episodes, seed),
    }
    entry = {"file": target.name, "precision": "fp16", "target": "gpu", "check": report}
    return report, target, entry


def build_engines(bundle: Bundle, opt_batch: int, max_batch: int) -> list[dict[str, Any]]:
    """TensorRT engines of every TensorRT variant in `bundle`, built on this machine."""
    from mtl_edge.backends import trt_build

    profile = trt_build.Profile(1, opt_batch, max_batch)
    built = []
    for variant in trt_build.TRT_VARIANTS:
        if variant in bundle.variants:
            engine = trt_build.build_engine(bundle, variant, profile, force=True)
            built.append({"variant": variant, "file": str(engine.relative_to(bundle.root))})
    return built
