"""Fusing SS and BatchNorm into plain convs gives the same features as the SS network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import randomize, tiny_ss_model
from torch import nn

from mtl_edge.errors import MtlEdgeError
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.backbones import ConvBN, backbone_names, create_backbone
from mtl_edge.train.fuse import fuse_error, fuse_model
from mtl_edge.train.ss import SSConv2d, convert_to_ss


def test_ss_conv_fuses_scale_and_shift() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    ss = randomize(SSConv2d(conv), seed=3)
    plain = ss.fuse()
    assert type(plain) is nn.Conv2d
    assert torch.allclose(plain.weight, conv.weight * ss.ss_scale)  # Phi_S1 over the kernel
    assert torch.allclose(plain.bias, conv.bias + ss.ss_shift)
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(plain(x), ss(x), atol=1e-6)


def test_conv_bn_fuses_into_one_conv() -> None:
    block = randomize(ConvBN(3, 5, 3, bias=False), seed=1)
    x = torch.randn(2, 3, 7, 7)
    fused = block.fuse()
    assert type(fused) is nn.Conv2d and fused.bias is not None
    assert torch.allclose(fused(x), block(x), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("size", [16, 21, 32])
def test_fuse_matches_ss_network(batch: int, size: int) -> None:
    model = tiny_ss_model(seed=batch + size)
    fused = fuse_model(model)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        scale = max(1.0, float(model.forward_features(x).abs().max()))
    assert fuse_error(model, fused, x) <= 1e-5 * scale
    assert not any(isinstance(m, nn.BatchNorm2d | SSConv2d | ConvBN) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    # The original network is left untouched.
    assert any(isinstance(m, SSConv2d) for m in model.modules())


def test_a_batchnorm_no_fuse_covers_is_refused() -> None:
    class Loose(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)).mean((2, 3))

    with pytest.raises(MtlEdgeError, match="bn cannot be folded"):
        fuse_model(Loose())


def test_fuse_on_real_images(shared_data: Path) -> None:
    from PIL import Image

    from mtl_edge.preprocess import preprocess_image

    folder = shared_data / "miniimagenet" / "train"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    files = sorted(next(p for p in sorted(folder.iterdir()) if p.is_dir()).glob("*.jpg"))[:6]
    cfg = Preprocess(size=32)
    x = torch.from_numpy(np.stack([preprocess_image(Image.open(f), cfg) for f in files]))
    model = tiny_ss_model(seed=1)
    with torch.no_grad():
        scale = max(1.0, float(model.forward_features(x).abs().max()))
    assert fuse_error(model, fuse_model(model), x) <= 1e-5 * scale


@pytest.mark.parametrize("ss", [False, True], ids=["plain", "ss"])
@pytest.mark.parametrize("name", backbone_names())
def test_fuse_every_registered_backbone(name: str, ss: bool) -> None:
    """Tiny inputs keep the big ResNets fast. Float32 error grows with the feature magnitude
    (random BN statistics make ResNet-25's features reach ~50), so the bound is 1e-5 relative
    to max(1, |features|)."""
    torch.manual_seed(0)
    model = create_backbone(name)
    if ss:
        model = convert_to_ss(model, shortcut=True)
    model = randomize(model)
    fused = fuse_model(model)
    for batch, size in ((1, 20), (3, 28)):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            scale = max(1.0, float(model.forward_features(x).abs().max()))
        assert fuse_error(model, fused, x) <= 1e-5 * scale
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not any(hasattr(m, "ss_scale") for m in fused.modules())
