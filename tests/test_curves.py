"""Learning-curve PNG of training runs (bench/curves.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtl_edge.bench.curves import main, plot_comparison, plot_curves
from mtl_edge.errors import ConfigError


def write_run(folder: Path, stage: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    lines = [
        json.dumps({"stage": stage, "epoch": i, "seconds": 30.0} | r) for i, r in enumerate(rows)
    ]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_curves_of_two_stages(tmp_path: Path) -> None:
    pre = write_run(tmp_path / "pre", "pretrain", [
        {"loss": 3.0, "train_acc": 10.0}, {"loss": 2.0, "train_acc": 40.0, "val_acc": 45.0,
                                          "val_ci95": 0.8}])  # fmt: skip
    meta = write_run(tmp_path / "meta", "meta", [{"loss": 0.9, "train_acc": 60.0, "val_acc": 50.0}])
    out = plot_curves([pre, meta], tmp_path / "c.png", "title")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(pre), "--out", str(tmp_path / "d.png")]) == 0


def test_a_folder_without_metrics_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no metrics file"):
        plot_curves([tmp_path], tmp_path / "c.png")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        plot_curves([bad], tmp_path / "c.png")


def test_comparison_of_tuning_runs(tmp_path: Path) -> None:
    runs = [
        write_run(
            tmp_path / name,
            "pretrain",
            [
                {"loss": 3.0, "train_acc": 10.0, "val_acc": v, "val_ci95": 0.5},
                {"loss": 2.0, "train_acc": 40.0, "val_acc": v + 1, "val_ci95": 0.4},
            ],
        )  # fmt: skip
        for name, v in (("A", 80.0), ("B", 81.0))
    ]
    out = plot_comparison(runs, tmp_path / "t.png", "sweep")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*map(str, runs), "--compare", "--out", str(tmp_path / "u.png")]) == 0
    unvalidated = write_run(tmp_path / "C", "pretrain", [{"loss": 1.0, "train_acc": 5.0}])
    with pytest.raises(ConfigError, match="no validated epochs"):
        plot_comparison([unvalidated], tmp_path / "v.png")
