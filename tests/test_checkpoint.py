"""Self-describing checkpoints: weights_only loadable, one clear error for every bad file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_edge.preprocess import Preprocess
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import (
    CheckpointError,
    backbone_state,
    load_checkpoint,
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
    }


def test_roundtrip_weights_only(tmp_path: Path) -> None:
    ckpt = conv4_ckpt()
    path = save_checkpoint(tmp_path / "best.pt", ckpt)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "mtl-edge.checkpoint" and raw["version"] == 1
    loaded = load_checkpoint(path, expect_model="conv4")
    assert loaded.stage == "pretrain" and loaded.preprocess.size == 16
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k])
    assert not loaded.model.training


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
