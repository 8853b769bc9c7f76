"""SS convs: identical outputs after conversion, parameter shapes, buffers, freezing, BN modes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtl_edge.errors import ConfigError
from mtl_edge.train.backbones import ConvBN, create_backbone
from mtl_edge.train.ss import (
    SSConv2d,
    bn_parameters,
    convert_to_ss,
    freeze_backbone,
    revert_ss,
    set_bn_mode,
    ss_modules,
    ss_parameters,
)

TINY = {
    "resnet12": {"widths": [4, 6, 8, 10]},
    "resnet12-wide": {"widths": [4, 6, 8, 12]},
    "resnet25": {"stem": 4, "widths": [6, 8, 10], "blocks": 2},
    "conv4": {"width": 8},
}


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine, so the identity test is not vacuous."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data.copy_(torch.randn(m.out_channels, generator=g) * 0.1)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("shortcut", [True, False])
def test_conversion_keeps_outputs(name: str, shortcut: bool) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, **TINY[name])
    _randomise_bn(model)
    x = torch.randn(3, 3, 20, 20)
    # train mode (batch statistics) updates running stats: compare it on separate copies
    twin = copy.deepcopy(model)
    with torch.no_grad():
        before_eval = model.eval()(x)
        before_train = twin.train()(x)
        convert_to_ss(model, shortcut=shortcut)
        convert_to_ss(twin, shortcut=shortcut)
        after_eval = model.eval()(x)
        after_train = twin.train()(x)
    torch.testing.assert_close(after_eval, before_eval, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after_train, before_train, rtol=1e-5, atol=1e-6)
    plain = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert all(m.kernel_size == (1, 1) for m in plain)
    assert (len(plain) == 0) == (shortcut or name == "conv4")
    assert model.model_args["ss_shortcut"] is shortcut


def test_ss_parameter_shapes_and_buffers() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
    ss = SSConv2d(conv)
    assert ss.ss_scale.shape == (6, 2, 1, 1) and ss.ss_shift.shape == (6,)
    assert torch.equal(ss.ss_scale, torch.ones(6, 2, 1, 1))
    assert torch.equal(ss.ss_shift, torch.zeros(6))
    names = {n for n, _ in ss.named_parameters()}
    assert names == {"ss_scale", "ss_shift"}
    buffers = dict(ss.named_buffers())
    assert set(buffers) == {"weight", "bias"}
    assert torch.equal(buffers["weight"], conv.weight) and torch.equal(
        buffers["bias"], torch.zeros(6)
    )
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(ss(x), conv(x))


def test_effective_weight_and_bias_is_what_runs() -> None:
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    ss = SSConv2d(conv)
    with torch.no_grad():
        ss.ss_scale.uniform_(0.5, 1.5)
        ss.ss_shift.normal_()
    w, b = ss.effective_weight_and_bias()
    torch.testing.assert_close(w, conv.weight * ss.ss_scale)
    torch.testing.assert_close(b, conv.bias + ss.ss_shift)
    ref = nn.functional.conv2d(torch.ones(1, 3, 9, 9), w, b, stride=2, padding=1)
    torch.testing.assert_close(ss(torch.ones(1, 3, 9, 9)), ref)


def test_state_dict_keys_round_trip() -> None:
    model = convert_to_ss(create_backbone("conv4", width=8))
    keys = set(model.state_dict())
    assert "layers.0.conv.ss_scale" in keys and "layers.0.conv.weight" in keys
    again = convert_to_ss(create_backbone("conv4", **model.model_args))
    again.load_state_dict(model.state_dict(), strict=True)


def test_freeze_backbone_leaves_only_ss() -> None:
    model = convert_to_ss(create_backbone("resnet12", **TINY["resnet12"]), shortcut=False)
    freeze_backbone(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in ss_parameters(model)}
    assert len(ss_parameters(model)) == 2 * len(ss_modules(model)) == 2 * 12


def test_bn_modes() -> None:
    model = convert_to_ss(create_backbone("conv4", width=8))
    freeze_backbone(model)
    model.train()
    set_bn_mode(model, "frozen")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not bn.training for bn in bns)
    assert not any(p.requires_grad for p in bn_parameters(model))
    before = bns[0].running_mean.clone()
    model(torch.randn(4, 3, 16, 16))
    assert torch.equal(bns[0].running_mean, before)
    set_bn_mode(model, "train")
    assert all(bn.training for bn in bns) and model.bn_mode == "train"
    assert all(p.requires_grad for p in bn_parameters(model))
    with pytest.raises(ConfigError, match="bn_mode"):
        set_bn_mode(model, "half")


def test_unsupported_padding_mode() -> None:
    with pytest.raises(ConfigError, match="padding_mode"):
        SSConv2d(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_revert_ss_gives_plain_trainable_convs_with_same_outputs() -> None:
    model = convert_to_ss(create_backbone("resnet12", **TINY["resnet12"])).eval()
    with torch.no_grad():
        for m in ss_modules(model):
            m.ss_scale.uniform_(0.5, 1.5)
            m.ss_shift.normal_(0.0, 0.1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        reverted = revert_ss(copy.deepcopy(model))
        got = reverted(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not ss_modules(reverted)
    assert all(type(m.conv) is nn.Conv2d for m in reverted.modules() if isinstance(m, ConvBN))


@pytest.mark.parametrize(("name", "size"), [("resnet12", 84), ("resnet25", 80)])
def test_real_size_conversion_keeps_features(name: str, size: int) -> None:
    """The paper-size networks at their input size, batch 1, eval mode."""
    torch.manual_seed(0)
    model = create_backbone(name)
    _randomise_bn(model)
    model.eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before = model(x)
        after = convert_to_ss(model)(x)
    assert before.shape == (1, model.feature_dim)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
