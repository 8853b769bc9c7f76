"""Backbone registry: shapes at two input sizes, model_args round trip, conv -> BN pairs."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from mtl_edge.errors import ConfigError
from mtl_edge.train.backbones import (
    BACKBONES,
    ConvBN,
    backbone_names,
    create_backbone,
)
from mtl_edge.train.ss import convert_to_ss

#: Tiny variants of every registered backbone (same structure, few channels).
TINY: dict[str, dict[str, Any]] = {
    "resnet12": {"widths": [4, 6, 8, 10]},
    "resnet12-wide": {"widths": [4, 6, 8, 12]},
    "resnet25": {"stem": 4, "widths": [6, 8, 10], "blocks": 2},
    "conv4": {"width": 8},
}


def test_tiny_table_covers_registry() -> None:
    assert sorted(TINY) == backbone_names() == sorted(BACKBONES)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("size", [16, 28])
def test_forward_features_shape(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, in_channels=1, **TINY[name]).eval()
    out = model.forward_features(torch.randn(2, 1, size, size))
    assert out.shape == (2, model.feature_dim)
    x = torch.randn(1, 1, size, size)
    assert torch.equal(model(x), model.forward_features(x))
    assert model.in_channels == 1 and model.name == name


@pytest.mark.parametrize(
    ("name", "dim"), [("resnet12", 512), ("resnet12-wide", 640), ("resnet25", 640)]
)
def test_full_size_feature_dims(name: str, dim: int) -> None:
    model = create_backbone(name)
    assert model.feature_dim == dim and model.in_channels == 3


def test_conv4_width_and_channels() -> None:
    model = create_backbone("conv4", in_channels=1, width=32).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 32)


def test_resnet12_structure_matches_paper() -> None:
    model = create_backbone("resnet12")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 4 blocks x (3 conv3x3 with bias + 1 shortcut 1x1 without), as in the TF code
    assert len(convs) == 16
    assert all((c.bias is not None) == (c.kernel_size == (3, 3)) for c in convs)
    assert [c.out_channels for c in convs if c.kernel_size == (1, 1)] == [64, 128, 256, 512]


def test_resnet25_structure_matches_official_pytorch() -> None:
    model = create_backbone("resnet25")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    threes = [c for c in convs if c.kernel_size == (3, 3)]
    assert len(threes) == 25 and threes[0].out_channels == 80
    shortcuts = [c for c in convs if c.kernel_size == (1, 1)]
    assert [c.stride for c in shortcuts] == [(2, 2)] * 3


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_args_rebuild_same_state_dict(name: str) -> None:
    model = create_backbone(name, in_channels=3, **TINY[name])
    args = json.loads(json.dumps(model.model_args))
    again = create_backbone(name, **args)
    again.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), again.eval()(x))


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.BatchNorm2d]]:
    """Every (conv, bn) of the `ConvBN` blocks, which `fuse()` folds."""
    return [(m.conv, m.bn) for m in model.modules() if isinstance(m, ConvBN)]


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("ss", [False, True])
def test_conv_bn_pairs_cover_every_conv(name: str, ss: bool) -> None:
    model = create_backbone(name, **TINY[name])
    if ss:
        convert_to_ss(model)
    pairs = conv_bn_pairs(model)
    convs = [m for m in model.modules() if hasattr(m, "weight") and m.weight.dim() == 4]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(c) for c, _ in pairs} == {id(c) for c in convs}
    assert {id(b) for _, b in pairs} == {id(b) for b in bns}
    assert all(bn.num_features == conv.out_channels for conv, bn in pairs)


def test_conv_bn_pairs_feed_bn_directly() -> None:
    """Each BN's input is exactly its paired conv's output (hooks record both)."""
    model = create_backbone("resnet12", **TINY["resnet12"]).eval()
    outs: dict[int, torch.Tensor] = {}
    ins: dict[int, torch.Tensor] = {}
    pairs = conv_bn_pairs(model)
    for conv, bn in pairs:
        conv.register_forward_hook(lambda m, i, o: outs.__setitem__(id(m), o))
        bn.register_forward_hook(lambda m, i, o: ins.__setitem__(id(m), i[0]))
    model(torch.randn(1, 3, 16, 16))
    assert all(torch.equal(outs[id(c)], ins[id(b)]) for c, b in pairs)


def test_unknown_backbone_and_option() -> None:
    with pytest.raises(ConfigError, match="conv4"):
        create_backbone("resnet1000")
    with pytest.raises(ConfigError, match="depth"):
        create_backbone("conv4", depth=3)
    with pytest.raises(ConfigError, match="widths"):
        create_backbone("resnet12", widths=[1, 2])
    with pytest.raises(ConfigError, match=r"as a list"):  # `--backbone-arg widths=48,96,...`
        create_backbone("resnet12", widths="48,96,192,384")
    with pytest.raises(ConfigError, match="in_channels"):
        create_backbone("conv4", in_channels=0)


def test_ss_shortcut_arg_is_accepted() -> None:
    model = create_backbone("conv4", width=8, ss_shortcut=False)
    assert "ss_shortcut" not in model.model_args
