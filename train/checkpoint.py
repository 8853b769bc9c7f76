"""Self-describing checkpoints (format "mtl-edge.checkpoint", version 2): written, read and
turned back into models here, for every stage.

A checkpoint is a dict of tensors and plain values, loadable with
`torch.load(path, weights_only=True)` (the Meta-Baseline idea):

    {"format", "version", "model" (registry name), "model_args", "state_dict" (the backbone,
     with SS parameters after meta-training), "stage" ("pretrain" | "meta" | "joint"),
     "preprocess" (`Preprocess.to_dict()`), "config" (the recipe as plain data), "metrics",
     "commit" (of the source tree that trained it), "train_split" {"name", "fingerprint",
     "images"},
     "deploy": {"head": the device head recipe (`HeadRecipe.to_dict()`), "fc_init":
                {"weight" (ways, D), "bias" (ways,)} or None, "adapt": how the evaluation
                grid adapts the model to a new task},
     stage extras: "meta" (the learner's settings + ways), "classifier" (pre-training),
     "transfer_head" and "base_classes" (joint); resume state: "optimizer", "scheduler",
     "epoch", "rng", "best", "images"}

The deploy section travels with the weights the way timm's `pretrained_cfg` does: export, the
meta-test and the grid read it instead of working the head settings out of the training
recipe. It is written atomically (temp file, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtl_edge.atomicio import atomic_write_bytes
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, MtlEdgeError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess
from mtl_edge.sysinfo import git_commit
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.config import HeadConfig
from mtl_edge.train.ss import convert_to_ss
from mtl_edge.train.stage_config import JointConfig, MetaConfig

FORMAT = "mtl-edge.checkpoint"
VERSION = 2
STAGES = ("pretrain", "meta", "joint")
REQUIRED = ("model", "model_args", "state_dict", "stage", "preprocess", "deploy")


class CheckpointError(MtlEdgeError):
    """A file that is not a usable mtl-edge checkpoint (the message names the file)."""


# ---------------------------------------------------------------------------------------------
# The deploy section


def meta_head_recipe(meta: MetaConfig, head: HeadConfig | None = None) -> HeadRecipe:
    """The head meta-test and the device fit after meta-training: T = test_steps at inner_lr
    from the meta-learned init, with the meta-training loss reduction; the keys the recipe's
    [head] table sets replace those."""
    recipe = {
        "steps": meta.test_steps,
        "lr": meta.inner_lr,
        "init": "meta",
        "normalize": meta.normalize,
        "weight_decay": meta.inner_weight_decay,
        "loss": meta.inner_loss,
    }
    if head is not None:
        recipe |= {k: v for k, v in asdict(head).items() if v is not None}
    return HeadRecipe(**recipe)


def joint_adapt(cfg: JointConfig) -> dict[str, Any]:
    """How the evaluation grid adapts a joint model to a new task: "finetune" for plain
    transfer, "inner" (the training inner loop's SGD steps) for the meta-learned models."""
    return {
        "kind": "finetune" if cfg.method == "transfer" else "inner",
        "steps": max(cfg.inner_steps, 10),
        "lr": cfg.inner_lr,
        "head_init": cfg.head_init,
    }


def deploy_section(
    head: HeadRecipe,
    adapt: dict[str, Any],
    fc_init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The checkpoint's "deploy" entry (see the module docstring)."""
    return {
        "head": head.to_dict(),
        "fc_init": None
        if fc_init is None
        else {"weight": fc_init[0].detach().cpu(), "bias": fc_init[1].detach().cpu()},
        "adapt": dict(adapt),
    }


# ---------------------------------------------------------------------------------------------
# Writing and reading


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Write `ckpt` (format and version added) atomically; returns the path."""
    for key in REQUIRED:
        if key not in ckpt:
            raise ValueError(f"checkpoint misses {key!r}")
    if ckpt["stage"] not in STAGES:
        raise ValueError(f"checkpoint stage {ckpt['stage']!r} not in {STAGES}")
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "commit": git_commit(), **ckpt}, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def split_entry(split: ImageSplit) -> dict[str, Any]:
    """The "train_split" entry: the split a model was trained on, for provenance."""
    return {"name": split.name, "fingerprint": split.fingerprint(), "images": len(split)}


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as detached CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, checked for format, version, required keys and their types.

    Raises:
        CheckpointError: missing file, not a torch file, another format or version, missing
            or mistyped keys (one line naming the file).
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
            f"{path}: checkpoint version {ckpt.get('version')!r}; this mtl-edge reads "
            f"{VERSION} (train the model again with this version)"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint misses {', '.join(missing)}; it is damaged")
    for key, kind in (
        ("model", str),
        ("model_args", dict),
        ("state_dict", dict),
        ("preprocess", dict),
        ("deploy", dict),
    ):
        if not isinstance(ckpt[key], kind):
            raise CheckpointError(f"{path}: checkpoint entry {key!r} is not a {kind.__name__}")
    return ckpt


# ---------------------------------------------------------------------------------------------
# Rebuilding models


def _short(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _check_state(path: Path, state: dict[str, Any]) -> None:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {_short(bad)}")
    nonfinite = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if nonfinite:
        raise CheckpointError(
            f"{path}: non-finite weights (NaN or inf) in {_short(nonfinite)}; the training run "
            "diverged, use an earlier checkpoint"
        )


def build_backbone(path: Path, ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's backbone (converted to SS convs when the weights hold SS parameters)
    with its weights loaded, in eval mode on the CPU.

    Raises:
        CheckpointError: unknown backbone, missing or extra keys, wrong shapes, non-finite
            values (one line naming the file).
    """
    state = ckpt["state_dict"]
    _check_state(path, state)
    args = dict(ckpt["model_args"])
    try:
        model = create_backbone(ckpt["model"], **args)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if any(k.endswith("ss_scale") for k in state):
        convert_to_ss(model, shortcut=bool(args.get("ss_shortcut", True)))
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        parts = ([f"missing keys {_short(missing)}"] if missing else []) + (
            [f"unexpected keys {_short(extra)}"] if extra else []
        )
        raise CheckpointError(
            f"{path}: state_dict does not match backbone {ckpt['model']!r} ({'; '.join(parts)}); "
            "the checkpoint was written for another model or is damaged"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "")
        raise CheckpointError(
            f"{path}: weights do not fit backbone {ckpt['model']!r} "
            f"({detail[:160] or 'shape mismatch'}); check model_args"
        ) from None
    return model.eval()


@dataclass
class LoadedCheckpoint:
    """A checkpoint turned back into a model and how to deploy it.

    Attributes:
        path: the file.
        backbone: the network (`forward_features` (B, C, H, W) -> (B, D)), eval mode, CPU.
        preprocess: the preprocessing it was trained with.
        stage: "pretrain", "meta" or "joint".
        head: the head recipe of the MTL head on its features (meta-test, device).
        meta_init: the meta-learned FC init (weight (ways, D), bias (ways,)) as float32
            arrays, or None.
        adapt: how the evaluation grid adapts it ({"kind", ...}, `mtl_edge.train.grid`).
        raw: the checkpoint dict.
    """

    path: Path
    backbone: nn.Module
    preprocess: Preprocess
    stage: str
    head: HeadRecipe
    meta_init: tuple[np.ndarray, np.ndarray] | None
    adapt: dict[str, Any]
    raw: dict[str, Any]

    @property
    def name(self) -> str:
        """A short name for tables: the run folder of best.pt / last.pt, else the file stem."""
        return self.path.parent.name if self.path.stem in ("best", "last") else self.path.stem


def load_checkpoint(path: str | Path, expect_model: str | None = None) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint of any stage, with its deploy section.

    Args:
        expect_model: refuse a checkpoint of another backbone (e.g. resuming a resnet12 run
            from a conv4 file).

    Raises:
        CheckpointError: not a checkpoint, another architecture, weights or deploy entries
            that do not fit (one line naming the file).
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    name = str(ckpt["model"])
    if expect_model is not None and name != expect_model:
        raise CheckpointError(
            f"{path}: a {name!r} checkpoint, but the recipe's backbone is {expect_model!r}; pass "
            "a checkpoint of the same architecture"
        )
    deploy = ckpt["deploy"]
    try:
        preprocess = Preprocess.from_dict(dict(ckpt["preprocess"]))
        head = HeadRecipe(**dict(deploy.get("head") or {}))
    except (MtlEdgeError, TypeError) as e:
        raise CheckpointError(f"{path}: bad preprocess or deploy head ({e})") from None
    backbone = build_backbone(path, ckpt)
    meta_init = fc_init_arrays(path, deploy.get("fc_init"), int(getattr(backbone, "feature_dim")))  # noqa: B009
    adapt = dict(deploy.get("adapt") or {"kind": "centroid"})
    return LoadedCheckpoint(
        path, backbone, preprocess, str(ckpt["stage"]), head, meta_init, adapt, ckpt
    )


def fc_init_arrays(
    path: Path, fc_init: Any, feature_dim: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The deploy section's FC init as float32 arrays (weight (ways, D), bias (ways,)).

    Raises:
        CheckpointError: malformed, of another feature size, or not finite.
    """
    if fc_init is None:
        return None
    try:
        weight = fc_init["weight"].detach().cpu().numpy().astype(np.float32)
        bias = fc_init["bias"].detach().cpu().numpy().astype(np.float32)
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f"{path}: deploy fc_init must hold tensors 'weight' (ways, D) and 'bias' (ways,)"
        ) from None
    if weight.ndim != 2 or weight.shape[1] != feature_dim or bias.shape != (weight.shape[0],):
        raise CheckpointError(
            f"{path}: deploy fc_init weight {weight.shape} / bias {bias.shape}: need "
            f"(ways, {feature_dim}) and (ways,)"
        )
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise CheckpointError(f"{path}: deploy fc_init holds NaN or inf; use an earlier checkpoint")
    return weight, bias


def meta_entry(meta: MetaConfig, ways: int) -> dict[str, Any]:
    """The "meta" entry of a meta checkpoint: the learner's settings and its ways."""
    return asdict(meta) | {"ways": ways}
