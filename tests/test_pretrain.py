"""Pre-training driver on tiny synthetic data: checkpoints, metrics, resume, schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_recipe import tiny_recipe

from mtl_edge.errors import ConfigError
from mtl_edge.settings import from_dict
from mtl_edge.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from mtl_edge.train.config import Recipe
from mtl_edge.train.pretrain import lr_factor, pretrain


def tiny(**pretrain: Any) -> dict[str, Any]:
    base = {"epochs": 2, "batch_size": 16, "lr": 0.05, "val_episodes": 5, "val_queries": 5}
    return tiny_recipe(pretrain=base | pretrain)


def test_pretrain_writes_run_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = pretrain(tiny(), out)
    assert Path(result["checkpoint"]).is_file() and Path(result["last"]).is_file()
    assert result["images"] == 2 * (72 // 16) * 16
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    assert all(0.0 <= m["val_acc"] <= 100.0 and math.isfinite(m["loss"]) for m in lines)
    best = read_checkpoint(result["checkpoint"])
    assert best["stage"] == "pretrain" and best["config"]["pretrain"]["epochs"] == 2
    assert best["metrics"]["val_acc"] == max(m["val_acc"] for m in lines)
    loaded = load_checkpoint(result["checkpoint"], expect_model="conv4")
    x = torch.zeros(2, 3, 16, 16)
    assert loaded.backbone.forward_features(x).shape == (2, loaded.backbone.feature_dim)
    run = json.loads((out / "run.json").read_text())
    assert set(run["splits"]) == {"train", "val"}
    # finished run: resuming trains nothing more and keeps the weights
    before = read_checkpoint(result["last"])["state_dict"]
    again = pretrain(tiny(), out, resume=True)
    after = read_checkpoint(again["last"])["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a run cut after epoch 0 continues with epoch 1 only
    cut = read_checkpoint(result["last"]) | {"epoch": 0}
    save_checkpoint(
        out / "last.pt", {k: v for k, v in cut.items() if k not in ("format", "version")}
    )
    pretrain(tiny(), out, resume=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 1]
    with pytest.raises(ConfigError, match="another recipe"):
        pretrain(tiny(epochs=3), out, resume=True)


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    result = pretrain(tiny(epochs=6, val_episodes=0, lr=0.1), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert read_checkpoint(result["checkpoint"])["epoch"] == 5  # no validation: last is best


def test_schedules() -> None:
    cfg = from_dict(Recipe, {"pretrain": {"epochs": 10, "schedule": "cosine"}})
    assert lr_factor(cfg, 0, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 10) == pytest.approx(0.5)
    step = from_dict(Recipe, {"pretrain": {"schedule": "step", "step_size": 3, "gamma": 0.1}})
    assert lr_factor(step, 29, 10) == pytest.approx(1.0)
    assert lr_factor(step, 30, 10) == pytest.approx(0.1)
    warm = from_dict(Recipe, {"pretrain": {"epochs": 10, "warmup_epochs": 1}})
    assert lr_factor(warm, 4, 10) == pytest.approx(0.5)


def test_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="schedule"):
        pretrain(tiny(schedule="linear"), tmp_path)
    with pytest.raises(ConfigError, match="batch_size"):
        pretrain(tiny(batch_size=1000), tmp_path / "b")
