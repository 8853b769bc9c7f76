"""`mtl-edge train evaluate`: meta-test one checkpoint on a split of its own dataset (or another).

The checkpoint carries its recipe, so its dataset, data root and split layout are known; the
protocol (ways, shots, episodes, queries, heads, seed) is an `EvalConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, MtlEdgeError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.settings import apply_overrides, from_dict
from mtl_edge.train.checkpoint import LoadedCheckpoint, load_checkpoint
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
    head: Sequence[str] = (),
) -> dict[str, Any]:
    """Meta-test `checkpoint` on split spec `split` of its recipe's dataset, or of `dataset`
    (a kind such as "folders") under `data`; returns `meta_test`'s result. `head` items
    ("steps=200") override the checkpoint's deploy head for the "mtl" head
    (`with_head_overrides`)."""
    loaded = with_head_overrides(load_checkpoint(checkpoint), head)
    eval_split = checkpoint_split(loaded, split, data, dataset)
    cfg = from_dict(EvalConfig, protocol, "evaluate options")
    loaded.backbone.to(device)
    return meta_test(loaded, eval_split, cfg, device)


def checkpoint_split(
    loaded: LoadedCheckpoint, split: str, data: str | None = None, dataset: str | None = None
) -> ImageSplit:
    """Split spec `split` of the checkpoint's own dataset (its recipe's data table, rooted at
    `data` when given), or of dataset kind `dataset` under `data`."""
    if dataset is not None:
        data_cfg = DataConfig(kind=dataset, root=data or "")
    else:
        data_cfg = as_recipe(loaded.raw.get("config") or {}, f"{loaded.path} config").data
        if data:
            data_cfg.root = data
    return open_recipe_split(data_cfg, split, loaded.preprocess.color_mode)


def with_head_overrides(loaded: LoadedCheckpoint, overrides: Sequence[str]) -> LoadedCheckpoint:
    """`loaded` with its deploy head recipe changed by KEY=VALUE `overrides` (steps, lr, init,
    normalize, weight_decay, loss), e.g. to score test-time settings before they go into a
    recipe's [head] table; the paper's head ("mtl-paper") is not changed.

    Raises:
        ConfigError: an unknown key or a value out of range, naming the option.
    """
    if not overrides:
        return loaded
    doc = apply_overrides(loaded.head.to_dict(), overrides, "--head", "steps=200")
    try:
        recipe = HeadRecipe(**doc)
    except TypeError:
        unknown = sorted(set(doc) - set(HeadRecipe.__dataclass_fields__))
        raise ConfigError(
            f"--head {unknown[0]}: not a head setting; use "
            f"{', '.join(HeadRecipe.__dataclass_fields__)}"
        ) from None
    except MtlEdgeError as e:
        raise ConfigError(f"--head: {e}") from None
    return dataclasses.replace(loaded, head=recipe)
