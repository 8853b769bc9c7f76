"""Self-describing training checkpoints (format "mtl-edge.checkpoint", version 1).

A checkpoint is a dict of tensors and plain values, loadable with
`torch.load(path, weights_only=True)`:

    {"format", "version", "model" (registry name), "model_args", "state_dict" (the backbone,
     with SS parameters after meta-training), "stage" ("pretrain" | "meta"), "preprocess"
     (`Preprocess.to_dict()`), "config" (the recipe as plain data), "metrics",
     "fc_init" {"weight", "bias"} and "meta" (settings + ways) for meta checkpoints,
     "classifier" {"weight", "bias"} for pre-training, "optimizer" / "scheduler" / "epoch" /
     "rng" for resuming}

It is written atomically (temp file, fsync, rename), so a crash never leaves half a file.
`mtl-edge export` reads the same format (`mtl_edge.export.api.read_checkpoint`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_edge.atomicio import atomic_write_bytes
from mtl_edge.errors import ConfigError, MtlEdgeError
from mtl_edge.preprocess import Preprocess

FORMAT = "mtl-edge.checkpoint"
VERSION = 1
STAGES = ("pretrain", "meta")
REQUIRED = ("model", "model_args", "state_dict", "stage", "preprocess")


class CheckpointError(MtlEdgeError):
    """A file that is not a usable mtl-edge checkpoint (the message names the file)."""


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Write `ckpt` (format and version added) atomically; returns the path."""
    for key in REQUIRED:
        if key not in ckpt:
            raise ValueError(f"checkpoint misses {key!r}")
    if ckpt["stage"] not in STAGES:
        raise ValueError(f"checkpoint stage {ckpt['stage']!r} not in {STAGES}")
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **ckpt}, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, checked for format, version and the required keys.

    Raises:
        CheckpointError: missing file, not a torch file, another format or version, missing
            keys (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler errors of every kind
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}); pass a best.pt or "
            "last.pt written by `mtl-edge train`"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an mtl-edge checkpoint (no format {FORMAT!r}); pass a best.pt or "
            "last.pt written by `mtl-edge train`"
        )
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')!r}; this mtl-edge reads {VERSION}"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint misses {', '.join(missing)}; it is damaged")
    return ckpt


@dataclass
class LoadedCheckpoint:
    """A checkpoint turned back into a network.

    Attributes:
        model: the backbone (pre-training) or a `MetaTransferLearner` (meta-training).
        preprocess: the preprocessing the model was trained with.
        stage: "pretrain" or "meta".
        raw: the checkpoint dict.
    """

    model: nn.Module
    preprocess: Preprocess
    stage: str
    raw: dict[str, Any]


def load_checkpoint(path: str | Path, expect_model: str | None = None) -> LoadedCheckpoint:
    """Rebuild the network of a checkpoint, in eval mode, on the CPU.

    Args:
        expect_model: refuse a checkpoint of another backbone (e.g. resuming a resnet12 run
            from a conv4 file).

    Raises:
        CheckpointError: not a checkpoint, another architecture, weights that do not fit.
    """
    from mtl_edge.train.backbones import create_backbone
    from mtl_edge.train.meta_transfer import learner_from_parts

    ckpt = read_checkpoint(path)
    name = str(ckpt["model"])
    if expect_model is not None and name != expect_model:
        raise CheckpointError(
            f"{path}: a {name!r} checkpoint, but the recipe's backbone is {expect_model!r}; pass "
            "a checkpoint of the same architecture"
        )
    try:
        preprocess = Preprocess.from_dict(dict(ckpt["preprocess"]))
        if ckpt["stage"] == "meta":
            model: nn.Module = learner_from_parts(
                name,
                dict(ckpt["model_args"]),
                ckpt["state_dict"],
                ckpt.get("fc_init"),
                ckpt.get("meta"),
            )
        else:
            model = create_backbone(name, **dict(ckpt["model_args"]))
            model.load_state_dict(ckpt["state_dict"], strict=True)
    except MtlEdgeError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise CheckpointError(
            f"{path}: weights do not fit backbone {name!r} ({detail[:160]}); the checkpoint was "
            "written for another architecture or is damaged"
        ) from None
    return LoadedCheckpoint(model.eval(), preprocess, str(ckpt["stage"]), ckpt)


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as detached CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def model_identity(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(registry name, model_args) of a registry backbone."""
    name = getattr(model, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{type(model).__name__} is not a registry backbone (no name)")
    return name, dict(getattr(model, "model_args", {}))
