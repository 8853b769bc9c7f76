"""Time-budgeted schedules: durations, the planning arithmetic, the guard, and tiny budgeted
runs of pre-training and meta-transfer (budget.json, plan consistent with the measured speed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tiny_recipe import tiny_recipe

from mtl_edge.errors import ConfigError
from mtl_edge.train import budget
from mtl_edge.train.budget import StageClock, parse_duration, plan_length
from mtl_edge.train.checkpoint import read_checkpoint
from mtl_edge.train.config import as_recipe
from mtl_edge.train.meta_train import meta_train
from mtl_edge.train.pretrain import pretrain


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90m", 5400), ("1h30m", 5400), ("1.5h", 5400), ("45s", 45), ("120", 120), ("2m30s", 150)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "90x", "0m", "1h30", "m"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--time-budget"):
        parse_duration(text)


def cost(epochs: int, steps: int, step_s: float, ckpt: float, val: float, every: int) -> float:
    validations = epochs // every + (1 if epochs % every else 0)
    return epochs * (steps * step_s + ckpt) + validations * val


@pytest.mark.parametrize(
    ("available", "step", "ckpt", "val", "every", "max_epochs", "full"),
    [(600, 1.0, 2, 30, 1, 100, 50), (3600, 0.4, 5, 60, 2, 40, 300), (100, 0.5, 1, 5, 1, 3, 1000)],
)
def test_the_plan_fits_and_is_the_longest(
    available: float, step: float, ckpt: float, val: float, every: int, max_epochs: int, full: int
) -> None:
    epochs, steps = plan_length(available, step, ckpt, val, every, max_epochs, full)
    assert 1 <= epochs <= max_epochs and 1 <= steps <= full
    assert cost(epochs, steps, step, ckpt, val, every) <= available
    for e in range(1, max_epochs + 1):  # no other epoch count fits more steps
        s = min(full, int((available - e * ckpt - (-(-e // every)) * val) // (e * step)))
        assert s < 1 or e * s <= epochs * steps


def test_prefer_epochs_keeps_the_epochs_while_validation_is_cheap() -> None:
    # 10 epochs of 100 steps fit, and validating costs 2 % of an epoch: keep them all
    assert plan_length(1100, 1.0, 0, 2, 1, 10, 100, prefer="epochs") == (10, 100)
    # validating (10 s) is dear next to short epochs: the most epochs of >= 100 s of training
    assert plan_length(500, 1.0, 0, 10, 1, 50, 100, prefer="epochs") == (4, 100)
    assert plan_length(500, 1.0, 0, 10, 1, 50, 100, prefer="steps") == (5, 90)


def test_nothing_fits_gives_one_step() -> None:
    assert plan_length(1.0, 5.0, 1, 1, 1, 10, 100) == (1, 1)


def test_the_guard_stops_when_only_the_reserve_is_left(tmp_path: Path) -> None:
    clock = StageClock("pretrain", 100.0, "test", t0=time.perf_counter() - 95.0)
    plan = budget.Plan(clock, tmp_path / "budget.json", {}, reserve_s=10.0)
    assert plan.must_stop() and plan.stopped
    fresh = budget.Plan(StageClock("pretrain", 100.0), tmp_path / "b.json", {}, reserve_s=10.0)
    assert not fresh.must_stop()


def test_stage_budgets_from_the_recipe_and_the_cli() -> None:
    cfg = as_recipe(tiny_recipe(runtime={"time_budget": "100m", "pretrain_share": 0.7}))
    assert StageClock.start(cfg, "pretrain").budget_s == pytest.approx(4200)
    assert StageClock.start(cfg, "meta").budget_s == pytest.approx(1800)
    assert StageClock.start(cfg, "meta", "10m").budget_s == 600
    assert not StageClock.start(as_recipe(tiny_recipe()), "pretrain").enabled
    with pytest.raises(ConfigError, match="pretrain_share"):
        as_recipe(tiny_recipe(runtime={"time_budget": "1h", "pretrain_share": 1.0}))


def recipe(**extra: Any) -> dict[str, Any]:
    return tiny_recipe(
        pretrain={"epochs": 10_000, "batch_size": 16, "val_episodes": 5, "val_queries": 5,
                  "val_every": 5},
        meta={"iterations": 100_000, "epoch_length": 50, "queries": 3, "inner_steps": 2,
              "test_steps": 3, "val_episodes": 3},
        **extra,
    )  # fmt: skip


def check_record(record: dict[str, Any], unit: str) -> None:
    """The plan is what the measured speed allows inside the budget, and the run ended in it
    (with slack: the guard leaves the last validation and checkpoint to finish)."""
    m, plan, out = record["measured"], record["plan"], record["outcome"]
    assert record["schema"] == "mtl-edge.budget"
    total = plan[f"total_{unit}"]
    assert total == plan["epochs"] * plan[f"{unit}_per_epoch"] >= 1
    assert total * m["step_s"] <= record["budget_s"]
    assert plan["expected_s"] <= record["budget_s"]
    assert out["elapsed_s"] <= 2.0 * record["budget_s"]
    assert out["epochs_run"] >= 1


def test_budgeted_pretrain_then_meta(tmp_path: Path) -> None:
    pre = pretrain(recipe(), tmp_path / "pre", time_budget="6s")
    record = json.loads((tmp_path / "pre" / "budget.json").read_text())
    check_record(record, "steps")
    assert record["plan"]["epochs"] < 10_000  # the budget, not the recipe, set the length
    planned = record["planned_config"]["pretrain"]["epochs"]
    ckpt = read_checkpoint(pre["last"])
    assert ckpt["config"]["pretrain"]["epochs"] == planned  # the schedule's length
    rows = (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == record["outcome"]["epochs_run"] <= planned
    meta_train(recipe(), tmp_path / "meta", init=pre["checkpoint"], time_budget="4s")
    record = json.loads((tmp_path / "meta" / "budget.json").read_text())
    check_record(record, "meta_batches")
    assert record["planned_config"]["meta"]["iterations"] < 100_000


def test_recipe_budget_and_resume_keep_the_plan(tmp_path: Path) -> None:
    cfg = recipe(runtime={"threads": 1, "time_budget": "10s", "pretrain_share": 0.5})
    pretrain(cfg, tmp_path / "pre")
    first = json.loads((tmp_path / "pre" / "budget.json").read_text())
    assert first["source"].startswith("runtime.time_budget 10s")
    again = pretrain(cfg, tmp_path / "pre", resume=True)
    second = json.loads((tmp_path / "pre" / "budget.json").read_text())
    assert second["planned_config"] == first["planned_config"] and "resumed" in second
    assert Path(again["checkpoint"]).is_file()


def test_cli_time_budget_option(tmp_path: Path) -> None:
    from mtl_edge.settings import to_toml

    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(recipe()))
    out = tmp_path / "run"
    args = ["train", "pretrain", "--recipe", str(path), "--out", str(out), "--time-budget", "3s"]
    res = subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "pretrain budget 3 s" in res.stderr
    assert json.loads((out / "budget.json").read_text())["source"] == "--time-budget 3s"
    bad = subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", *args[:-1], "soon"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "--time-budget 'soon'" in bad.stderr
