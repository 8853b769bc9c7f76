"""The joint method's driver: recipe -> run folder with a log, metrics and checkpoints.

A run folder holds `config.json` (the resolved recipe), `metrics.jsonl` (one line per logged
iteration), `train.log` and `checkpoints/last.pt` (a self-describing mtl-edge checkpoint whose
`state_dict` is the Conv-4 backbone alone, so export and enrollment take it like any other;
the base-class head travels beside it as `transfer_head`).

Training images are decoded, resized and cached once as uint8 (in memory, and as a .npy file in
`data.cache_dir` when set) and normalised per batch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_edge.atomicio import atomic_write, atomic_write_bytes
from mtl_edge.data.decode import decoded_images
from mtl_edge.data.registry import data_root, first_per_class, open_split_spec
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.joint import JointConfig, JointLearner, TaskSampler

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mtl-edge.checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class DataConfig:
    """Where the base classes come from.

    Attributes:
        kind: an `open_split` kind ("folders" for miniImageNet class folders, "synthetic").
        root: dataset folder; "" means $MTL_EDGE_DATA/miniimagenet (default ../shared/data).
        split: the base-class split.
        image_size: side after resize + center crop (84 in the paper).
        per_class: use the first N images of every class (0: all).
        cache_dir: folder for the decoded .npy cache ("" : memory only).
        options: further `open_split` options (e.g. synthetic per_class).
    """

    kind: str = "folders"
    root: str = ""
    split: str = "train"
    image_size: int = 84
    per_class: int = 0
    cache_dir: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The backbone (`create_backbone(backbone, width=width)`) and the transfer head size
    (0: the number of base classes of the split)."""

    backbone: str = "conv4"
    width: int = 32
    num_base_classes: int = 0


@dataclass
class LoopConfig:
    """Iterations, seed, logging and checkpoint cadence, and where to train.

    Attributes:
        threads: CPU threads (0: torch's default).
        device: "auto" (CUDA when present), "cpu" or "cuda[:i]"; the decoded images then live
            on that device too (84x84 miniImageNet: 1.4 GB of uint8).
    """

    iterations: int = 1000
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    threads: int = 0
    device: str = "auto"


@dataclass
class JointRecipe:
    """A whole joint recipe (TOML tables [data], [model], [joint], [train])."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


# ---------------------------------------------------------------------------------------------
# Recipes


def _local_recipe(name_or_path: str | Path) -> str | Path:
    """A recipe name resolved against the source tree's recipes/ folder when it is there (an
    editable install made before recipes/ was packaged); otherwise unchanged.

    Raises:
        ConfigError: the recipe is in neither place.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    folder = Path(__file__).resolve().parent.parent / "recipes"
    name = path.name if path.suffix == ".toml" else path.name + ".toml"
    if path.parent == Path(".") and (folder / name).is_file():
        return folder / name
    if path.parent == Path(".") and importlib.util.find_spec("mtl_edge.recipes") is not None:
        return name_or_path
    known = ", ".join(p.stem for p in sorted(folder.glob("joint-*.toml")))
    raise ConfigError(f"recipe {str(name_or_path)!r}: no such file; joint recipes: {known}")


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> JointRecipe:
    """Read a joint recipe (a path, or a packaged name such as "joint-reptile") and apply
    `--set key=value` overrides, then validate.

    Raises:
        ConfigError: missing file, bad TOML, unknown key, wrong type, bad value.
    """
    from mtl_edge.train.config import load_config

    recipe = load_config(JointRecipe, _local_recipe(name_or_path), overrides or [])
    recipe.joint.validate()
    if recipe.data.image_size < 16:
        raise ConfigError(f"data.image_size={recipe.data.image_size}: must be >= 16")
    return recipe


# ---------------------------------------------------------------------------------------------
# Data


