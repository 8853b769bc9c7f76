"""`mtl-edge bench train`: FP32 vs bf16 vs bf16 + channels-last training steps in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_edge.bench.report import load_report
from mtl_edge.bench.train_speed import TrainSpeedConfig, run_train_speed
from mtl_edge.errors import ConfigError

TINY = ("--backbone", "conv4", "--backbone-arg", "width=4", "--image-size", "16")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", "bench", "train", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_train_reports_every_mode_with_ratios(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    res = run(*TINY, "--batch", "4", "--rounds", "2", "--steps", "1", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "train" and doc["results"]["input_shape"] == [4, 3, 16, 16]
    modes = {m["mode"]: m for m in doc["results"]["modes"]}
    assert list(modes) == ["fp32", "bf16", "bf16+cl"]
    assert modes["fp32"]["ratio_vs_fp32"] == 1.0
    for m in modes.values():
        assert len(m["rounds_images_per_s"]) == 2 and m["images_per_s"] > 0
        rates = m["rounds_images_per_s"]
        assert min(rates) <= m["images_per_s"] <= max(rates)
    assert isinstance(doc["results"]["bf16"]["supported"], bool)
    assert load_report(out / "train.json")["kind"] == "train"
    md = (out / "train.md").read_text()
    assert "| bf16+cl |" in md and "x fp32" in md


def test_meta_step_and_compile_modes() -> None:
    cfg = TrainSpeedConfig(
        backbone="conv4",
        backbone_args={"width": 4},
        image_size=16,
        step="meta",
        inner_steps=2,
        modes=["bf16"],
        rounds=1,
        steps_per_round=1,
        warmup=0,
    )
    res = run_train_speed(cfg)
    assert [m["mode"] for m in res["modes"]] == ["fp32", "bf16"]  # the reference is added
    assert res["modes"][0]["images_per_step"] == 5 * 16
    cfg.modes, cfg.meta_batch = ["fp32", "fp32+loop"], 2
    res = run_train_speed(cfg)  # the batched inner loop against the per-task autograd loop
    assert [m["mode"] for m in res["modes"]] == ["fp32", "fp32+loop"] and not res["errors"]
    assert res["modes"][1]["images_per_step"] == 2 * 5 * 16 and res["modes"][1]["ratio_vs_fp32"] > 0
    with pytest.raises(ConfigError, match="loop"):
        TrainSpeedConfig(step="pretrain", modes=["fp32+loop"])


def test_bad_modes_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="--modes fp8"):
        TrainSpeedConfig(modes=["fp8"])
    res = run(*TINY, "--step", "joint")
    assert res.returncode != 0 and "--step 'joint'" in res.stderr
