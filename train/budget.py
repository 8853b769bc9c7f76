"""Time-budgeted schedules: a stage measures its own speed and sets its length to end in time.

A budget comes from `--time-budget 90m` of a stage command (that stage's own budget) or from
the recipe's `runtime.time_budget` (the whole recipe; pre-training gets
`runtime.pretrain_share`, meta-transfer the rest). The clock starts when the stage starts, so
decoding the data, the probe and every validation and checkpoint count.

After the data is loaded, the stage times a few training steps on a throw-away copy of its
model (`probe`), one feature pass over part of the validation split and one checkpoint, and
`plan_length` picks the number of epochs E and the steps per epoch S (the largest E * S that
fits the remaining time, E at most the recipe's epochs, S at most a whole epoch):

    E * S * step_s + E * checkpoint_s + validations(E) * validation_s <= remaining - margin

Pre-training then runs E epochs of S steps (S below a full epoch: each epoch sees a random part
of the split), its cosine schedule laid out over those E epochs; meta-transfer keeps the recipe's
epoch count where it can (epoch_length becomes S), so its step decay keeps its shape. A guard
checked at every step (`Plan.must_stop`, or `stop_now` with the graceful stop of
`mtl_edge.train.deadline`) ends the stage early, leaving time for the last validation and
checkpoint, if the machine slows down after the plan. With `runtime.save = "end"` no checkpoint
is written per epoch: the one final save goes into the reserve instead. Timings wait for the
GPU (`torch.cuda.synchronize`), whose work is otherwise queued behind the host's clock. The
decision (measured speeds, plan, budget, end time) is logged and written to RUN/budget.json.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtl_edge.atomicio import atomic_write_json
from mtl_edge.errors import ConfigError
from mtl_edge.train import deadline
from mtl_edge.train.config import Recipe

log = logging.getLogger(__name__)

BUDGET_FILE = "budget.json"
SCHEMA, VERSION = "mtl-edge.budget", 1
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str, option: str = "--time-budget") -> float:
    """Seconds of "90m", "1h30m", "1.5h", "45s" or a plain number of seconds.

    Raises:
        ConfigError: naming `option`, for an unreadable or non-positive duration.
    """
    t = text.strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", t)
    if not t or "".join(n + u for n, u in parts) != t or (len(parts) > 1 and not parts[-1][1]):
        raise ConfigError(f"{option} {text!r}: write a duration such as 90m, 1h30m or 5400s")
    seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{option} {text!r}: the budget must be positive")
    return seconds


@dataclass
class StageClock:
    """The wall-clock budget of one stage.

    Attributes:
        stage: "pretrain" or "meta".
        budget_s: seconds for the stage, None = no budget.
        source: where the budget came from (for the log and budget.json).
        t0: `time.perf_counter()` when the stage started.
    """

    stage: str
    budget_s: float | None
    source: str = ""
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, cfg: Recipe, stage: str, cli_budget: str | None = None) -> StageClock:
        """The clock of `stage`: `--time-budget` when given, else its share of
        runtime.time_budget, else no budget."""
        if cli_budget:
            return cls(stage, parse_duration(cli_budget), f"--time-budget {cli_budget}")
        rt = cfg.runtime
        if not rt.time_budget:
            return cls(stage, None)
        total = parse_duration(rt.time_budget, "runtime.time_budget")
        share = rt.pretrain_share if stage == "pretrain" else 1.0 - rt.pretrain_share
        return cls(stage, total * share, f"runtime.time_budget {rt.time_budget} x {share:.2f}")

    @property
    def enabled(self) -> bool:
        return self.budget_s is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        assert self.budget_s is not None
        return self.budget_s - self.elapsed()

    def part(self, n: int) -> StageClock:
        """A clock for the next of `n` equal parts of what remains (from now)."""
        if self.budget_s is None:
            return StageClock(self.stage, None)
        return StageClock(self.stage, self.remaining() / n, f"{self.source}, 1/{n} of the rest")


def plan_length(
    available_s: float,
    step_s: float,
    checkpoint_s: float,
    validation_s: float,
    val_every: int,
    max_epochs: int,
    max_steps_per_epoch: int,
    prefer: str = "steps",
) -> tuple[int, int]:
    """(epochs E, steps per epoch S) that fit `available_s`, E <= max_epochs and
    S <= max_steps_per_epoch.

    Validation runs every `val_every` epochs and after the last one; each epoch saves a
    checkpoint. `prefer="steps"`: the most steps E * S (pre-training: epochs only pace the
    cosine and the validations). `prefer="epochs"`: the most epochs whose validation and
    checkpoint take at most 10 % of the epoch's training time (meta-transfer: the epochs carry
    the step decay), else the most steps. At least (1, 1) even when nothing fits (the guard
    then ends the stage early).
    """
    fits = []
    for epochs in range(1, max_epochs + 1):
        validations = epochs // val_every + (1 if epochs % val_every else 0)
        left = available_s - epochs * checkpoint_s - validations * validation_s
        steps = min(max_steps_per_epoch, math.floor(left / (epochs * step_s)))
        if steps >= 1:
            fits.append((epochs, steps))
    if not fits:
        return 1, 1
    if prefer == "epochs":
        overhead = checkpoint_s + validation_s / val_every
        light = [(e, s) for e, s in fits if overhead <= 0.1 * s * step_s]
        if light:
            return max(light)
    return max(fits, key=lambda es: (es[0] * es[1], -es[0]))


@dataclass
class Plan:
    """A stage's budget decision, and the guard that enforces it.

    Attributes:
        clock: the stage's clock.
        path: RUN/budget.json.
        record: what budget.json holds (measurements, plan, outcome).
        reserve_s: time kept for the last validation and checkpoint.
    """

    clock: StageClock
    path: Path
    record: dict[str, Any]
    reserve_s: float
    stopped: bool = False

    def must_stop(self) -> bool:
        """True (from then on) once the remaining time only covers the final validation and
        checkpoint; the stage then ends after the current epoch's checkpoint."""
        if not self.stopped and self.clock.remaining() < self.reserve_s:
            self.stopped = True
            log.warning(
                "%s: time budget nearly spent (%.0f s left); ending after this epoch",
                self.clock.stage,
                self.clock.remaining(),
            )
        return self.stopped

    def finish(self, **outcome: Any) -> None:
        """Record the end (elapsed time, whether the guard stopped it) in budget.json."""
        elapsed = self.clock.elapsed()
        self.record["outcome"] = {
            "elapsed_s": elapsed,
            "within_budget": elapsed <= float(self.clock.budget_s or 0),
            "stopped_early": self.stopped,
            **outcome,
        }
        atomic_write_json(self.path, self.record)
        log.info("%s: %.0f s of a %.0f s budget", self.clock.stage, elapsed, self.clock.budget_s)


