"""Meta-transfer driver on tiny synthetic data: SS learner, HT statistics, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_recipe import tiny_recipe

from mtl_edge.errors import ConfigError
from mtl_edge.train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from mtl_edge.train.meta_train import meta_train
from mtl_edge.train.pretrain import pretrain


def tiny(**meta: Any) -> dict[str, Any]:
    base = {
        "iterations": 6,
        "epoch_length": 3,
        "meta_batch": 2,
        "shots": 1,
        "queries": 3,
        "inner_steps": 3,
        "test_steps": 5,
        "val_episodes": 4,
        "lr_step": 1,
    }
    return tiny_recipe(
        pretrain={"epochs": 1, "batch_size": 16, "val_episodes": 0},
        meta=base | meta,
        hard_tasks={"count": 1},
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre")
    return Path(pretrain(tiny(), out)["checkpoint"])


def test_meta_train_with_hard_tasks(tmp_path: Path, pretrained: Path) -> None:
    result = meta_train(tiny(also_without_ht=True), tmp_path, init=pretrained)
    ht = result["hard_tasks"]
    assert ht["events"] > 0 and ht["tasks"] == ht["events"]  # one hard task per HT event
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    assert lines[1]["ss_lr"] == pytest.approx(lines[0]["ss_lr"] * 0.5)  # lr decay per epoch
    assert all("val_acc" in m and m["hard_batches"] > 0 for m in lines)
    loaded = load_checkpoint(result["checkpoint"])
    assert loaded.stage == "meta" and loaded.head.init == "meta" and loaded.adapt["kind"] == "mtl"
    ckpt = read_checkpoint(result["checkpoint"])
    assert any(k.endswith("ss_scale") for k in ckpt["state_dict"])
    assert ckpt["deploy"]["fc_init"]["weight"].shape == (5, loaded.backbone.feature_dim)
    assert loaded.meta_init is not None and loaded.meta_init[0].shape == (5, 8)
    assert ckpt["train_split"]["images"] > 0
    # SS moved away from identity: the meta-step trained it
    scales = [v for k, v in ckpt["state_dict"].items() if k.endswith("ss_scale")]
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in scales)
    # the backbone weights themselves stay frozen
    base = read_checkpoint(pretrained)["state_dict"]
    convs = [k for k in base if k.endswith("conv.weight")]
    assert convs and all(torch.equal(base[k], ckpt["state_dict"][k]) for k in convs)
    without = Path(result["checkpoints"]["without_ht"])
    assert without.is_file()
    no_ht = [json.loads(x) for x in (without.parent / "metrics.jsonl").read_text().splitlines()]
    assert all(m["hard_batches"] == 0 for m in no_ht)


def test_meta_needs_a_matching_checkpoint(tmp_path: Path, pretrained: Path) -> None:
    with pytest.raises(ConfigError, match="meta.pretrained"):
        meta_train(tiny(), tmp_path)
    other = tiny()
    other["model"] = {"backbone": "resnet12", "preprocess": {"size": 16}}
    with pytest.raises(CheckpointError, match="'conv4' checkpoint"):
        meta_train(other, tmp_path, init=pretrained)
    with pytest.raises(ConfigError, match="inner_loss"):
        meta_train(tiny(inner_loss="median"), tmp_path, init=pretrained)


def test_the_head_table_travels_with_the_checkpoint(tmp_path: Path, pretrained: Path) -> None:
    recipe = tiny() | {"head": {"init": "imprint", "lr": 0.5, "normalize": True}}
    result = meta_train(recipe, tmp_path / "meta", init=pretrained)
    head = load_checkpoint(result["checkpoint"]).head
    assert (head.init, head.lr, head.normalize, head.steps) == ("imprint", 0.5, True, 5)
    rows = [json.loads(x) for x in (tmp_path / "meta" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_acc"] <= 100 for r in rows)  # validated with that head
