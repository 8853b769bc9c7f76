"""The parts of a bundle manifest that come from the checkpoint: the head, the provenance.

The head recipe is the checkpoint's deploy section (written at training time) with the export
command's overrides; the meta-learned FC init, when the checkpoint has one, becomes two `.npy`
files of the bundle.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from mtl_edge import sysinfo
from mtl_edge.atomicio import sha256_file
from mtl_edge.errors import MtlEdgeError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.jsonfile import json_safe
from mtl_edge.train.checkpoint import LoadedCheckpoint

INIT_WEIGHT, INIT_BIAS = "head_init_weight.npy", "head_init_bias.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as float32 .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    return buf.getvalue()


def head_recipe(loaded: LoadedCheckpoint, overrides: Mapping[str, Any]) -> HeadRecipe:
    """The checkpoint's deploy head recipe with `overrides` (steps, lr, init, ...) applied.

    Raises:
        MtlEdgeError: an unknown override key, or init "meta" without a meta-learned init.
    """
    unknown = sorted(set(overrides) - set(HeadRecipe.__dataclass_fields__))
    if unknown:
        raise MtlEdgeError(
            f"head overrides {unknown}: use {', '.join(HeadRecipe.__dataclass_fields__)}"
        )
    recipe = HeadRecipe(**(loaded.head.to_dict() | dict(overrides)))
    if recipe.init == "meta" and loaded.meta_init is None:
        raise MtlEdgeError(
            f"{loaded.path}: head init 'meta' needs a meta-training checkpoint (it has no "
            "meta-learned FC init)"
        )
    return recipe


def head_section(
    loaded: LoadedCheckpoint, recipe: HeadRecipe, files: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's head entry; adds the meta-learned FC init to `files` when present."""
    head: dict[str, Any] = recipe.to_dict()
    head["meta_init"] = None
    if loaded.meta_init is not None:
        weight, bias = loaded.meta_init
        files[INIT_WEIGHT], files[INIT_BIAS] = npy_bytes(weight), npy_bytes(bias)
        head["meta_init"] = {"weight": INIT_WEIGHT, "bias": INIT_BIAS, "ways": int(len(weight))}
    return head


def provenance(loaded: LoadedCheckpoint, seed: int) -> dict[str, Any]:
    """Where the bundle comes from: checkpoint, data, seeds, commits, versions."""
    import onnx
    import onnxruntime
    import torch

    ckpt = loaded.raw
    config = ckpt.get("config") or {}
    train_split = ckpt.get("train_split") or {}
    return json_safe(
        {
            "checkpoint": loaded.path.name,
            "checkpoint_sha256": sha256_file(loaded.path),
            "stage": loaded.stage,
            "dataset": (config.get("data") or {}).get("kind"),
            "train_split": train_split.get("name"),
            "split_fingerprint": train_split.get("fingerprint"),
            "training_seed": (config.get("runtime") or {}).get("seed"),
            "export_seed": seed,
            "commit": ckpt.get("commit"),
            "export_commit": sysinfo.git_commit(),
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        }
    )