def stop_now(plan: Plan | None) -> bool:
    """Whether a training loop must end its epoch now: its plan's guard, or a graceful stop
    (`mtl_edge.train.deadline`)."""
    if plan is not None and plan.must_stop():
        return True
    return deadline.requested()


def stopped(plan: Plan | None) -> bool:
    """Whether the stage ends after this epoch (its guard fired or a stop was asked for)."""
    return (plan is not None and plan.stopped) or deadline.requested()


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` untimed ones (each call
    waits for the GPU work it queued)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def margin_s(budget_s: float) -> float:
    """Slack kept unplanned: 3 % of the budget + 5 s (noise of the measurements, the return)."""
    return 0.03 * budget_s + 5.0


def make_plan(
    clock: StageClock,
    run_dir: Path,
    measured: dict[str, float],
    val_every: int,
    max_epochs: int,
    max_steps_per_epoch: int,
    unit: str,
    prefer: str = "steps",
) -> tuple[int, int, Plan]:
    """Plan the stage from `measured` {"step_s", "checkpoint_s", "validation_s", ...} and
    write budget.json; returns (epochs, steps per epoch, the plan)."""
    assert clock.budget_s is not None
    available = clock.remaining() - margin_s(clock.budget_s)
    epochs, steps = plan_length(
        available,
        measured["step_s"],
        measured["checkpoint_s"],
        measured["validation_s"],
        val_every,
        max_epochs,
        max_steps_per_epoch,
        prefer,
    )
    record = {
        "schema": SCHEMA,
        "version": VERSION,
        "stage": clock.stage,
        "budget_s": clock.budget_s,
        "source": clock.source,
        "planned_at_s": clock.elapsed(),
        "measured": measured,
        "plan": {
            "epochs": epochs,
            f"{unit}_per_epoch": steps,
            f"total_{unit}": epochs * steps,
            "recipe_max_epochs": max_epochs,
            f"full_epoch_{unit}": max_steps_per_epoch,
            "expected_s": clock.elapsed()
            + epochs * (steps * measured["step_s"] + measured["checkpoint_s"])
            + (epochs // val_every + (1 if epochs % val_every else 0)) * measured["validation_s"],
        },
    }
    atomic_write_json(run_dir / BUDGET_FILE, record)
    log.info(
        "%s budget %.0f s (%s): %.3f s per %s, validation %.1f s, checkpoint %.1f s -> "
        "%d epochs x %d %s",
        clock.stage,
        clock.budget_s,
        clock.source,
        measured["step_s"],
        unit.removesuffix("es" if unit.endswith("ches") else "s").replace("_", "-"),
        measured["validation_s"],
        measured["checkpoint_s"],
        epochs,
        steps,
        unit.replace("_", "-"),
    )
    return epochs, steps, Plan(clock, run_dir / BUDGET_FILE, record, reserve_s(measured, clock))


def reserve_s(measured: dict[str, float], clock: StageClock) -> float:
    """Time the guard keeps for the last validation and the checkpoint writes."""
    saves = max(measured["checkpoint_s"], measured.get("final_save_s", 0.0))
    return measured["validation_s"] + saves + 0.01 * float(clock.budget_s)


def save_costs(cfg: Recipe, checkpoint_s: float) -> dict[str, float]:
    """{"checkpoint_s": per epoch, "final_save_s": once} of `runtime.save`."""
    if cfg.runtime.save == "end":
        return {"checkpoint_s": 0.0, "final_save_s": checkpoint_s}
    return {"checkpoint_s": checkpoint_s, "final_save_s": 0.0}


def checkpoint_seconds(run_dir: Path, state: dict[str, Any]) -> float:
    """Seconds to write `state` as a checkpoint would be (twice per epoch: best and last)."""
    import io

    import torch

    from mtl_edge.atomicio import atomic_write_bytes

    probe = run_dir / ".budget-probe.pt"
    t0 = time.perf_counter()
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(probe, buf.getvalue())
    seconds = time.perf_counter() - t0
    probe.unlink(missing_ok=True)
    return 2 * seconds


def scaled(value: int, epochs: int, recipe_epochs: int) -> int:
    """An epoch count of the recipe (lr step, HT start) scaled to `epochs` planned epochs."""
    return max(1, round(value * epochs / max(recipe_epochs, 1))) if value else 0


def plan_pretrain(
    clock: StageClock,
    cfg: Recipe,
    run_dir: Path,
    net: Any,
    train_step: Callable[[Any, Any], None],
    validation_s: float,
    steps_per_epoch: int,
) -> tuple[Recipe, int, Plan]:
    """Plan pre-training; returns the recipe with the planned epochs (and step schedule),
    the steps per epoch and the plan.

    Args:
        net: the network being trained (copied for the probe, left unchanged).
        train_step: `train_step(net_copy, optimizer_copy)` runs one real training step.
        validation_s: measured seconds of one validation (0 without validation).
        steps_per_epoch: the steps of a full epoch.
    """
    import torch

    p = cfg.pretrain
    probe = copy.deepcopy(net)
    opt = torch.optim.SGD(probe.parameters(), lr=1e-6, momentum=p.momentum)
    step_s = timed(lambda: train_step(probe, opt), repeats=5, warmup=2)
    state = {"state_dict": probe.state_dict(), "optimizer": opt.state_dict()}
    ckpt_s = checkpoint_seconds(run_dir, state)
    measured = {
        "step_s": step_s,
        "images_per_s": p.batch_size / step_s,
        **save_costs(cfg, ckpt_s),
        "validation_s": validation_s,
    }
    epochs, steps, plan = make_plan(
        clock, run_dir, measured, p.val_every, p.epochs, steps_per_epoch, "steps"
    )
    table = {
        "epochs": epochs,
        "max_steps_per_epoch": steps if steps < steps_per_epoch else p.max_steps_per_epoch,
        "step_size": scaled(p.step_size, epochs, p.epochs),
    }
    return _planned(plan, cfg, {"pretrain": table}), steps, plan


def plan_meta(
    clock: StageClock,
    cfg: Recipe,
    run_dir: Path,
    learner: Any,
    meta_step: Callable[[Any, Any], None],
    validation_s: float,
    use_ht: bool,
) -> tuple[Recipe, Plan]:
    """Plan meta-transfer; returns the recipe with the planned iterations, epoch_length,
    lr_step and hard_tasks.start_epoch, and the plan.

    Args:
        learner: the `MetaTransferLearner` (copied for the probe, left unchanged).
        meta_step: `meta_step(learner_copy, optimizer_copy)` runs one real meta-batch.
        validation_s: measured seconds of one validation.
        use_ht: hard tasks add `count / every_n_batches` tasks per meta-batch.
    """
    m, ht = cfg.meta, cfg.hard_tasks
    probe = copy.deepcopy(learner)
    opt = probe.make_optimizer(1e-9, 1e-9)
    batch_s = timed(lambda: meta_step(probe, opt), repeats=3, warmup=1)
    ckpt_s = checkpoint_seconds(run_dir, probe.checkpoint_parts() | {"opt": opt.state_dict()})
    ht_factor = 1.0 + (ht.count / (m.meta_batch * ht.every_n_batches) if use_ht else 0.0)
    measured = {
        "meta_batch_s": batch_s,
        "hard_task_factor": ht_factor,
        "step_s": batch_s * ht_factor,
        **save_costs(cfg, ckpt_s),
        "validation_s": validation_s,
    }
    recipe_epochs = math.ceil(m.iterations / m.epoch_length)
    epochs, length, plan = make_plan(
        clock, run_dir, measured, 1, recipe_epochs, m.epoch_length, "meta_batches", "epochs"
    )
    tables = {
        "meta": {
            "iterations": epochs * length,
            "epoch_length": length,
            "lr_step": scaled(m.lr_step, epochs, recipe_epochs),
        },
        "hard_tasks": {"start_epoch": scaled(ht.start_epoch, epochs, recipe_epochs)},
    }
    return _planned(plan, cfg, tables), plan


def validation_seconds(
    encoder: Any,
    data: Any,
    device: Any,
    autocast: Callable[[], Any],
    run_heads: Callable[[Any, int], Any],
    episodes: int,
) -> float:
    """Estimated seconds of one validation: features of 256 images of `data` (a
    `DeviceDataset`, under `autocast`) timed and scaled to the split, plus
    `run_heads(features, n)` on random features for up to 20 episodes, scaled to `episodes`."""
    import numpy as np

    from mtl_edge.train.metatest import extract_features

    n = min(len(data), 256)
    feats: list[Any] = []

    def extract() -> None:
        with autocast():
            feats.append(extract_features(encoder, data.eval_batch, n, device=device))

    feature_s = timed(extract, 1) * len(data) / n
    fake = np.random.default_rng(0).random((len(data), feats[0].shape[1]), dtype=np.float32)
    k = min(episodes, 20)
    head_s = timed(lambda: run_heads(fake, k), 1, warmup=0) * episodes / max(k, 1)
    return feature_s + head_s


def _planned(plan: Plan, cfg: Recipe, tables: dict[str, dict[str, Any]]) -> Recipe:
    """`cfg` with the planned values of `tables` ({"pretrain": {"epochs": 5}, ...}), which are
    also recorded in budget.json (a resumed run reads them back)."""
    plan.record["planned_config"] = tables
    atomic_write_json(plan.path, plan.record)
    return replace(cfg, **{t: replace(getattr(cfg, t), **v) for t, v in tables.items()})


def resumed_plan(clock: StageClock, cfg: Recipe, run_dir: Path) -> tuple[Recipe, Plan]:
    """The plan of a resumed run: the schedule that RUN/budget.json planned (it must not
    change half-way), guarded by the new process's clock.

    Raises:
        ConfigError: the run folder has no budget.json (it was started without a budget).
    """
    from mtl_edge.jsonfile import read_json_document

    path = run_dir / BUDGET_FILE
    record = read_json_document(
        path,
        ConfigError,
        what="time budget record",
        schema=SCHEMA,
        version=VERSION,
        missing="missing: the run started without a time budget; resume it without one",
        fix="resume without a time budget",
    )
    record["resumed"] = {"budget_s": clock.budget_s, "source": clock.source}
    plan = Plan(clock, path, record, reserve_s(record["measured"], clock))
    return _planned(plan, cfg, record["planned_config"]), plan
