"""Folding SS and BatchNorm gives the same features as the SS network.

Also home of the small stand-in SS network the other export tests use (`tiny_ss_model`,
`tiny_checkpoint`), so they do not depend on the training stack's backbones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.errors import MtlEdgeError
from mtl_edge.export.fold import fold_error, fold_model, plain_conv_from_ss, traced_conv_bn_pairs
from mtl_edge.preprocess import Preprocess

# ---------------------------------------------------------------------------------------------
# Stand-in SS network (the contract of mtl_edge.train.ss.SSConv2d)


class StandinSSConv(nn.Module):
    """Frozen conv weight/bias buffers, learnable ss_scale (out, in/groups, 1, 1), ss_shift."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.register_buffer("weight", conv.weight.detach().clone())
        bias = None if conv.bias is None else conv.bias.detach().clone()
        self.register_buffer("bias", bias)
        out_ch, in_per_group = conv.weight.shape[:2]
        self.ss_scale = nn.Parameter(torch.ones(out_ch, in_per_group, 1, 1))
        self.ss_shift = nn.Parameter(torch.zeros(out_ch))

    def effective_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.ss_shift if self.bias is None else self.bias + self.ss_shift
        return self.weight * self.ss_scale, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.effective_weight_and_bias()
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class StandinNet(nn.Module):
    """conv-bn-lrelu, a residual block with a 1x1 shortcut conv-bn, grouped conv, pooling."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(16)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.bn_sc = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.feature_dim = 16

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        y = F.leaky_relu(self.bn2(self.conv2(x)) + self.bn_sc(self.shortcut(x)), 0.1)
        y = F.relu(self.bn3(self.conv3(y)))
        return F.adaptive_avg_pool2d(y, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def to_ss(model: nn.Module) -> nn.Module:
    """Replace every nn.Conv2d by a StandinSSConv (in place)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(model, name, StandinSSConv(child))
        else:
            to_ss(child)
    return model


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, and SS values away from (1, 0)."""
    gen = torch.Generator().manual_seed(seed)

    def u(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                u(m.running_mean, -1.0, 1.0)
                u(m.running_var, 0.3, 3.0)
                u(m.weight, 0.5, 1.5)
                u(m.bias, -0.5, 0.5)
            if hasattr(m, "ss_scale"):
                u(m.ss_scale, 0.5, 1.5)
                u(m.ss_shift, -0.3, 0.3)
    return model.eval()


def tiny_ss_model(seed: int = 0, channels: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(to_ss(StandinNet(channels)), seed)


def standin_factory(name: str, args: Any, state: Any) -> nn.Module:
    """A `model_factory` for export_checkpoint that knows the stand-in network."""
    if name != "standin":
        raise KeyError(f"unknown backbone {name!r}")
    net = StandinNet(int(args.get("channels", 3)))
    return to_ss(net) if any(k.endswith("ss_scale") for k in state) else net


def tiny_checkpoint(
    path: Path, size: int = 20, seed: int = 0, meta_stage: bool = True, **overrides: Any
) -> Path:
    """Save a stand-in checkpoint in the training stack's format and return its path."""
    model = tiny_ss_model(seed)
    ckpt: dict[str, Any] = {
        "format": "mtl-edge.checkpoint",
        "version": 1,
        "model": "standin",
        "model_args": {"channels": 3},
        "state_dict": model.state_dict(),
        "stage": "meta" if meta_stage else "pretrain",
        "preprocess": Preprocess(size=size).to_dict(),
        "config": {"seed": 7, "data": {"kind": "synthetic"}},
        "metrics": {"val_acc": torch.tensor(0.5), "split_fingerprint": "abc123"},
    }
    if meta_stage:
        gen = torch.Generator().manual_seed(seed)
        ckpt["fc_init"] = {"weight": torch.randn(5, 16, generator=gen), "bias": torch.zeros(5)}
    ckpt.update(overrides)
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------------------------------------
# Tests


def test_plain_conv_from_ss_applies_scale_and_shift() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    ss = randomize(StandinSSConv(conv), seed=3)
    plain = plain_conv_from_ss(ss)
    expected_w = conv.weight * ss.ss_scale  # Phi_S1 broadcast over the 3x3 kernel
    assert torch.allclose(plain.weight, expected_w)
    assert torch.allclose(plain.bias, conv.bias + ss.ss_shift)
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(plain(x), ss(x), atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("size", [12, 21, 32])
def test_fold_matches_ss_network(batch: int, size: int) -> None:
    model = tiny_ss_model(seed=batch + size)
    folded = fold_model(model)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    assert fold_error(model, folded, x) <= 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d | StandinSSConv) for m in folded.modules())
    # The original network is left untouched.
    assert any(isinstance(m, StandinSSConv) for m in model.modules())


def test_fold_on_real_images(shared_data: Path) -> None:
    from PIL import Image

    from mtl_edge.preprocess import preprocess_image

    folder = shared_data / "miniimagenet" / "train"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    files = sorted(next(p for p in sorted(folder.iterdir()) if p.is_dir()).glob("*.jpg"))[:6]
    cfg = Preprocess(size=32)
    x = torch.from_numpy(np.stack([preprocess_image(Image.open(f), cfg) for f in files]))
    model = tiny_ss_model(seed=1)
    assert fold_error(model, fold_model(model), x) <= 1e-5
    for name in _registered_backbones():
        from mtl_edge.train.backbones import create_backbone
        from mtl_edge.train.ss import convert_to_ss

        torch.manual_seed(0)
        net = randomize(convert_to_ss(create_backbone(name), shortcut=True))
        with torch.no_grad():
            scale = max(1.0, float(net.forward_features(x).abs().max()))
        assert fold_error(net, fold_model(net), x) <= 1e-5 * scale, name


def test_traced_pairs_skip_conv_with_two_consumers() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return (self.bn(y) + y).mean((2, 3))

    model = Branchy().eval()
    assert traced_conv_bn_pairs(model) == []
    with pytest.raises(MtlEdgeError, match="follows no conv"):
        fold_model(model)


def _registered_backbones() -> list[str]:
    try:
        from mtl_edge.train.backbones import backbone_names
    except ImportError:
        return []
    return backbone_names()


@pytest.mark.parametrize("ss", [False, True], ids=["plain", "ss"])
@pytest.mark.parametrize("name", _registered_backbones() or ["(registry absent)"])
def test_fold_every_registered_backbone(name: str, ss: bool) -> None:
    """Tiny inputs keep the big ResNets fast. Float32 error grows with the feature magnitude
    (random BN statistics make ResNet-25's features reach ~50), so the bound is 1e-5 relative
    to max(1, |features|)."""
    if name == "(registry absent)":
        pytest.skip("mtl_edge.train.backbones not present")
    from mtl_edge.train.backbones import create_backbone

    torch.manual_seed(0)
    model = create_backbone(name)
    if ss:
        convert_to_ss = pytest.importorskip("mtl_edge.train.ss").convert_to_ss
        model = convert_to_ss(model, shortcut=True)
    model = randomize(model)
    folded = fold_model(model)
    for batch, size in ((1, 20), (3, 28)):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            scale = max(1.0, float(model.forward_features(x).abs().max()))
        assert fold_error(model, folded, x) <= 1e-5 * scale
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not any(hasattr(m, "ss_scale") for m in folded.modules())
