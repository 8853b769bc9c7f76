"""`mtl-edge train evaluate`: meta-test one checkpoint on a split of its own dataset (or another).

The checkpoint carries its recipe, so its dataset, data root and split layout are known; the
protocol (ways, shots, episodes, queries, heads, seed) is an `EvalConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtl_edge.settings import from_dict
from mtl_edge.train.checkpoint import load_checkpoint
from mtl_edge.train.config import DataConfig, EvalConfig, as_recipe
from mtl_edge.train.metatest import meta_test
from mtl_edge.train.torchdata import open_recipe_split


def evaluate_checkpoint(
    checkpoint: str | Path,
    protocol: EvalConfig | dict[str, Any],
    split: str = "test",
    data: str | None = None,
    dataset: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Meta-test `checkpoint` on split spec `split` of its recipe's dataset, or of `dataset`
    (a kind such as "folders") under `data`; returns `meta_test`'s result."""
    loaded = load_checkpoint(checkpoint)
    if dataset is not None:
        data_cfg = DataConfig(kind=dataset, root=data or "")
    else:
        data_cfg = as_recipe(loaded.raw.get("config") or {}, f"{checkpoint} config").data
        if data:
            data_cfg.root = data
    eval_split = open_recipe_split(data_cfg, split, loaded.preprocess.color_mode)
    cfg = from_dict(EvalConfig, protocol, "evaluate options")
    loaded.backbone.to(device)
    return meta_test(loaded, eval_split, cfg, device)
