"""A random-weight registry backbone written as a checkpoint and exported to a bundle, for
`bench latency --random`: torch and onnxruntime then run the same weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtl_edge.bench.latency import LatencyConfig

log = logging.getLogger(__name__)


def write_random_checkpoint(
    name: str,
    preprocess: dict[str, Any],
    seed: int,
    out: Path,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint of registry backbone `name` with random weights (seed) for latency runs."""
    import torch

    from mtl_edge.fewshot.fc import HeadRecipe
    from mtl_edge.train.backbones import create_backbone
    from mtl_edge.train.checkpoint import deploy_section, save_checkpoint

    torch.manual_seed(seed)
    model = create_backbone(name, **(model_args or {}))
    ckpt = {
        "model": name,
        "model_args": dict(getattr(model, "model_args", model_args or {})),
        "state_dict": model.state_dict(),
        "stage": "pretrain",
        "preprocess": preprocess,
        "config": {},
        "deploy": deploy_section(HeadRecipe(), {"kind": "centroid"}),
    }
    save_checkpoint(out, ckpt)
    return out


def prepare_random(cfg: LatencyConfig, workdir: Path, precisions: list[str]) -> tuple[Path, Path]:
    """Write a random checkpoint and export it to a bundle with int8 variants; (bundle, ckpt).

    The int8 calibration uses `cfg.calib` or, by default, synthetic images: the weights are
    random, so the quantization only has to be of the right form for the kernels to run.
    """
    from mtl_edge.data.synthetic import synthetic_split, write_class_folders
    from mtl_edge.export.api import export_checkpoint
    from mtl_edge.preprocess import Preprocess

    assert cfg.backbone is not None
    pre = Preprocess(size=cfg.image_size)
    ckpt = write_random_checkpoint(
        cfg.backbone, pre.to_dict(), cfg.seed, workdir / "random.pt", cfg.backbone_args
    )
    calib = cfg.calib
    if calib is None and any(p.startswith("int8") for p in precisions):
        split = synthetic_split(
            "train", seed=cfg.seed, size=cfg.image_size, train_classes=8, per_class=8
        )
        calib = write_class_folders(split, workdir / "calib", force=True)
    int8 = any(p.startswith("int8") for p in precisions)
    log.info("exporting random-weight %s (seed %d) to a bundle", cfg.backbone, cfg.seed)
    bundle, _ = export_checkpoint(
        ckpt,
        workdir / "bundle",
        int8=int8,
        calib=calib if int8 else None,
        fp16="fp16" in precisions,
        force=True,
        seed=cfg.seed,
        calib_images=64,
        parity_episodes=20,
        quant_episodes=20,
        eval_per_class=10,
    )
    return bundle.root, ckpt
