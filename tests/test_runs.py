"""Run folders: resolved config, commit, seed, splits, environment, metrics lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtl_edge.errors import ConfigError
from mtl_edge.settings import read_toml
from mtl_edge.train.config import load_recipe
from mtl_edge.train.runs import Run


def test_run_folder_contents(tmp_path: Path) -> None:
    cfg = load_recipe(None, ["pretrain.epochs=3"])
    run = Run.open(tmp_path / "run", cfg, seed=7, command="pretrain")
    run.record_split("train", "synthetic/train", "abc123", 10)
    run.log_metrics(epoch=0, loss=1.5)
    run.log_metrics(epoch=1, loss=1.0)
    assert read_toml(run.dir / "config.toml")["pretrain"]["epochs"] == 3
    info = json.loads((run.dir / "run.json").read_text())
    assert info["seed"] == 7 and info["commit"] and "python" in info["environment"]
    assert info["splits"]["train"]["fingerprint"] == "abc123"
    assert [m["loss"] for m in run.read_metrics()] == [1.5, 1.0]


def test_resume_keeps_metrics_and_refuses_changed_recipe(tmp_path: Path) -> None:
    cfg = load_recipe(None, ["pretrain.epochs=3"])
    Run.open(tmp_path, cfg, seed=0).log_metrics(epoch=0)
    again = Run.open(tmp_path, cfg, seed=0, resume=True)
    assert len(again.read_metrics()) == 1
    changed = load_recipe(None, ["pretrain.epochs=4"])
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        Run.open(tmp_path, changed, seed=0, resume=True)
    fresh = Run.open(tmp_path, changed, seed=0)
    assert fresh.read_metrics() == []
