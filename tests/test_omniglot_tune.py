"""scripts/omniglot-cpu/tune.sh: the tuning split never holds the recipe's test alphabets."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from mtl_edge.data.omniglot import omniglot_alphabets, omniglot_set_dir, split_alphabets
from mtl_edge.train.config import load_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "omniglot-cpu" / "tune.sh"

RECORD_ARGS = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def _tune_calls(tmp_path: Path, *args: str) -> list[list[str]]:
    """Run tune.sh with a stand-in CLI; the argument lists it was called with."""
    cli, log = tmp_path / "mtl-edge", tmp_path / "calls.jsonl"
    cli.write_text(RECORD_ARGS)
    cli.chmod(0o755)
    env = {**os.environ, "MTL_EDGE_CLI": str(cli), "FAKE_LOG": str(log)}
    done = subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def _overrides(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def _tuning_recipe(tmp_path: Path, *args: str):
    (argv,) = _tune_calls(tmp_path, *args)
    return argv, load_recipe(argv[argv.index("--recipe") + 1], _overrides(argv))


def test_pretrain_scores_20_way_episodes_on_a_split_without_the_test_alphabets(
    tmp_path: Path,
) -> None:
    argv, recipe = _tuning_recipe(
        tmp_path, "pretrain", str(tmp_path / "A"), "--set", "pretrain.epochs=2"
    )
    assert argv[:2] == ["train", "pretrain"] and argv[argv.index("--out") + 1] == str(
        tmp_path / "A"
    )
    options = recipe.data.options
    assert len(options["exclude_alphabets"]) == 5 and options["seed"] != 0
    assert recipe.data.kind == "omniglot" and options["val_alphabets"] == 5
    p = recipe.pretrain
    assert (p.val_episodes, p.val_ways, p.val_shots, p.epochs) == (300, 20, 1, 2)
    assert recipe.runtime.time_budget == ""  # tuning runs finish their schedule
    assert (tmp_path / "A" / "time.txt").exists()  # /usr/bin/time -v wrote its report


def test_meta_stage_uses_the_same_split_and_bad_stage_is_refused(tmp_path: Path) -> None:
    argv, recipe = _tuning_recipe(
        tmp_path, "meta", str(tmp_path / "M"), "--pretrained", "A/best.pt"
    )
    assert argv[:2] == ["train", "meta"] and "A/best.pt" in argv
    assert len(recipe.data.options["exclude_alphabets"]) == 5
    bad = subprocess.run(
        ["bash", SCRIPT, "evaluate", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "use pretrain or meta" in bad.stderr


def test_excluded_alphabets_are_the_recipes_test_alphabets(
    tmp_path: Path, shared_data: Path
) -> None:
    """On the real data: tuning leaves out exactly what omniglot-cpu meta-tests on."""
    set_dir = omniglot_set_dir(shared_data / "omniglot", "images_background")
    _, recipe = _tuning_recipe(tmp_path, "pretrain", str(tmp_path / "A"))
    base = load_recipe("omniglot-cpu").data.options
    _, test_alphabets = split_alphabets(omniglot_alphabets(set_dir), 5, base["seed"])
    assert len(test_alphabets) == 5
    assert sorted(recipe.data.options["exclude_alphabets"]) == test_alphabets
