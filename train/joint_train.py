"""The joint method's driver: a recipe's [joint] table -> a run folder with metrics and
checkpoints (`mtl-edge train joint`).

The run folder is the one every training command writes (`mtl_edge.train.runs`): config.toml,
run.json, metrics.jsonl (one line per logged iteration), train.log, and last.pt (plus
it<N>.pt every `joint.checkpoint_every` iterations): a self-describing checkpoint (stage
"joint") whose `state_dict` is the backbone alone, so export, enrollment and the grid take it
like any other; the base-class head travels beside it as `transfer_head`.

The training split is decoded once (`mtl_edge.data.decode`, cached in `data.cache_dir`) into a
`DeviceDataset` on the training device, whose evaluation batches are the task images. Task i of
the run is episode i of one seeded `EpisodeSampler` over the base classes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.settings import config_to_dict
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import (
    backbone_state,
    deploy_section,
    joint_adapt,
    save_checkpoint,
    split_entry,
)
from mtl_edge.train.config import Recipe, as_recipe
from mtl_edge.train.gpu_data import DeviceDataset
from mtl_edge.train.joint import JointLearner
from mtl_edge.train.precision import resolve_precision
from mtl_edge.train.runs import Run, seed_everything
from mtl_edge.train.torchdata import describe, open_train_split, resolve_device

log = logging.getLogger(__name__)


def save_joint_checkpoint(
    path: Path,
    learner: JointLearner,
    recipe: Recipe,
    metrics: Mapping[str, Any],
    split: ImageSplit,
) -> Path:
    """Write a self-describing joint checkpoint atomically."""
    backbone = learner.backbone
    return save_checkpoint(
        path,
        {
            "model": recipe.model.backbone,
            "model_args": dict(getattr(backbone, "model_args", recipe.model.args)),
            "state_dict": backbone_state(backbone),
            "stage": "joint",
            "method": recipe.joint.method,
            "preprocess": recipe.model.input_preprocess.to_dict(),
            "config": config_to_dict(recipe),
            "metrics": dict(metrics),
            "deploy": deploy_section(HeadRecipe(), joint_adapt(recipe.joint)),
            "transfer_head": backbone_state(learner.transfer_head),
            "base_classes": list(split.class_names),
            "train_split": split_entry(split),
        },
    )


def train_joint(
    config: Recipe | Mapping[str, Any],
    out: str | Path,
    source: str = "recipe",
    time_limit_s: float = 0.0,
) -> Path:
    """Train the recipe's joint method into run folder `out` (refused if it has a final
    checkpoint).

    Args:
        time_limit_s: stop after this many seconds of training (0: none) and write last.pt
            with the iteration reached (`stopped` in its metrics and the last metrics line).

    Returns:
        the path of the final checkpoint.

    Raises:
        ConfigError / DatasetError: bad recipe, data that cannot supply the tasks.
    """
    recipe = as_recipe(config, source)
    out = Path(out)
    final = out / "last.pt"
    if final.exists():
        raise ConfigError(f"{out}: already holds a trained run; pass another --out")
    run = Run.open(out, recipe, recipe.runtime.seed, command=f"joint {recipe.joint.method}")
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("mtl_edge").addHandler(handler)
    try:
        _train(recipe, run, final, time_limit_s)
    finally:
        logging.getLogger("mtl_edge").removeHandler(handler)
        handler.close()
    return final


def _train(recipe: Recipe, run: Run, final: Path, time_limit_s: float) -> None:
    rt, cfg = recipe.runtime, recipe.joint
    device = resolve_device(rt)
    if rt.threads > 0:
        torch.set_num_threads(rt.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed task shapes: pick the fastest kernels
    seed_everything(rt.seed)
    preprocess = recipe.model.input_preprocess
    split = open_train_split(recipe.data, preprocess.color_mode)
    if split.num_classes < 2:
        raise DatasetError(f"{split.name}: {split.num_classes} class; training needs >= 2")
    run.record_split("train", split.name, split.fingerprint(), len(split))
    t0 = time.perf_counter()
    data = DeviceDataset.from_split(
        split, preprocess, device, cache_dir=recipe.data.cache_dir or None
    )
    log.info(
        "decoded %s in %.1f s; training on %s", describe(split), time.perf_counter() - t0, device
    )
    backbone = create_backbone(recipe.model.backbone, **recipe.model.args).to(device)
    prec = resolve_precision(rt.amp, rt.channels_last, device)
    prec.model(backbone)
    learner = JointLearner(backbone, split.num_classes, cfg)
    log.info("%s: %s engine", cfg.method, learner.engine)
    sampler = EpisodeSampler.for_split(split, cfg.ways, cfg.shots, cfg.queries, rt.seed)
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    for it in range(1, cfg.iterations + 1):
        first = (it - 1) * cfg.meta_batch
        out_of_time = time_limit_s > 0 and time.perf_counter() - t0 >= time_limit_s
        final_it = it == cfg.iterations or out_of_time
        logged = it % cfg.log_every == 0 or final_it
        tasks = sampler.episodes(cfg.meta_batch, start=first)
        with prec.autocast():
            stats = learner.step(lambda idx: prec.images(data.eval_batch(idx)), tasks, logged)
        if logged:
            last = {"iteration": it, "seconds": round(time.perf_counter() - t0, 2), **stats}
            last |= {"engine": learner.engine} | ({"stopped": "time limit"} if out_of_time else {})
            run.log_metrics(**last)
            log.info("%s it %d/%d %s", cfg.method, it, cfg.iterations, stats)
        if out_of_time:
            break
        if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and not final_it:
            path = run.dir / f"it{it:06d}.pt"
            save_joint_checkpoint(path, learner, recipe, {**last, "iteration": it}, split)
    save_joint_checkpoint(final, learner, recipe, last, split)
