"""`mtl-edge train`: the commands end to end and their one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """
[data]
kind = "synthetic"
options = { size = 16, per_class = 12, train_classes = 6, val_classes = 5, test_classes = 5 }
[model]
backbone = "conv4"
args = { width = 8 }
preprocess = { size = 16 }
[pretrain]
epochs = 1
batch_size = 16
val_episodes = 0
[meta]
iterations = 2
epoch_length = 2
queries = 3
inner_steps = 2
test_steps = 3
val_episodes = 2
[runtime]
threads = 1
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", *args], capture_output=True, text=True, timeout=300
    )


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.toml").write_text(RECIPE)
    return root


@pytest.mark.slow
def test_pretrain_meta_evaluate(run_dir: Path) -> None:
    recipe = str(run_dir / "tiny.toml")
    pre = run_cli("train", "pretrain", "--recipe", recipe, "--out", str(run_dir / "pre"), "--json")
    assert pre.returncode == 0, pre.stderr
    best = json.loads(pre.stdout)["checkpoint"]
    meta = run_cli(
        "train", "meta", "--recipe", recipe, "--out", str(run_dir / "meta"),
        "--set", f"meta.pretrained={best}", "--json",
    )  # fmt: skip
    assert meta.returncode == 0, meta.stderr
    ckpt = json.loads(meta.stdout)["checkpoint"]
    ev = run_cli(
        "train", "evaluate", "--checkpoint", ckpt, "--shots", "1,2", "--episodes", "3",
        "--queries", "5", "--heads", "mtl,centroid", "--json",
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    table = json.loads(ev.stdout)["results"]
    assert set(table) == {"1", "2"} and set(table["1"]) == {"mtl", "centroid"}
    assert all(0 <= r["mean"] <= 100 for t in table.values() for r in t.values())
    # the wrong architecture: a conv4 checkpoint for a resnet12 recipe
    wrong = run_cli(
        "train", "meta", "--recipe", recipe, "--out", str(run_dir / "m2"),
        "--set", "model.backbone=resnet12", "--set", "model.args={}", "--pretrained", best,
    )  # fmt: skip
    one_line_error(wrong, best, "'conv4' checkpoint", "resnet12")
    # a split with too few classes for N-way
    ways = run_cli("train", "evaluate", "--checkpoint", ckpt, "--ways", "9", "--episodes", "2")
    one_line_error(ways, "5 classes, fewer than the 9 ways")


def test_recipe_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nepochz = 3\n")
    one_line_error(
        run_cli("train", "pretrain", "--recipe", str(bad), "--out", str(tmp_path / "r")),
        "pretrain.epochz",
        str(bad),
    )
    one_line_error(
        run_cli(
            "train",
            "pretrain",
            "--recipe",
            "demo",
            "--out",
            str(tmp_path / "r"),
            "--set",
            "pretrain.lr=fast",
        ),  # fmt: skip
        "pretrain.lr",
        "float",
    )
    notckpt = tmp_path / "x.pt"
    notckpt.write_text("no")
    one_line_error(run_cli("train", "evaluate", "--checkpoint", str(notckpt)), str(notckpt))
