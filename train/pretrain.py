"""Phase 1: pre-train the backbone as a classifier over all base classes.

SGD with Nesterov momentum and weight decay, a cosine or step schedule (optional linear
warm-up), label smoothing, device-side augmentation (`gpu_data.DeviceAugment`), a linear
classifier over the base classes on top of `forward_features`. After every `val_every` epochs
the backbone is scored on N-way K-shot episodes of the validation classes with a
nearest-centroid head on its features (fixed episodes, so scores compare across epochs); the
best epoch is RUN/best.pt, the newest RUN/last.pt (with optimizer and schedule, for `resume`).
Precision (bf16 autocast + channels-last where the CPU or GPU has bf16 units), `torch.compile`
(`runtime.compile`) and the fused SGD kernel on a GPU come from `mtl_edge.train.precision`; with
a time budget (`mtl_edge.train.budget`) the first steps set the epochs. The step loop never waits
for the GPU: loss and accuracy are summed on the device and read once per epoch (and every
`LOG_EVERY` steps while a progress bar shows them). `runtime.save = "end"` writes the
checkpoints once, when the stage ends. Under torchrun the batches are split across ranks
(`mtl_edge.train.distributed`); rank 0 writes the run folder.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.errors import ConfigError
from mtl_edge.fewshot.evaluate import evaluate_episodes
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.fewshot.heads import CentroidHead
from mtl_edge.settings import config_to_dict
from mtl_edge.train import budget as budget_mod
from mtl_edge.train import distributed as dist_util
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import (
    backbone_state,
    deploy_section,
    read_checkpoint,
    save_checkpoint,
    split_entry,
)
from mtl_edge.train.config import Recipe, as_recipe
from mtl_edge.train.gpu_data import make_generator
from mtl_edge.train.metatest import extract_features
from mtl_edge.train.precision import configure_device, fused_options, resolve_precision
from mtl_edge.train.runs import Run, seed_everything
from mtl_edge.train.torchdata import (
    describe,
    load_split,
    make_augment,
    open_recipe_split,
    open_train_split,
    progress_bar,
    resolve_device,
    show_progress,
)

log = logging.getLogger(__name__)

#: Steps between progress-bar readings of the device-side loss and accuracy.
LOG_EVERY = 50


def lr_factor(cfg: Recipe, step: int, steps_per_epoch: int) -> float:
    """The schedule's multiplier of the base lr at optimizer step `step` (0-based)."""
    p = cfg.pretrain
    epoch = step / max(steps_per_epoch, 1)
    if p.warmup_epochs and epoch < p.warmup_epochs:
        return (step + 1) / (p.warmup_epochs * steps_per_epoch)
    if p.schedule == "cosine":
        total = max(p.epochs - p.warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min((epoch - p.warmup_epochs) / total, 1.0)))
    return p.gamma ** int(epoch // p.step_size)


def centroid_accuracy(
    features: np.ndarray, labels: np.ndarray, sampler: EpisodeSampler, episodes: int
) -> tuple[float, float]:
    """Mean and 95% interval (percent) of cosine nearest-centroid accuracy over the sampler's
    first `episodes` episodes. features: (N, D); labels: (N,) split class ids."""
    res = evaluate_episodes(features, labels, sampler.episodes(episodes), {"c": CentroidHead})
    return res["c"].mean, res["c"].ci95


def pretrain(
    config: Recipe | Mapping[str, Any],
    out: str | Path,
    resume: bool = False,
    source: str = "recipe",
    time_budget: str | None = None,
) -> dict[str, Any]:
    """Run phase 1 into the run folder `out`.

    Args:
        time_budget: this stage's wall-time budget ("90m"; else the recipe's share of
            runtime.time_budget, if any): epochs and steps per epoch are then planned
            (`mtl_edge.train.budget`) and RUN/budget.json records the decision.

    Returns:
        {"checkpoint": best.pt, "last": last.pt, "images": training images processed (all
         ranks), "work": {"train_images", "eval_images", "classes"} (`mtl_edge.train.flops`),
         "best_val": best validation accuracy (percent) or None, "rank",
         "param_checksum": sum of the backbone's parameters (equal on every rank)}.

    Raises:
        ConfigError / DatasetError: bad recipe, data that cannot make the validation tasks.
    """
    cfg = as_recipe(config, source)
    clock = budget_mod.StageClock.start(cfg, "pretrain", time_budget)
    p, rt = cfg.pretrain, cfg.runtime
    ctx = dist_util.context()
    device = ctx.device if ctx.enabled else resolve_device(rt)
    if rt.threads:
        torch.set_num_threads(rt.threads)
    seed_everything(rt.seed + ctx.rank)
    out = Path(out)
    run = Run.open(out, cfg, rt.seed, resume, "pretrain") if ctx.is_main else None
    preprocess = cfg.model.input_preprocess
    train_split = open_train_split(cfg.data, preprocess.color_mode)
    val_split = None
    if p.val_episodes > 0:
        val_split = open_recipe_split(cfg.data, cfg.data.val_split, preprocess.color_mode)
        val_split.require(p.val_ways, p.val_shots + p.val_queries)
    bars = show_progress(rt) and ctx.is_main
    data_device = device if p.device_data else torch.device("cpu")
    train_data = load_split(train_split, preprocess, data_device, bars)
    val_data = load_split(val_split, preprocess, data_device, bars) if val_split else None
    if run is not None:
        run.record_split("train", train_split.name, train_split.fingerprint(), len(train_split))
        if val_split is not None:
            run.record_split("val", val_split.name, val_split.fingerprint(), len(val_split))
    log.info("pre-training on %s", describe(train_split))

    backbone = create_backbone(cfg.model.backbone, **cfg.model.args)
    classifier = nn.Linear(int(getattr(backbone, "feature_dim")), train_split.num_classes)  # noqa: B009
    net = nn.Sequential()
    net.add_module("backbone", backbone)
    net.add_module("classifier", classifier)
    net.to(device)
    configure_device(device)
    prec = resolve_precision(rt.amp, rt.channels_last, device, announce=ctx.is_main)
    prec.model(net)
    optimizer = torch.optim.SGD(
        net.parameters(),
        lr=p.lr,
        momentum=p.momentum,
        nesterov=p.nesterov and p.momentum > 0,
        weight_decay=p.weight_decay,
        **fused_options(device),
    )
    per_rank = len(train_data) // ctx.world_size
    steps_per_epoch = max(per_rank // p.batch_size, 1)
    if p.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, p.max_steps_per_epoch)
    if per_rank < p.batch_size:
        raise ConfigError(
            f"pretrain.batch_size={p.batch_size} exceeds the {per_rank} training images per "
            "process; lower the batch size"
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch)
    )
    scaler = prec.grad_scaler()
    gen = make_generator(rt.seed, data_device)
    start_epoch, best, images = 0, -1.0, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume and last_path.is_file():
        state = read_checkpoint(last_path)
        if state["model"] != cfg.model.backbone or state["stage"] != "pretrain":
            raise ConfigError(f"{last_path}: not a pre-training checkpoint of this recipe")
        backbone.load_state_dict(state["state_dict"])
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"]["generator"])
        start_epoch, best = int(state["epoch"]) + 1, float(state["best"])
        images = int(state.get("images", 0))
        log.info("resuming pre-training at epoch %d", start_epoch)
    model: nn.Module = dist_util.wrap(net, ctx)
    if rt.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    augment = make_augment(p.crop_scale, p.augment, p.flip, p.jitter)
    val_sampler = (
        EpisodeSampler.for_split(val_split, p.val_ways, p.val_shots, p.val_queries, rt.seed)
        if val_split is not None
        else None
    )

    def train_step(
        m: nn.Module, opt: torch.optim.Optimizer, idx: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One SGD step on the images `idx` of the split, augmented with draws from `g`;
        (logits (B, classes), labels (B,), loss)."""
        aug = augment is not None
        x = train_data.augment_batch(idx, g, augment) if aug else train_data.eval_batch(idx)
        x = prec.images(x.to(device, non_blocking=True))
        y = train_data.labels[idx.to(train_data.device)].to(device, non_blocking=True)
        with prec.autocast():
            logits = m(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=p.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return logits, y, loss

    plan = None
    if clock.enabled and ctx.enabled:
        raise ConfigError("a time budget under torchrun is not supported; set epochs")
    if clock.enabled and start_epoch > 0:
        cfg, plan = budget_mod.resumed_plan(clock, cfg, out)
        p = cfg.pretrain
        steps_per_epoch = min(steps_per_epoch, p.max_steps_per_epoch or steps_per_epoch)
    elif clock.enabled:
        val_s = 0.0
        if val_data is not None and val_sampler is not None:
            val_s = budget_mod.validation_seconds(
                backbone, val_data, device, prec.autocast,
                lambda f, k: centroid_accuracy(f, val_split.labels, val_sampler, k),
                p.val_episodes,
            )  # fmt: skip
        probe_idx = torch.arange(p.batch_size, device=data_device)
        probe_gen = make_generator(rt.seed + 1, data_device)
        probe: dict[int, nn.Module] = {}  # the probe's copy, compiled once like `model`

        def probe_step(m: nn.Module, o: torch.optim.Optimizer) -> None:
            fn = probe.setdefault(id(m), torch.compile(m) if rt.compile else m)  # type: ignore[arg-type]
            train_step(fn, o, probe_idx, probe_gen)

        cfg, steps_per_epoch, plan = budget_mod.plan_pretrain(
            clock, cfg, out, net, probe_step, val_s, steps_per_epoch
        )
        p = cfg.pretrain  # the scheduler's lambda reads the planned cfg and steps_per_epoch
    base = {
        "model": cfg.model.backbone,
        "model_args": dict(getattr(backbone, "model_args", cfg.model.args)),
        "stage": "pretrain",
        "preprocess": preprocess.to_dict(),
        "config": config_to_dict(cfg),
        "deploy": deploy_section(HeadRecipe(), {"kind": "centroid"}),
        "train_split": split_entry(train_split),
    }
    epoch = start_epoch - 1  # the last epoch run, for the budget record
    eval_images = 0
    pending: list[tuple[Path, dict[str, Any]]] = []  # runtime.save = "end": written at the end
    with progress_bar(bars) as progress:
        for epoch in range(start_epoch, p.epochs):
            net.train()
            t0 = time.perf_counter()
            task = progress.add_task(
                f"pretrain {epoch + 1}/{p.epochs}", total=steps_per_epoch, info=""
            )
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            order = dist_util.shard_order(len(train_data), gen, ctx)
            for step in range(steps_per_epoch):
                if budget_mod.stop_now(plan):
                    break
                idx = order[step * p.batch_size : (step + 1) * p.batch_size]
                logits, y, loss = train_step(model, optimizer, idx, gen)
                scheduler.step()
                n = int(y.shape[0])
                loss_sum += loss.detach() * n
                correct += (logits.detach().argmax(1) == y).sum()
                seen += n
                info = None
                if bars and (step + 1) % LOG_EVERY == 0:  # reading the sums waits for the GPU
                    rate = seen * ctx.world_size / max(time.perf_counter() - t0, 1e-9)
                    info = (
                        f"loss {float(loss_sum) / seen:.3f} acc {100 * int(correct) / seen:.1f}% "
                        f"{rate:.0f} img/s"
                    )
                progress.update(task, advance=1, **({"info": info} if info else {}))
            progress.remove_task(task)
            images += seen * ctx.world_size
            train_loss, train_correct = float(loss_sum), int(correct)  # one wait per epoch
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "stage": "pretrain",
                "epoch": epoch,
                "loss": train_loss / max(seen, 1),
                "train_acc": 100.0 * train_correct / max(seen, 1),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "images_per_s": seen * ctx.world_size / max(seconds, 1e-9),
            }
            if not ctx.is_main:
                continue
            last_epoch = epoch + 1 == p.epochs or budget_mod.stopped(plan)
            validate = val_sampler is not None and ((epoch + 1) % p.val_every == 0 or last_epoch)
            improved = False
            if validate:
                assert val_data is not None and val_split is not None and val_sampler is not None
                with prec.autocast():  # validation in the training precision; meta-test FP32
                    feats = extract_features(
                        backbone, val_data.eval_batch, len(val_data), 256, device
                    )
                eval_images += len(val_data)
                acc, ci = centroid_accuracy(feats, val_split.labels, val_sampler, p.val_episodes)
                row |= {"val_acc": acc, "val_ci95": ci}
                improved = acc > best
                best = max(best, acc)
            elif val_sampler is None:
                improved = True
            assert run is not None
            run.log_metrics(**row)
            log.info(
                "pretrain epoch %d: loss %.3f train %.1f%%%s",
                epoch,
                row["loss"],
                row["train_acc"],
                f" val {row['val_acc']:.2f}%" if "val_acc" in row else "",
            )
            metrics = {k: v for k, v in row.items() if isinstance(v, int | float)}
            ckpt = base | {
                "state_dict": backbone_state(backbone),
                "metrics": metrics,
                "epoch": epoch,
            }
            if improved:
                pending = [(best_path, ckpt)]
            pending.append(
                (
                    last_path,
                    ckpt
                    | {
                        "classifier": backbone_state(classifier),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": {"generator": gen.get_state()},
                        "best": best,
                        "images": images,
                    },
                )
            )
            if rt.save == "epoch" or last_epoch:
                for path, state in pending:
                    save_checkpoint(path, state)
                pending = []
            else:
                pending = pending[:-1]  # keep the best epoch's checkpoint, not this last.pt
            if budget_mod.stopped(plan):
                break
    if plan is not None:
        plan.finish(epochs_run=epoch + 1 - start_epoch, best_val=best if best >= 0 else None)
    dist_util.barrier(ctx)
    return {
        "checkpoint": str(best_path),
        "last": str(last_path),
        "images": images,
        "work": {
            "train_images": images,
            "eval_images": eval_images,
            "classes": train_split.num_classes,
        },
        "best_val": best if best >= 0 else None,
        "rank": ctx.rank,
        "param_checksum": dist_util.param_checksum(backbone),
    }