class ImageBank:
    """Decoded uint8 images on one device, normalised on request.

    Args:
        array: uint8 of shape (N, H, W, C) or (N, H, W).
        preprocess: the mean / std / scale / invert to apply.
        device: where the images live and the float batches are made.
    """

    def __init__(
        self, array: np.ndarray, preprocess: Preprocess, device: torch.device | str = "cpu"
    ) -> None:
        x = torch.from_numpy(np.ascontiguousarray(array))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        self.images = x.to(device)
        channels = self.images.shape[1]
        self.mean = torch.tensor(preprocess.mean[:channels], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(preprocess.std[:channels], device=device).view(1, -1, 1, 1)
        self.scale = float(preprocess.scale)
        self.invert = bool(preprocess.invert)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __call__(self, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Float images of shape (len(idx), C, H, W), on the bank's device."""
        pick = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.images.device)
        x = self.images[pick].float() * self.scale
        if self.invert:
            x = 1.0 - x
        return (x - self.mean) / self.std


def make_preprocess(split: ImageSplit, size: int) -> Preprocess:
    """The checkpoint's preprocessing: resize + crop to `size`, ImageNet mean/std for RGB."""
    if split.color_mode == "L":
        return Preprocess(size=size, color_mode="L", mean=(0.5,), std=(0.5,))
    return Preprocess(size=size)


def open_base_split(cfg: DataConfig) -> ImageSplit:
    """The base-class split of the recipe (a `open_split_spec` spec), trimmed to `per_class`."""
    root = (
        None
        if cfg.kind == "synthetic"
        else Path(cfg.root)
        if cfg.root
        else data_root() / "miniimagenet"
    )
    split = open_split_spec(cfg.kind, root, cfg.split, **cfg.options)
    return first_per_class(split, cfg.per_class)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_joint_checkpoint(
    path: Path,
    learner: JointLearner,
    recipe: JointRecipe,
    preprocess: Preprocess,
    metrics: dict[str, Any],
    class_names: list[str],
) -> None:
    """Write a self-describing checkpoint atomically."""
    backbone = learner.backbone
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": str(getattr(backbone, "name", recipe.model.backbone)),
        "model_args": dict(backbone.model_args),
        "state_dict": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
        "stage": "joint",
        "method": recipe.joint.method,
        "preprocess": preprocess.to_dict(),
        "config": asdict(recipe),
        "metrics": metrics,
        "adapt": adapt_settings(recipe.joint),
        "transfer_head": {
            k: v.detach().cpu().clone() for k, v in learner.transfer_head.state_dict().items()
        },
        "base_classes": list(class_names),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def adapt_settings(cfg: JointConfig) -> dict[str, Any]:
    """How the evaluation grid adapts this model to a new task: "finetune" for plain transfer,
    "inner" (the training inner loop's SGD steps) for the meta-learned models."""
    return {
        "kind": "finetune" if cfg.method == "transfer" else "inner",
        "steps": max(cfg.inner_steps, 10),
        "lr": cfg.inner_lr,
        "head_init": cfg.head_init,
    }


# ---------------------------------------------------------------------------------------------
# Training


def train_joint(recipe: JointRecipe, out: str | Path, progress: bool | None = None) -> Path:
    """Train one joint recipe into run folder `out` (created; refused if it has a checkpoint).

    Returns:
        the path of the final checkpoint.

    Raises:
        ConfigError / DatasetError: bad recipe, data that cannot supply the tasks.
    """
    from mtl_edge.train.backbones import create_backbone

    out = Path(out)
    final = out / "checkpoints" / "last.pt"
    if final.exists():
        raise ConfigError(f"{out}: already holds a trained run; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("mtl_edge").addHandler(handler)
    try:
        return _train(recipe, out, final, create_backbone)
    finally:
        logging.getLogger("mtl_edge").removeHandler(handler)
        handler.close()


def _train(recipe: JointRecipe, out: Path, final: Path, create_backbone: Any) -> Path:
    from mtl_edge.train.torchdata import parse_device

    loop = recipe.train
    device = parse_device(loop.device, "train.device")
    if loop.threads > 0:
        torch.set_num_threads(loop.threads)
    torch.manual_seed(loop.seed)
    atomic_write_bytes(out / "config.json", (json.dumps(asdict(recipe), indent=2) + "\n").encode())
    split = open_base_split(recipe.data)
    if split.num_classes < 2:
        raise DatasetError(f"{split.name}: {split.num_classes} class; training needs >= 2")
    preprocess = make_preprocess(split, recipe.data.image_size)
    t0 = time.perf_counter()
    bank = ImageBank(
        decoded_images(split, recipe.data.image_size, recipe.data.cache_dir), preprocess, device
    )
    log.info(
        "decoded %d images of %s in %.1f s; training on %s",
        len(bank),
        split.name,
        time.perf_counter() - t0,
        device,
    )
    in_channels = 1 if split.color_mode == "L" else 3
    backbone = create_backbone(
        recipe.model.backbone, width=recipe.model.width, in_channels=in_channels
    ).to(device)
    heads = recipe.model.num_base_classes or split.num_classes
    learner = JointLearner(backbone, heads, recipe.joint)
    learner.check_labels(split.num_classes)
    cfg = recipe.joint
    sampler = TaskSampler(split.labels, cfg.ways, cfg.shots, cfg.queries, loop.seed)
    metrics_path = out / "metrics.jsonl"
    lines: list[str] = []
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    for it in range(1, loop.iterations + 1):
        tasks = [sampler.task() for _ in range(cfg.meta_batch)]
        stats = learner.step(bank, tasks)
        if it % max(loop.log_every, 1) == 0 or it == loop.iterations:
            last = {"iteration": it, "seconds": round(time.perf_counter() - t0, 2), **stats}
            lines.append(json.dumps(last))
            atomic_write_bytes(metrics_path, ("\n".join(lines) + "\n").encode())
            log.info("%s it %d/%d %s", cfg.method, it, loop.iterations, stats)
        if loop.checkpoint_every and it % loop.checkpoint_every == 0 and it < loop.iterations:
            save_joint_checkpoint(
                out / "checkpoints" / f"it{it:06d}.pt",
                learner,
                recipe,
                preprocess,
                last,
                split.class_names,
            )
    save_joint_checkpoint(final, learner, recipe, preprocess, last, split.class_names)
    return final


def main(argv: list[str] | None = None) -> int:
    """`python -m mtl_edge.train.joint_train --recipe R --out RUN [--set k=v ...]`."""
    import argparse
    import sys

    from mtl_edge.errors import MtlEdgeError

    parser = argparse.ArgumentParser(description="Train a joint transfer + meta-learning recipe.")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        path = train_joint(load_recipe(args.recipe, args.overrides), args.out)
    except MtlEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
