"""The N-way x K-shot evaluation grid (train/grid.py) on a tiny synthetic split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_edge.data.registry import open_split, open_split_spec
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import load_checkpoint
from mtl_edge.train.config import load_recipe
from mtl_edge.train.grid import (
    Adapt,
    GridModel,
    episodes_for,
    evaluate_grid,
    format_table,
    grid_model,
    plan_settings,
    run_grid,
)
from mtl_edge.train.joint_train import train_joint

PRE = Preprocess(size=16)


@dataclass
class Model:
    """What the grid needs of a model (a LoadedCheckpoint has the same fields)."""

    backbone: torch.nn.Module
    preprocess: Preprocess = PRE
    head: HeadRecipe = HeadRecipe(steps=10)
    meta_init: tuple[np.ndarray, np.ndarray] | None = None


def _grid_model(name: str, backbone: torch.nn.Module, **adapt: object) -> GridModel:
    return GridModel(name, Model(backbone.eval()), Adapt(**adapt))  # type: ignore[arg-type]


def _split(classes: int = 6, per_class: int = 12):
    return open_split("synthetic", None, "test", size=16, per_class=per_class, test_classes=classes)


def _models() -> list[GridModel]:
    torch.manual_seed(0)
    a = create_backbone("conv4", width=4)
    b = create_backbone("conv4", width=4)
    return [
        _grid_model("proto", a, kind="centroid"),
        _grid_model("ft", b, kind="finetune", steps=2, lr=0.05),
    ]


def test_grid_same_episodes_skips_what_the_split_cannot_supply() -> None:
    split = _split()
    report = evaluate_grid(
        _models(), split, ways=(2, 5, 8), shots=(1, 3, 100), episodes=2, queries=2
    )
    done = {(r["ways"], r["shots"]) for r in report["results"]}
    assert done == {(2, 1), (2, 3), (5, 1), (5, 3)}
    assert {r["model"] for r in report["results"]} == {"proto", "ft"}
    reasons = {(s["ways"], s["shots"]): s["reason"] for s in report["skipped"]}
    assert "8-way 1-shot" in reasons[(8, 1)] and "6 classes" in reasons[(8, 1)]
    assert "2-way 100-shot" in reasons[(2, 100)] and "102" in reasons[(2, 100)]
    for r in report["results"]:
        assert 0.0 <= r["mean"] <= 100.0 and r["ci95"] >= 0.0 and r["episodes"] == 2
    again = evaluate_grid(
        _models(), split, ways=(2, 5, 8), shots=(1, 3, 100), episodes=2, queries=2
    )
    assert again["results"] == report["results"]
    table = format_table(report)
    assert "5-way 3-shot" in table and "skipped 8-way 1-shot" in table
    acc = {(r["ways"], r["shots"], r["model"]): r for r in report["results"]}
    for d in report["differences"]:
        assert (d["model"], d["versus"]) == ("ft", "proto")
        ft, proto = acc[(d["ways"], d["shots"], "ft")], acc[(d["ways"], d["shots"], "proto")]
        assert len(ft["accuracies"]) == 2
        assert d["mean"] == pytest.approx(ft["mean"] - proto["mean"])
    assert len(report["differences"]) == 4 and "ft minus" in table
    json.dumps(report)


def test_episodes_are_seeded_per_setting() -> None:
    split = _split()
    (s,) = plan_settings(split, (3,), (2,), 2)
    first = episodes_for(split, s, 2, 4, seed=0)
    assert [e.to_json() for e in first] == [e.to_json() for e in episodes_for(split, s, 2, 4, 0)]
    assert [e.to_json() for e in first] != [e.to_json() for e in episodes_for(split, s, 2, 4, 1)]
    assert len({tuple(e.classes) for e in first}) > 1


def test_centroid_head_separates_separable_features() -> None:
    """A backbone whose features are the mean colour gets the synthetic classes mostly right."""

    class MeanColour(torch.nn.Module):
        feature_dim = 3

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3))

    split = _split(classes=5, per_class=20)
    good = _grid_model("colour", MeanColour(), kind="centroid")
    report = evaluate_grid([good], split, ways=(5,), shots=(5,), episodes=4, queries=5)
    assert report["results"][0]["mean"] > 20.0 + 10.0  # chance is 20%


def test_finetune_starts_from_the_prototype_head_when_asked() -> None:
    """With 0 steps a zero head predicts class 0 everywhere (exactly chance); a prototype head is
    the nearest-mean classifier of the support features and does far better."""

    class ScaledColour(torch.nn.Module):
        feature_dim = 3

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * x.mean((2, 3))

    split = _split(classes=5, per_class=20)
    models = [
        _grid_model(init, ScaledColour(), kind="finetune", steps=0, head_init=init)
        for init in ("zero", "prototypes")
    ]
    report = evaluate_grid(models, split, ways=(5,), shots=(5,), episodes=4, queries=5)
    acc = {r["model"]: r["mean"] for r in report["results"]}
    assert acc["zero"] == pytest.approx(20.0)
    assert acc["prototypes"] > 20.0 + 10.0


def test_no_supplied_setting_and_bad_options() -> None:
    split = _split(classes=4)
    with pytest.raises(DatasetError, match="supplies none of the settings.*35-way"):
        evaluate_grid(_models(), split, ways=(35,), shots=(1,), episodes=1)
    with pytest.raises(ConfigError, match="episodes"):
        evaluate_grid(_models(), split, ways=(2,), shots=(1,), episodes=0)
    with pytest.raises(ConfigError, match="adapt kind"):
        Adapt(kind="magic")
    with pytest.raises(ConfigError, match="adapt head_init='random'"):
        Adapt(kind="inner", head_init="random")
    with pytest.raises(DatasetError, match="NAME\\[a:b\\]"):
        open_split_spec("synthetic", None, "test[x]")
    with pytest.raises(DatasetError, match="selects no class"):
        open_split_spec("synthetic", None, "test[30:]", test_classes=4)


def test_split_spec_joins_and_slices() -> None:
    joined = open_split_spec("synthetic", None, "val+test[:3]", per_class=5, size=16)
    assert joined.num_classes == 16 + 3
    assert len(joined) == 19 * 5
    assert np.array_equal(np.unique(joined.labels), np.arange(19))


def _joint_checkpoints(tmp_path: Path) -> list[Path]:
    sets = [
        'data.kind="synthetic"',
        "data.options={size=16, per_class=8, train_classes=6}",
        "data.per_class=0",
        "model.args={width=4}",
        "model.preprocess={size=16}",
        "joint.ways=3",
        "joint.shots=2",
        "joint.meta_batch=2",
        "joint.inner_steps=2",
        "joint.iterations=2",
        "data.cache_dir=''",
    ]
    ckpts = []
    for name, beta in (("reptile", 1.0), ("transfer", 0.0)):
        recipe = load_recipe("joint-cpu-repro", sets + [f"joint.beta={beta}"])
        ckpts.append(train_joint(recipe, tmp_path / name))
    return ckpts


def test_grid_on_trained_checkpoints(tmp_path: Path) -> None:
    ckpts = _joint_checkpoints(tmp_path)
    out = tmp_path / "grid.json"
    report = run_grid(ckpts, "synthetic", None, "val+test", (5, 40), (1,), 2, out=out)
    assert "skipped 40-way 1-shot" in format_table(report)
    on_disk = json.loads(out.read_text())
    assert on_disk["results"] == report["results"]
    assert [m["name"] for m in on_disk["models"]] == ["reptile", "transfer"]
    assert {m["adapt"]["kind"] for m in on_disk["models"]} == {"inner", "finetune"}
    assert {m["adapt"]["head_init"] for m in on_disk["models"]} == {"prototypes"}
    report = run_grid(ckpts, "synthetic", None, "val+test", (5,), (1,), 2, adapt=["kind=centroid"])
    assert {m["adapt"]["kind"] for m in report["models"]} == {"centroid"}
    assert on_disk["classes"] == 36 and on_disk["split"] == "synthetic/val+test"
    with pytest.raises(ConfigError, match="steps = 'many' has the wrong type"):
        run_grid(ckpts, "synthetic", None, "val+test", (5,), (1,), 2, adapt=["steps='many'"])


def test_an_ss_checkpoint_defaults_to_its_fc_base_learner(tmp_path: Path) -> None:
    from model_fixtures import tiny_checkpoint

    loaded = load_checkpoint(tiny_checkpoint(tmp_path / "mtl.pt", size=16))
    model = grid_model(loaded)
    assert model.adapt.kind == "mtl" and model.name == "mtl"
    logreg = grid_model(loaded, ["kind=logreg"])
    logreg.name = "logreg"
    report = evaluate_grid([model, logreg], _split(), ways=(3,), shots=(2,), episodes=2, queries=2)
    assert [r["model"] for r in report["results"]] == ["mtl", "logreg"]
    assert all(0.0 <= r["mean"] <= 100.0 for r in report["results"])


def test_evaluate_grid_command_defaults_to_the_paper_grid(monkeypatch, tmp_path) -> None:
    """`mtl-edge train evaluate --grid` asks for 5/20/35-way x 1/5/100-shot unless told."""
    import mtl_edge.train.grid as grid_module
    from mtl_edge import cli

    calls: list[tuple] = []

    def fake(*a, **k):
        calls.append(a)
        return {"models": [], "results": [], "skipped": [], "split": "s", "classes": 0} | {
            "seed": 0,
            "episodes": 1,
            "queries": 7,
        }

    monkeypatch.setattr(grid_module, "run_grid", fake)
    args = ["train", "evaluate", "--grid", "--checkpoint", str(tmp_path / "c.pt"), "--queries", "7"]
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 0
    (positional,) = calls
    assert list(positional[4]) == [5, 20, 35] and list(positional[5]) == [1, 5, 100]
    assert positional[7] == 7 and positional[11] is None  # queries, out
    cli_out = tmp_path / "g.json"
    with pytest.raises(SystemExit):
        cli.main(
            [*args, "--out", str(cli_out), "--ways", "5", "--shots", "1", "--adapt", "steps=3"]
        )
    positional = calls[-1]
    assert positional[9] == ["steps=3"]
    assert positional[11] == cli_out and list(positional[4]) == [5] and list(positional[5]) == [1]
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--device", "gpu"])
    assert info.value.code == 1
