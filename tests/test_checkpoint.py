"""Self-describing checkpoints: weights_only loadable, one clear error for every bad file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import (
    CheckpointError,
    backbone_state,
    deploy_section,
    load_checkpoint,
    meta_head_recipe,
    read_checkpoint,
    save_checkpoint,
)


def conv4_ckpt(width: int = 8) -> dict:
    model = create_backbone("conv4", width=width)
    return {
        "model": "conv4",
        "model_args": dict(model.model_args),
        "state_dict": backbone_state(model),
        "stage": "pretrain",
        "preprocess": Preprocess(size=16).to_dict(),
        "config": {"model": {"backbone": "conv4"}},
        "metrics": {"val_acc": 50.0},
        "deploy": deploy_section(HeadRecipe(steps=7), {"kind": "centroid"}),
    }


def test_roundtrip_weights_only(tmp_path: Path) -> None:
    ckpt = conv4_ckpt()
    path = save_checkpoint(tmp_path / "best.pt", ckpt)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "mtl-edge.checkpoint" and raw["version"] == 2
    assert raw["commit"] is None or len(raw["commit"]) >= 7
    loaded = load_checkpoint(path, expect_model="conv4")
    assert loaded.stage == "pretrain" and loaded.preprocess.size == 16
    assert loaded.head == HeadRecipe(steps=7) and loaded.meta_init is None
    assert loaded.adapt == {"kind": "centroid"} and loaded.name == tmp_path.name  # run folder
    for k, v in loaded.backbone.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k])
    assert not loaded.backbone.training


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", conv4_ckpt())
    with pytest.raises(CheckpointError, match="'conv4' checkpoint.*'resnet12'"):
        load_checkpoint(path, expect_model="resnet12")
    bad = conv4_ckpt()
    bad["model_args"] = {"width": 16}  # weights of width 8 do not fit
    path = save_checkpoint(tmp_path / "d.pt", bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    for path, needle in [
        (tmp_path / "missing.pt", "no such checkpoint"),
        (text, "not a readable torch checkpoint"),
    ]:
        with pytest.raises(CheckpointError, match=needle):
            read_checkpoint(path)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not an mtl-edge checkpoint"):
        read_checkpoint(plain)
    torch.save({"format": "mtl-edge.checkpoint", "version": 1, "model": "conv4"}, plain)
    with pytest.raises(CheckpointError, match="version 1; this mtl-edge reads 2"):
        read_checkpoint(plain)
    torch.save({"format": "mtl-edge.checkpoint", "version": 2, "model": "conv4"}, plain)
    with pytest.raises(CheckpointError, match="misses model_args"):
        read_checkpoint(plain)
    torch.save({"format": "mtl-edge.checkpoint", "version": 99}, plain)
    with pytest.raises(CheckpointError, match="version 99"):
        read_checkpoint(plain)


def test_save_refuses_incomplete(tmp_path: Path) -> None:
    ckpt = conv4_ckpt()
    del ckpt["preprocess"]
    with pytest.raises(ValueError, match="preprocess"):
        save_checkpoint(tmp_path / "x.pt", ckpt)
    assert not (tmp_path / "x.pt").exists()


def test_meta_deploy_head_follows_the_learner_settings() -> None:
    from mtl_edge.train.stage_config import MetaConfig

    meta = MetaConfig(test_steps=40, inner_lr=0.05, inner_weight_decay=0.001, inner_loss="tf")
    head = meta_head_recipe(meta)
    assert (head.steps, head.lr, head.weight_decay, head.loss) == (40, 0.05, 0.001, "tf")
    assert head.init == "meta" and head.normalize is False


def test_deploy_fc_init_of_another_size_is_refused(tmp_path: Path) -> None:
    ckpt = conv4_ckpt()
    ckpt["deploy"] = deploy_section(
        HeadRecipe(), {"kind": "mtl"}, (torch.zeros(5, 3), torch.zeros(5))
    )
    path = save_checkpoint(tmp_path / "f.pt", ckpt)
    with pytest.raises(CheckpointError, match=r"fc_init weight \(5, 3\)"):
        load_checkpoint(path)
