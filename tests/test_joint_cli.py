"""`mtl-edge train joint` on a tiny recipe, and a Conv-4 joint checkpoint through export and
enrollment."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from mtl_edge.commands.train import register
from mtl_edge.errors import ConfigError

TINY = """
[data]
kind = "synthetic"
options = {size = 16, per_class = 8, train_classes = 6}

[model]
backbone = "conv4"
args = {width = 4}
preprocess = {size = 16}

[joint]
ways = 3
shots = 2
queries = 1
meta_batch = 2
inner_steps = 2
iterations = 3
log_every = 1
checkpoint_every = 2
"""


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app, "train")
    return app


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _train(recipe: Path, out: Path, *sets: str):
    args = ["train", "joint", "--recipe", str(recipe), "--out", str(out), "--json"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(_app(), args)


def test_cli_trains_a_self_describing_run(tiny_recipe: Path, tmp_path: Path) -> None:
    result = _train(tiny_recipe, tmp_path / "run", "joint.meta=maml", "joint.beta=0.5")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["method"] == "maml+transfer"
    ckpt = torch.load(info["checkpoint"], weights_only=True)
    assert ckpt["format"] == "mtl-edge.checkpoint" and ckpt["version"] == 2
    assert ckpt["model"] == "conv4" and ckpt["model_args"]["width"] == 4
    assert ckpt["preprocess"]["size"] == 16 and ckpt["deploy"]["adapt"]["kind"] == "inner"
    assert ckpt["transfer_head"]["weight"].shape == (6, 4)
    assert ckpt["config"]["joint"]["beta"] == 0.5
    run = tmp_path / "run"
    assert (run / "it000002.pt").is_file() and (run / "run.json").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["iteration"] for ln in lines] == [1, 2, 3]
    assert {"delta_meta", "delta_transfer"} <= set(json.loads(lines[-1]))
    assert 'meta = "maml"' in (run / "config.toml").read_text()
    again = _train(tiny_recipe, run)
    assert isinstance(again.exception, ConfigError) and "already holds" in str(again.exception)
    from mtl_edge.train.evaluate import evaluate_checkpoint

    protocol = {"ways": 3, "shots": [1], "episodes": 2, "heads": ["centroid"], "queries": 2}
    scored = evaluate_checkpoint(info["checkpoint"], protocol)
    # the plain meta-test reads the joint checkpoint's recipe like any other
    assert scored["ways"] == 3 and scored["results"]["1"]["centroid"]["episodes"] == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("joint.beta=1.5", "joint.beta=1.5: must be within [0, 1]"),
        ("joint.nope=1", "unknown key joint.nope"),
        ("joint.ways=many", "joint.ways = 'many' has the wrong type; expected int"),
        ("model.num_base_classes=9", "unknown key model.num_base_classes"),
        ("runtime.device=gpu", "runtime.device='gpu': use auto, cpu or cuda[:i]"),
    ],
)
def test_cli_bad_input_is_one_clear_error(
    tiny_recipe: Path, tmp_path: Path, override: str, message: str
) -> None:
    result = _train(tiny_recipe, tmp_path / "run", override)
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert len(str(result.exception).splitlines()) == 1


def test_missing_recipe_names_the_known_ones(tmp_path: Path) -> None:
    result = _train(tmp_path / "absent.toml", tmp_path / "run")
    assert "no such file" in str(result.exception) and "joint-reptile" in str(result.exception)


@pytest.mark.skipif(
    importlib.util.find_spec("mtl_edge.export.api") is None, reason="export/api.py not landed"
)
def test_conv4_joint_checkpoint_exports_enrolls_and_predicts(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    from mtl_edge.enroller import Enroller
    from mtl_edge.export.api import export_checkpoint

    result = _train(tiny_recipe, tmp_path / "run")
    assert result.exit_code == 0, result.output
    ckpt = json.loads(result.output)["checkpoint"]
    bundle, report = export_checkpoint(ckpt, tmp_path / "bundle")
    assert bundle.root.is_dir()
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for name, rgb in colours.items():
        (photos / name).mkdir(parents=True)
        for i in range(5):
            arr = np.clip(np.array(rgb) + rng.normal(0, 12, (20, 20, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(photos / name / f"{i}.png")
    enroller = Enroller(bundle.root, tmp_path / "g.gallery", backend="onnxruntime-cpu", threads=1)
    assert enroller.enroll_folder(photos) == {"blue": 5, "green": 5, "red": 5}
    preds = enroller.predict([photos / n / "0.png" for n in colours], top_k=1, threshold=0.0)
    assert len(preds) == 3 and {p.label for p in preds} <= set(colours)
