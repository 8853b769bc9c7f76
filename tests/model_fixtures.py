"""Tiny registry models and checkpoints for the export, fuse, bench and device tests.

`tiny_ss_model` is a ResNet-12 with widths (4, 8, 8, 8) converted to SS convs, with non-trivial
BatchNorm statistics and SS values away from (1, 0), so folding is really exercised (3x3 convs
with bias, 1x1 shortcuts without). `tiny_checkpoint` writes it as a meta (or pre-training)
checkpoint through the training stack's own writer, deploy section included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import backbone_state, deploy_section, save_checkpoint
from mtl_edge.train.ss import convert_to_ss

TINY = {"widths": [4, 8, 8, 8]}
FEATURE_DIM = 8


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, and SS values away from (1, 0)."""
    gen = torch.Generator().manual_seed(seed)

    def u(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                u(m.running_mean, -1.0, 1.0)
                u(m.running_var, 0.3, 3.0)
                u(m.weight, 0.5, 1.5)
                u(m.bias, -0.5, 0.5)
            if hasattr(m, "ss_scale"):
                u(m.ss_scale, 0.5, 1.5)
                u(m.ss_shift, -0.3, 0.3)
    return model.eval()


def tiny_ss_model(seed: int = 0, ss: bool = True, in_channels: int = 3) -> nn.Module:
    """The tiny ResNet-12 (features of size 8), SS-converted unless `ss` is False."""
    torch.manual_seed(seed)
    model = create_backbone("resnet12", in_channels=in_channels, **TINY)
    if ss:
        convert_to_ss(model, shortcut=True)
    return randomize(model, seed)


def tiny_checkpoint(
    path: Path, size: int = 20, seed: int = 0, meta_stage: bool = True, **overrides: Any
) -> Path:
    """Save the tiny model as a v2 checkpoint (meta: SS weights and a meta-learned FC init
    for 5 ways; else a plain pre-training checkpoint) and return its path."""
    model = tiny_ss_model(seed, ss=meta_stage)
    gen = torch.Generator().manual_seed(seed)
    fc = (torch.randn(5, FEATURE_DIM, generator=gen), torch.zeros(5)) if meta_stage else None
    head = HeadRecipe(steps=20, lr=0.1, init="meta") if meta_stage else HeadRecipe()
    ckpt: dict[str, Any] = {
        "model": "resnet12",
        "model_args": dict(model.model_args),
        "state_dict": backbone_state(model),
        "stage": "meta" if meta_stage else "pretrain",
        "preprocess": Preprocess(size=size).to_dict(),
        "config": {"runtime": {"seed": 7}, "data": {"kind": "synthetic"}},
        "metrics": {"val_acc": 50.0},
        "deploy": deploy_section(head, {"kind": "mtl" if meta_stage else "centroid"}, fc),
        "train_split": {"name": "synthetic/train", "fingerprint": "abc123", "images": 10},
    }
    ckpt.update(overrides)
    return save_checkpoint(path, ckpt)
