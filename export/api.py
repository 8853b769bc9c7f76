"""One call from a training checkpoint to a verified model bundle.

`export_checkpoint` rebuilds the checkpoint's model (`mtl_edge.train.checkpoint`), fuses SS
and BatchNorm into plain convs (`mtl_edge.train.fuse`), exports ONNX, checks onnxruntime against
PyTorch (random tensors and real-image episodes), optionally writes INT8 (TensorRT and CPU
files), FP16 and TensorRT engines, and writes the bundle atomically. The head recipe comes from
the checkpoint's deploy section. The CLI (`mtl-edge export`), the pipeline and the demo call it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl_edge.bundle import Bundle, write_bundle
from mtl_edge.data.registry import first_per_class
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, DatasetError, MtlEdgeError
from mtl_edge.export import manifest, onnx_export, parity, quantize, variants
from mtl_edge.export.check import synthetic_eval_split
from mtl_edge.fewshot.heads import feature_head
from mtl_edge.train.checkpoint import LoadedCheckpoint, load_checkpoint
from mtl_edge.train.config import as_recipe
from mtl_edge.train.fuse import fuse_error, fuse_model
from mtl_edge.train.torchdata import open_train_split

log = logging.getLogger(__name__)

FUSE_TOL = 1e-4


@dataclass
class ExportOptions:
    """What `export_checkpoint` writes besides the FP32 backbone.

    Attributes:
        int8: write the "int8" (S8S8, TensorRT) and "int8-cpu" (U8S8, onnxruntime) variants.
        int8_variants: which of the two (e.g. only "int8-cpu" for a CPU-only bundle).
        calib: folder of base-class images for calibration (class folders or flat); None uses
            the training split of the checkpoint's recipe.
        calib_images: how many calibration images to use.
        fp16: write the "fp16" variant.
        tensorrt: build TensorRT engines of every TensorRT variant on this machine.
        eval_data: labelled split for episode parity and the INT8 accuracy change; None uses
            a small built-in synthetic split.
        parity_episodes, quant_episodes: seeded episodes for the two checks.
        eval_per_class: images per class of `eval_data` used (the first ones), which bounds
            the feature extraction time of the checks.
        seed: seed of the episodes, random inputs and calibration sample.
        head: overrides of the head recipe (steps, lr, init, normalize, weight_decay, loss).
        trt_opt_batch, trt_max_batch: TensorRT optimisation profile.
        card: the model card, free-form JSON written as the manifest's "card" (what the model
            is for, the training commands, its meta-test table, the terms of its images).
    """

    int8: bool = False
    int8_variants: tuple[str, ...] = ("int8", "int8-cpu")
    calib: Path | None = None
    calib_images: int = 300
    fp16: bool = False
    tensorrt: bool = False
    eval_data: ImageSplit | None = None
    parity_episodes: int = 200
    quant_episodes: int = 600
    eval_per_class: int = 30
    seed: int = 0
    head: dict[str, Any] = field(default_factory=dict)
    trt_opt_batch: int = 8
    trt_max_batch: int = 64
    card: dict[str, Any] | None = None


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    int8: bool = False,
    calib: str | Path | None = None,
    fp16: bool = False,
    tensorrt: bool = False,
    force: bool = False,
    eval_data: ImageSplit | None = None,
    seed: int = 0,
    head: Mapping[str, Any] | None = None,
    **more: Any,
) -> tuple[Bundle, dict[str, Any]]:
    """Export a training checkpoint to a model bundle.

    Args:
        checkpoint: a file written by the training stack (`mtl-edge.checkpoint`, version 2).
        out: the bundle folder to create; refused if it exists unless `force`.
        int8, calib, fp16, tensorrt, eval_data, seed, head: see `ExportOptions`.
        force: replace an existing `out` (atomically, only once the new bundle is complete).
        **more: further `ExportOptions` fields (calib_images, parity_episodes, quant_episodes,
            eval_per_class, int8_variants, trt_opt_batch, trt_max_batch, card).

    Returns:
        (the written and verified bundle, the export report: fuse, parity, quantization, fp16,
        engines).

    Raises:
        MtlEdgeError: bad checkpoint, existing output, failed parity; UnavailableError when
            --tensorrt is asked where TensorRT or a GPU is missing.
    """
    unknown = sorted(set(more) - set(ExportOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"export_checkpoint: unknown options {unknown}")
    opts = ExportOptions(
        int8=int8,
        calib=None if calib is None else Path(calib),
        fp16=fp16,
        tensorrt=tensorrt,
        eval_data=eval_data,
        seed=seed,
        head=dict(head or {}),
        **more,
    )
    return _export(load_checkpoint(checkpoint), Path(out), opts, force)


def _preflight(out: Path, force: bool, opts: ExportOptions) -> None:
    if out.exists() and not force:
        raise MtlEdgeError(f"{out}: already exists; choose another --out or pass --force")
    if opts.tensorrt:
        from mtl_edge.backends.tensorrt_runtime import import_tensorrt
        from mtl_edge.backends.trt_build import this_gpu

        import_tensorrt()
        this_gpu()
    unknown = [v for v in opts.int8_variants if v not in quantize.VARIANTS]
    if unknown or not opts.int8_variants:
        raise ConfigError(
            f"--int8-variants {','.join(opts.int8_variants)}: use some of "
            f"{', '.join(quantize.VARIANTS)}"
        )
    if opts.calib is not None and not Path(opts.calib).is_dir():
        raise DatasetError(f"--calib {opts.calib}: no such folder; give a folder of images")


def calibration_split(loaded: LoadedCheckpoint, opts: ExportOptions) -> ImageSplit:
    """The INT8 calibration images: --calib, else the training split of the checkpoint's
    recipe when it is on this machine.

    Raises:
        MtlEdgeError: neither is available.
    """
    color = loaded.preprocess.color_mode
    if opts.calib is not None:
        return quantize.calibration_split(opts.calib, color)
    config = loaded.raw.get("config") or {}
    if "data" not in config:
        raise MtlEdgeError(
            f"{loaded.path}: --int8 needs calibration images and the checkpoint names no training "
            "data; pass --calib DIR (base-class images)"
        )
    try:
        return open_train_split(as_recipe(config).data, color)
    except MtlEdgeError as e:
        raise MtlEdgeError(
            f"{loaded.path}: --int8 needs calibration images and the recipe's training split "
            f"is not usable here ({e}); pass --calib DIR (base-class images)"
        ) from None


def _export(
    loaded: LoadedCheckpoint, out: Path, opts: ExportOptions, force: bool
) -> tuple[Bundle, dict[str, Any]]:
    _preflight(out, force, opts)
    pre, path = loaded.preprocess, loaded.path
    recipe = manifest.head_recipe(loaded, opts.head)
    files: dict[str, Path | bytes] = {}
    head = manifest.head_section(loaded, recipe, files)
    calib_split = calibration_split(loaded, opts) if opts.int8 else None
    report: dict[str, Any] = {}
    fused = fuse_model(loaded.backbone)
    x = torch.randn(5, *pre.input_shape, generator=torch.Generator().manual_seed(opts.seed))
    err = fuse_error(loaded.backbone, fused, x)
    report["fold"] = {"max_abs": err}
    with torch.no_grad():
        scale = 1.0 + float(fused.forward_features(x).abs().max())  # type: ignore[operator]
    if not err <= FUSE_TOL * scale:
        raise MtlEdgeError(
            f"{path}: fused network differs from the trained one by {err:.3g}; this is a bug, "
            "please report it with the checkpoint"
        )
    eval_split = (
        synthetic_eval_split(pre, opts.seed)
        if opts.eval_data is None
        else first_per_class(opts.eval_data, opts.eval_per_class)
    )
    heads = {
        "mtl": feature_head("mtl", recipe, loaded.meta_init),
        "centroid": feature_head("centroid"),
    }
    entries: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mtl-edge-export.") as tmp:
        fp32 = onnx_export.export_onnx(fused, pre.input_shape, Path(tmp) / "backbone.onnx")
        files["backbone.onnx"] = fp32
        entries["fp32"] = {"file": "backbone.onnx", "precision": "fp32"}
        session = parity.ort_session(fp32)
        rep = parity.tensor_parity(fused, fp32, pre.input_shape, seed=opts.seed, session=session)
        log.info(
            "parity: onnxruntime vs torch on %d images of %s", len(eval_split), eval_split.name
        )
        images = parity.split_images(eval_split, pre)
        rep["real"] = parity.features_parity(
            fused, session, eval_split, images, opts.parity_episodes, opts.seed
        )
        rep["pass"] = bool(rep["pass"] and rep["real"]["episodes"]["pass"])
        report["parity"] = rep
        if not rep["pass"]:
            raise MtlEdgeError(
                f"{path}: onnxruntime disagrees with PyTorch (max abs {rep['max_abs']:.3g}, "
                f"cosine {rep['cosine_min']:.6f}, identical episodes "
                f"{rep['real']['episodes']['identical_episodes']}/{opts.parity_episodes}); "
                "the bundle was not written"
            )
        reference = (eval_split, images, parity.ort_features(session, images))
        if calib_split is not None:
            report["quantization"], int8_files, int8_entries = variants.int8_variants(
                fp32, Path(tmp), calib_split, pre, reference, heads,
                opts.calib_images, opts.quant_episodes, opts.seed, opts.int8_variants,
            )  # fmt: skip
            files.update(int8_files)
            entries.update(int8_entries)
        if opts.fp16:
            report["fp16"], target, entries["fp16"] = variants.fp16_variant(
                fp32, Path(tmp), reference, heads, opts.quant_episodes, opts.seed
            )
            files[target.name] = target
        doc = {
            "backbone": {
                "name": loaded.raw["model"],
                "args": manifest.json_safe(loaded.raw.get("model_args", {})),
                "feature_dim": int(reference[2].shape[1]),
                "input_name": onnx_export.INPUT_NAME,
                "output_name": onnx_export.OUTPUT_NAME,
                "input_shape": list(pre.input_shape),
                "opset": onnx_export.OPSET,
            },
            "preprocess": pre.to_dict(),
            "head": head,
            "variants": entries,
            "provenance": manifest.provenance(loaded, opts.seed),
            "metrics": manifest.json_safe(loaded.raw.get("metrics") or {}),
            "parity": report["parity"],
            "quantization": report.get("quantization", {}),
        }
        if opts.card is not None:
            doc["card"] = opts.card
        bundle = write_bundle(out, manifest.json_safe(doc), files, force=force)
    if opts.tensorrt:
        report["engines"] = variants.build_engines(bundle, opts.trt_opt_batch, opts.trt_max_batch)
    return bundle, report
