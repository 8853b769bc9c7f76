"""The FC head's test-time sweep (bench/head_sweep.py) and `train evaluate --head` overrides,
on a tiny checkpoint over the synthetic split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from mtl_edge.bench.head_sweep import main, parse_setting, sweep
from mtl_edge.commands.train import register
from mtl_edge.errors import ConfigError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import (
    backbone_state,
    deploy_section,
    load_checkpoint,
    save_checkpoint,
)
from mtl_edge.train.evaluate import evaluate_checkpoint, with_head_overrides

SYNTHETIC = {"kind": "synthetic", "options": {"size": 16, "per_class": 8, "test_classes": 4}}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_backbone("conv4", width=4)
    return save_checkpoint(
        tmp_path / "run" / "best.pt",
        {
            "model": "conv4",
            "model_args": dict(model.model_args),
            "state_dict": backbone_state(model),
            "stage": "pretrain",
            "preprocess": Preprocess(size=16).to_dict(),
            "config": {"data": SYNTHETIC},
            "metrics": {},
            "deploy": deploy_section(HeadRecipe(steps=5, lr=0.5), {"kind": "centroid"}),
        },
    )


def test_head_overrides_change_only_the_named_fields(checkpoint: Path) -> None:
    loaded = load_checkpoint(checkpoint)
    changed = with_head_overrides(loaded, ["steps=200", "init=imprint", "normalize=true"])
    assert changed.head == HeadRecipe(steps=200, lr=0.5, init="imprint", normalize=True)
    assert loaded.head == HeadRecipe(steps=5, lr=0.5)  # the loaded checkpoint is not changed
    assert with_head_overrides(loaded, []) is loaded
    with pytest.raises(ConfigError, match="--head stepz: not a head setting"):
        with_head_overrides(loaded, ["stepz=3"])
    with pytest.raises(ConfigError, match="--head: head.steps=-1"):
        with_head_overrides(loaded, ["steps=-1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        with_head_overrides(loaded, ["steps"])


def test_prototype_start_without_steps_is_centroid(checkpoint: Path) -> None:
    """T = 0 from the imprinted prototypes on normalised features predicts exactly as cosine
    nearest-centroid, so the sweep's first point and `evaluate --head` must both say so."""
    protocol = {
        "ways": 3,
        "shots": [1, 2],
        "episodes": 6,
        "queries": 3,
        "heads": ["mtl", "centroid"],
    }
    result = evaluate_checkpoint(
        checkpoint, protocol, head=["steps=0", "init=imprint", "normalize=true"]
    )
    assert result["mtl_head"]["steps"] == 0 and result["mtl_head"]["init"] == "imprint"
    for table in result["results"].values():
        assert table["mtl"]["mean"] == table["centroid"]["mean"]
    report = sweep(
        checkpoint, "test", [(3, 1), (3, 2)], steps=[0, 20], lrs=[0.5, 2.0], episodes=6,
        queries=3, head=["init=imprint", "normalize=true"],
    )  # fmt: skip
    assert report["base_head"]["init"] == "imprint" and report["episodes"] == 6
    for setting, (shots, table) in zip(report["settings"], result["results"].items(), strict=True):
        assert setting["shots"] == int(shots)
        heads = {h["name"]: h for h in setting["heads"]}
        assert set(heads) == {"centroid", "logreg"} | {
            f"mtl T={t} lr={lr:g}" for t in (0, 20) for lr in (0.5, 2.0)
        }
        # the same episodes as `train evaluate`
        assert heads["centroid"]["mean"] == round(table["centroid"]["mean"], 4)
        zero = heads["mtl T=0 lr=0.5"]
        assert zero["minus_centroid"] == 0.0 and zero["mean"] == heads["centroid"]["mean"]
        assert (zero["steps"], zero["lr"]) == (0, 0.5) and heads["logreg"]["steps"] is None
        for h in heads.values():
            assert 0.0 <= h["mean"] <= 100.0 and np.isfinite(h["minus_centroid_ci95"])


def test_command_writes_report_and_plot(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = [
        "--checkpoint", str(checkpoint), "--split", "test", "--settings", "3x1", "--steps", "0,4",
        "--lr", "1", "--episodes", "4", "--queries", "2", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "head-sweep.json").read_text())
    assert [s["ways"] for s in report["settings"]] == [3]
    assert (out / "head-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mtl T=4 lr=1" in capsys.readouterr().out
    # a user's mistake is one line on stderr and exit status 1
    assert main([*argv[:4], "--settings", "3x1", "--steps", "0,x", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().startswith("error: --steps '0,x'")
    missing = ["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)]
    assert main(missing) == 1 and "nope.pt" in capsys.readouterr().err


def test_evaluate_command_takes_head_overrides(checkpoint: Path) -> None:
    app = typer.Typer()
    register(app, "train")
    args = ["train", "evaluate", "--checkpoint", str(checkpoint), "--ways", "3", "--shots", "1",
            "--episodes", "2", "--queries", "2", "--heads", "mtl"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--head", "steps=3", "--head", "lr=2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["mtl_head"] == HeadRecipe(steps=3, lr=2.0).to_dict()
    bad = CliRunner().invoke(app, [*args, "--head", "stepz=3"])
    assert bad.exit_code != 0 and "stepz" in str(bad.exception or bad.output)
    grid = CliRunner().invoke(app, [*args, "--grid", "--head", "steps=3"])
    assert grid.exit_code != 0 and "--adapt" in str(grid.exception or grid.output)


@pytest.mark.parametrize("text", ["20", "x5", "1x5", "20x0", "ax5"])
def test_bad_settings_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="WAYSxSHOTS"):
        parse_setting(text)
    assert parse_setting("20x5") == (20, 5)
