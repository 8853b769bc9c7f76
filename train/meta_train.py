"""Phase 2 driver: SS meta-transfer with the hard-task (HT) meta-batch.

Loads a pre-training checkpoint, converts the backbone to scale-and-shift convs
(`meta.ss_shortcut`, BN `meta.bn_mode`), builds a `MetaTransferLearner` and trains SS and the
FC initialisation with Adam (`meta.ss_lr`, `meta.fc_lr`) on meta-batches of `meta.meta_batch`
N-way K-shot tasks of the train split. With `meta.hard_tasks`, after each meta-batch the
failure classes of its tasks make K' = hard_tasks.count hard tasks (fresh images if asked) that
take one more meta-step (`mtl_edge.train.hard_tasks.HardTaskMiner`); how often they are drawn
and how they score is logged every epoch. Every `epoch_length` meta-batches is an epoch: the
learning rates decay by `lr_gamma` every `lr_step` epochs, the learner is scored on fixed
validation episodes (validation classes only; the MTL head on frozen features, as at
meta-test) and the best epoch is RUN/best.pt; RUN/last.pt resumes (`runtime.save = "end"`:
both written once, when the stage ends); `meta.snapshots` keeps evenly spaced epochs as
RUN/snapshot-<epoch>.pt for a later choice by validation. With `meta.also_without_ht` a second
learner without HT is trained from the same checkpoint into RUN/without_ht/.

The loop does not wait for the GPU: the meta-steps' losses and accuracies are summed on the
device and read once per epoch. HT is the exception the algorithm makes: the hard tasks of a
meta-batch depend on its per-class query accuracies, so those come to the host once per
meta-batch (a small copy that overlaps the meta-step's backward pass, `MetaStepStats`); the
hard tasks' own results are recorded one meta-batch later, when the next copy has landed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError
from mtl_edge.fewshot.evaluate import evaluate_episodes
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.fewshot.heads import feature_head
from mtl_edge.preprocess import Preprocess
from mtl_edge.settings import config_to_dict
from mtl_edge.train import budget as budget_mod
from mtl_edge.train.checkpoint import (
    CheckpointError,
    meta_head_recipe,
    read_checkpoint,
    save_checkpoint,
    split_entry,
)
from mtl_edge.train.config import Recipe, as_recipe
from mtl_edge.train.gpu_data import DeviceDataset, make_generator
from mtl_edge.train.hard_tasks import HardTaskMiner, HardTaskStats
from mtl_edge.train.meta_transfer import (
    MetaStepStats,
    MetaTransferLearner,
    TaskBuilder,
    learner_from_parts,
)
from mtl_edge.train.metatest import extract_features
from mtl_edge.train.precision import configure_device, resolve_precision
from mtl_edge.train.runs import Run, seed_everything
from mtl_edge.train.torchdata import (
    describe,
    episode_loader,
    load_split,
    make_augment,
    open_recipe_split,
    open_train_split,
    progress_bar,
    resolve_device,
    show_progress,
)

log = logging.getLogger(__name__)

WITHOUT_HT = "without_ht"


def init_learner(cfg: Recipe, init: str | Path) -> tuple[MetaTransferLearner, Preprocess]:
    """The learner from a pre-training (or meta) checkpoint, and the checkpoint's preprocessing.

    Raises:
        CheckpointError: not a checkpoint, or one of another backbone than the recipe's.
    """
    ckpt = read_checkpoint(init)
    if ckpt["model"] != cfg.model.backbone:
        raise CheckpointError(
            f"{init}: a {ckpt['model']!r} checkpoint, but the recipe's backbone is "
            f"{cfg.model.backbone!r}; pass a checkpoint of the same architecture"
        )
    args = dict(ckpt["model_args"]) | {"ss_shortcut": cfg.meta.ss_shortcut}
    try:
        learner = learner_from_parts(
            str(ckpt["model"]),
            args,
            ckpt["state_dict"],
            ckpt["deploy"] if ckpt["stage"] == "meta" else None,
            cfg.meta,
            ways=cfg.meta.ways,
        )
    except ConfigError as e:
        raise CheckpointError(f"{init}: {e}") from None
    return learner, Preprocess.from_dict(dict(ckpt["preprocess"]))


def deploy_heads(learner: MetaTransferLearner, head: HeadRecipe) -> dict[str, Any]:
    """{"mtl": the feature head of recipe `head` from the learner's current FC init}."""
    meta_init = (
        learner.fc_weight.detach().cpu().numpy(),
        learner.fc_bias.detach().cpu().numpy(),
    )
    return {"mtl": feature_head("mtl", head, meta_init)}


def validate(
    learner: MetaTransferLearner,
    data: DeviceDataset,
    split: ImageSplit,
    sampler: EpisodeSampler,
    episodes: int,
    device: torch.device,
    head: HeadRecipe,
) -> tuple[float, float]:
    """Mean and 95% interval (percent) of the deploy head `head` (from the learner's
    meta-learned init, as meta-test runs it) over the sampler's first `episodes` episodes, on
    features of the frozen SS encoder."""
    with learner.autocast():  # the training precision; the meta-test runs in FP32
        feats = extract_features(learner.encoder, data.eval_batch, len(data), 256, device)
    heads = deploy_heads(learner, head)
    res = evaluate_episodes(feats, split.labels, sampler.episodes(episodes), heads)
    return res["mtl"].mean, res["mtl"].ci95


def meta_train(
    config: Recipe | Mapping[str, Any],
    out: str | Path,
    init: str | Path | None = None,
    resume: bool = False,
    source: str = "recipe",
    time_budget: str | None = None,
) -> dict[str, Any]:
    """Run phase 2 into the run folder `out`.

    Args:
        init: the pre-training checkpoint (default: meta.pretrained of the recipe).
        time_budget: this stage's wall-time budget ("30m"; else the recipe's share of
            runtime.time_budget, if any), shared equally by the HT and no-HT learners: the
            meta-batches per epoch are planned (`mtl_edge.train.budget`), see RUN/budget.json.

    Returns:
        {"checkpoint": best.pt, "last": last.pt, "images": task images processed, "work":
         {"tasks", "support_images", "query_images", "eval_images"} (`mtl_edge.train.flops`),
         "snapshots": {"epoch<e>": path}, "best_val": percent, "hard_tasks": HT statistics,
         "checkpoints": {"without_ht": ...} when `meta.also_without_ht`}.
    """
    cfg = as_recipe(config, source)
    clock = budget_mod.StageClock.start(cfg, "meta", time_budget)
    init = init or cfg.meta.pretrained
    if not init:
        raise ConfigError(
            "meta.pretrained is empty: pass the pre-training checkpoint, e.g. --set "
            "meta.pretrained=RUN/best.pt"
        )
    twin = cfg.meta.also_without_ht and cfg.meta.hard_tasks
    result = _train_one(
        cfg, Path(out), Path(init), cfg.meta.hard_tasks, resume, clock.part(2 if twin else 1)
    )
    if twin:
        other = _train_one(cfg, Path(out) / WITHOUT_HT, Path(init), False, resume, clock.part(1))
        result["checkpoints"] = {WITHOUT_HT: other["checkpoint"]}
        result["images"] += other["images"]
        result["work"] = {k: v + other["work"][k] for k, v in result["work"].items()}
    return result


def _train_one(
    cfg: Recipe,
    out: Path,
    init: Path,
    use_ht: bool,
    resume: bool,
    clock: budget_mod.StageClock,
) -> dict[str, Any]:
    m, rt = cfg.meta, cfg.runtime
    device = resolve_device(rt)
    if rt.threads:
        torch.set_num_threads(rt.threads)
    seed_everything(rt.seed)
    learner, preprocess = init_learner(cfg, init)
    deploy_head = meta_head_recipe(learner.settings, cfg.head)
    learner.to(device)
    configure_device(device)
    prec = resolve_precision(rt.amp, rt.channels_last, device)
    learner.autocast = prec.autocast  # the encoder's forward passes; the FC inner loop is FP32
    learner.compile = rt.compile
    prec.model(learner.encoder)
    run = Run.open(out, cfg, rt.seed, resume, "meta" + ("" if use_ht else " (no HT)"))
    train_split = open_train_split(cfg.data, preprocess.color_mode)
    train_split.require(m.ways, m.shots + m.queries)
    val_shots = m.val_shots or m.shots
    val_split = None
    if m.val_episodes > 0:
        val_split = open_recipe_split(cfg.data, cfg.data.val_split, preprocess.color_mode)
        val_split.require(m.ways, val_shots + m.queries)
    bars = show_progress(rt)
    train_data = load_split(train_split, preprocess, device, bars)
    train_data.channels_last = prec.channels_last
    val_data = load_split(val_split, preprocess, device, bars) if val_split else None
    run.record_split("train", train_split.name, train_split.fingerprint(), len(train_split))
    if val_split is not None:
        run.record_split("val", val_split.name, val_split.fingerprint(), len(val_split))
    log.info("meta-training (%s) on %s", "HT" if use_ht else "no HT", describe(train_split))
    plan = None
    if clock.enabled and resume and (out / "last.pt").is_file():
        cfg, plan = budget_mod.resumed_plan(clock, cfg, out)
    elif clock.enabled:
        cfg, plan = _plan(
            cfg,
            clock,
            out,
            learner,
            deploy_head,
            train_split,
            train_data,
            val_data,
            val_split,
            use_ht,
        )
    m = cfg.meta

    optimizer = learner.make_optimizer(m.ss_lr, m.fc_lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=m.lr_step, gamma=m.lr_gamma)
    gen = make_generator(rt.seed, device)
    build = TaskBuilder(
        episode_loader(train_data, device, gen, make_augment((0.25, 1.0), m.augment)), device
    )
    sampler = EpisodeSampler.for_split(train_split, m.ways, m.shots, m.queries, rt.seed)
    ht_cfg = cfg.hard_tasks
    miner = HardTaskMiner(sampler, ht_cfg) if use_ht else None
    val_sampler = (
        EpisodeSampler.for_split(val_split, m.ways, val_shots, m.queries, rt.seed)
        if val_split is not None
        else None
    )
    epochs = math.ceil(m.iterations / m.epoch_length)
    start_epoch, best, images = 0, -1.0, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume and last_path.is_file():
        state = read_checkpoint(last_path)
        learner.encoder.load_state_dict(state["state_dict"])
        with torch.no_grad():
            learner.fc_weight.copy_(state["deploy"]["fc_init"]["weight"])
            learner.fc_bias.copy_(state["deploy"]["fc_init"]["bias"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"]["generator"])
        start_epoch, best = int(state["epoch"]) + 1, float(state["best"])
        images = int(state.get("images", 0))
        if miner is not None and "hard_task_stats" in state:
            miner.stats = HardTaskStats(**state["hard_task_stats"])
        log.info("resuming meta-training at epoch %d", start_epoch)
    n_support, n_query = m.ways * m.shots, m.ways * m.queries
    work = {"tasks": 0, "support_images": 0, "query_images": 0, "eval_images": 0}
    snapshot_epochs = _snapshot_epochs(m.snapshots, epochs)
    saver = _Saver(rt.save == "epoch")
    epoch = start_epoch - 1  # the last epoch run, for the budget record
    with progress_bar(bars) as progress:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            n_batches = min(m.epoch_length, m.iterations - epoch * m.epoch_length)
            task = progress.add_task(f"meta {epoch + 1}/{epochs}", total=n_batches, info="")
            sums = torch.zeros(4, device=device)  # loss, accuracy, hard loss, hard accuracy
            counts = [0, 0, 0]  # ordinary tasks, hard tasks, hard meta-steps this epoch
            hard_pending: list[MetaStepStats] = []
            for b in range(n_batches):
                if budget_mod.stop_now(plan):
                    break
                first = (epoch * m.epoch_length + b) * m.meta_batch
                tasks = [build(sampler.episode(first + j)) for j in range(m.meta_batch)]
                stats = learner.meta_step(tasks, optimizer)
                sums[:2] += torch.stack([stats.losses.sum(), stats.accuracies.sum()])
                counts[0] += len(tasks)
                if miner is not None:
                    for done in hard_pending:  # landed while this meta-batch ran
                        miner.record(done.tasks)
                    hard_pending = []
                    hard = miner.after_batch(tasks, stats.tasks, epoch, b)
                    if hard:
                        hard_tasks = [build(e, is_hard=True) for e in hard]
                        hard_stats = learner.meta_step(hard_tasks, optimizer)
                        sums[2:] += torch.stack(
                            [hard_stats.losses.sum(), hard_stats.accuracies.sum()]
                        )
                        counts[1] += len(hard_tasks)
                        counts[2] += 1
                        hard_pending.append(hard_stats)
                progress.update(task, advance=1)
            for done in hard_pending:
                assert miner is not None
                miner.record(done.tasks)
            progress.remove_task(task)
            scheduler.step()
            tasks_run = counts[0] + counts[1]
            images += (n_support + n_query) * tasks_run
            work["tasks"] += tasks_run
            work["support_images"] += n_support * tasks_run
            work["query_images"] += n_query * tasks_run
            loss, acc, hard_loss, hard_acc = sums.tolist()  # one wait per epoch
            row: dict[str, Any] = {
                "stage": "meta",
                "hard_tasks": use_ht,
                "epoch": epoch,
                "loss": loss / max(counts[0], 1),
                "train_acc": 100.0 * acc / max(counts[0], 1),
                "hard_acc": 100.0 * hard_acc / counts[1] if counts[1] else None,
                "hard_loss": hard_loss / counts[1] if counts[1] else None,
                "hard_batches": counts[2],
                "ss_lr": optimizer.param_groups[0]["lr"],
                "fc_lr": optimizer.param_groups[1]["lr"],
                "seconds": time.perf_counter() - t0,
            }
            if miner is not None:
                row["ht_stats"] = miner.stats.to_dict()
            improved = True
            if val_sampler is not None:
                assert val_data is not None and val_split is not None
                acc, ci = validate(
                    learner, val_data, val_split, val_sampler, m.val_episodes, device, deploy_head
                )
                work["eval_images"] += len(val_data)
                row |= {"val_acc": acc, "val_ci95": ci}
                improved = acc > best
                best = max(best, acc)
            run.log_metrics(**row)
            log.info(
                "meta epoch %d%s: loss %.3f train %.1f%%%s",
                epoch,
                "" if use_ht else " (no HT)",
                row["loss"],
                row["train_acc"],
                f" val {row['val_acc']:.2f}%" if "val_acc" in row else "",
            )
            parts = learner.checkpoint_parts(deploy_head)
            parts["model_args"]["ss_shortcut"] = m.ss_shortcut
            metrics = {k: v for k, v in row.items() if isinstance(v, int | float) and v is not None}
            ckpt = parts | {
                "stage": "meta",
                "preprocess": preprocess.to_dict(),
                "config": config_to_dict(cfg),
                "metrics": metrics,
                "epoch": epoch,
                "init": str(init),
                "train_split": split_entry(train_split),
            }
            if improved:
                saver.keep(best_path, ckpt)
            if epoch + 1 in snapshot_epochs:
                saver.keep(out / f"snapshot-{epoch + 1}.pt", ckpt)
            extra: dict[str, Any] = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"generator": gen.get_state()},
                "best": best,
                "images": images,
            }
            if miner is not None:
                extra["hard_task_stats"] = {
                    k: v for k, v in miner.stats.to_dict().items() if not k.endswith("accuracy")
                }
            last = epoch + 1 == epochs or budget_mod.stopped(plan)
            if last and epoch + 1 not in snapshot_epochs and m.snapshots:
                saver.keep(out / f"snapshot-{epoch + 1}.pt", ckpt)  # stopped early: the last
            saver.keep(last_path, ckpt | extra)
            saver.flush(final=last)
            if last:
                break
    if plan is not None:
        plan.finish(epochs_run=epoch + 1 - start_epoch, best_val=best if best >= 0 else None)
    return {
        "checkpoint": str(best_path),
        "last": str(last_path),
        "images": images,
        "work": work,
        "snapshots": {
            p.stem.replace("snapshot-", "epoch"): str(p) for p in sorted(out.glob("snapshot-*.pt"))
        },  # fmt: skip
        "best_val": best if best >= 0 else None,
        "hard_tasks": miner.stats.to_dict() if miner is not None else None,
    }


def _snapshot_epochs(count: int, epochs: int) -> set[int]:
    """1-based epochs at which `meta.snapshots` keeps the weights: evenly spaced, the last
    included."""
    if count <= 0:
        return set()
    return {max(1, round(epochs * k / count)) for k in range(1, count + 1)}


class _Saver:
    """Checkpoint writes of the meta loop: at once (`runtime.save = "epoch"`) or kept in
    memory until the stage ends (`"end"`; the best epoch replaces an earlier best)."""

    def __init__(self, every_epoch: bool) -> None:
        self.every_epoch = every_epoch
        self.pending: dict[Path, dict[str, Any]] = {}

    def keep(self, path: Path, ckpt: dict[str, Any]) -> None:
        self.pending[path] = ckpt

    def flush(self, final: bool) -> None:
        if self.every_epoch or final:
            for path, ckpt in self.pending.items():
                save_checkpoint(path, ckpt)
            self.pending = {}
        else:  # last.pt of an epoch that is not the last is never written
            self.pending = {p: c for p, c in self.pending.items() if p.name != "last.pt"}


def _plan(
    cfg: Recipe,
    clock: budget_mod.StageClock,
    out: Path,
    learner: MetaTransferLearner,
    head: HeadRecipe,
    train_split: ImageSplit,
    train_data: DeviceDataset,
    val_data: DeviceDataset | None,
    val_split: ImageSplit | None,
    use_ht: bool,
) -> tuple[Recipe, budget_mod.Plan]:
    """The time-budget plan of one learner: meta-batches timed on a copy of the learner (with
    a generator of its own, so the run's draws do not change), validation estimated."""
    m, device = cfg.meta, next(learner.parameters()).device
    gen = make_generator(cfg.runtime.seed + 1, train_data.device)
    build = TaskBuilder(
        episode_loader(train_data, device, gen, make_augment((0.25, 1.0), m.augment)), device
    )
    sampler = EpisodeSampler.for_split(
        train_split, m.ways, m.shots, m.queries, cfg.runtime.seed + 1
    )

    def probe(lrn: MetaTransferLearner, opt: torch.optim.Optimizer) -> None:
        lrn.meta_step([build(sampler.episode(j)) for j in range(m.meta_batch)], opt)

    val_s = 0.0
    if val_data is not None and val_split is not None:
        val_sampler = EpisodeSampler.for_split(
            val_split, m.ways, m.val_shots or m.shots, m.queries, cfg.runtime.seed
        )
        heads = deploy_heads(learner, head)
        val_s = budget_mod.validation_seconds(
            learner.encoder,
            val_data,
            device,
            learner.autocast,
            lambda f, k: evaluate_episodes(f, val_split.labels, val_sampler.episodes(k), heads),
            m.val_episodes,
        )
    return budget_mod.plan_meta(clock, cfg, out, learner, probe, val_s, use_ht)
