"""Backbones by name: ResNet-12 (paper TF code), ResNet-12-wide, ResNet-25 (official PyTorch
code) and Conv-4.

Every backbone maps images of shape (B, C, H, W) to features of shape (B, feature_dim) through
`forward_features` (`forward` is the same), ends with an adaptive average pool (any input size
that survives the network's down-sampling), and carries `model_args`, the JSON-able keyword
arguments that rebuild it with `create_backbone(name, **model_args)`.

Every convolution sits in a `ConvBN` module, immediately followed by its BatchNorm; `ConvBN.fuse()`
folds the pair (also after the conv was replaced by an SS conv, `mtl_edge.train.ss.convert_to_ss`)
and `mtl_edge.train.fuse.fuse_model` walks a network doing so before export.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.errors import ConfigError

#: model_args key recorded by `mtl_edge.train.ss.convert_to_ss`; it describes the SS conversion,
#: not the plain network, so `create_backbone` accepts and ignores it.
SS_ARG_KEYS = ("ss_shortcut",)


class ConvBN(nn.Module):
    """A convolution immediately followed by its BatchNorm (no activation).

    Attributes:
        conv: an `nn.Conv2d` (or, after SS conversion, an SS conv with the same interface).
        bn: the `nn.BatchNorm2d` over the conv's output channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv: nn.Module = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=bias,
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H / stride, W / stride)."""
        return self.bn(self.conv(x))

    def fuse(self) -> nn.Conv2d:
        """One plain conv computing this block in eval mode: the conv (an SS conv fused first)
        with the BatchNorm's running statistics and affine map folded in (float64)."""
        conv = self.conv.fuse() if hasattr(self.conv, "fuse") else copy.deepcopy(self.conv)
        bn = self.bn
        if bn.running_mean is None or bn.running_var is None:
            raise ConfigError("a BatchNorm without running statistics cannot be folded")
        with torch.no_grad():
            var = bn.running_var.double()
            gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
            beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
            scale = gamma / torch.sqrt(var + bn.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
            weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
            bias = (bias - bn.running_mean.double()) * scale + beta
            conv.weight.copy_(weight.to(conv.weight.dtype))
            if conv.bias is None:
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
            else:
                conv.bias.copy_(bias.to(conv.bias.dtype))
        return conv


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as both official codes), unit BN scale, zero shifts."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """Base class: `forward` is `forward_features`; subclasses set the attributes below.

    Attributes:
        feature_dim: D, the size of the feature vector.
        in_channels: C, the number of input channels.
        model_args: JSON-able kwargs that rebuild this network through `create_backbone`.
        name: the registry name.
    """

    feature_dim: int
    in_channels: int
    model_args: dict[str, Any]
    name: str

    def _describe(self, in_channels: int, feature_dim: int, **model_args: Any) -> None:
        """Record what rebuilds this network (`model_args`) and initialise its weights."""
        self.in_channels, self.feature_dim = in_channels, feature_dim
        self.model_args = {"in_channels": in_channels, **model_args}
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images of shape (B, C, H, W) -> features of shape (B, feature_dim)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as `forward_features`: (B, C, H, W) -> (B, feature_dim)."""
        return self.forward_features(x)


# ---------------------------------------------------------------------------------------------
# ResNet-12 (the paper's TensorFlow code)


class ResNet12Block(nn.Module):
    """The TF code's residual block: 3 x [conv3x3 (+bias) -> BN -> LeakyReLU], plus a 1x1 conv
    (no bias) + BN shortcut, added after the third activation, then a 2x2 max-pool (no
    activation after the sum, as in the TF code). (B, in, H, W) -> (B, out, H // 2, W // 2)."""

    def __init__(self, in_channels: int, out_channels: int, slope: float, bias: bool) -> None:
        super().__init__()
        self.slope = slope
        self.conv1 = ConvBN(in_channels, out_channels, 3, bias=bias)
        self.conv2 = ConvBN(out_channels, out_channels, 3, bias=bias)
        self.conv3 = ConvBN(out_channels, out_channels, 3, bias=bias)
        self.shortcut = ConvBN(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), self.slope)
        out = F.leaky_relu(self.conv2(out), self.slope)
        out = F.leaky_relu(self.conv3(out), self.slope) + self.shortcut(x)
        return F.max_pool2d(out, 2)


class ResNet12(Backbone):
    """ResNet-12: 4 residual blocks (`ResNet12Block`) and a global average pool.

    Args:
        in_channels: input channels (3 for RGB, 1 for grey-scale).
        widths: output channels of the 4 blocks; (64, 128, 256, 512) in the paper's TF code,
            (64, 160, 320, 640) in `resnet12-wide`.
        slope: negative slope of the LeakyReLU (0.1 in the TF code).
        bias: the 3x3 convs carry a bias, as in the TF code (redundant before BN, harmless,
            folded away at export). The shortcut conv has none, as there.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        slope: float = 0.1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(widths, str) or not all(isinstance(w, int) for w in widths):
            raise ConfigError(
                f"resnet12 widths={widths!r}: give 4 channel counts as a list, "
                "e.g. widths=[48,96,192,384]"
            )
        widths = list(widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ConfigError(f"resnet12 widths={widths}: give 4 positive channel counts")
        blocks = []
        prev = in_channels
        for w in widths:
            blocks.append(ResNet12Block(prev, w, slope, bias))
            prev = w
        self.blocks = nn.Sequential(*blocks)
        self._describe(in_channels, widths[-1], widths=widths, slope=slope, bias=bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images of shape (B, C, H, W), H and W >= 16 -> features of shape (B, widths[-1])."""
        return F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1)


# ---------------------------------------------------------------------------------------------
# ResNet-25 (the official PyTorch code's ResNetMtl)


class BasicBlock(nn.Module):
    """[conv3x3 (stride s) -> BN -> ReLU -> conv3x3 -> BN] + shortcut, ReLU. The shortcut is a
    1x1 conv + BN when the shape changes, else the identity.
    (B, in, H, W) -> (B, out, H / s, W / s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride=stride)
        self.conv2 = ConvBN(out_channels, out_channels, 3)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvBN(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


class ResNet25(Backbone):
    """The 25-layer ResNet of the official MTL PyTorch code: a conv3x3 stem (with bias, as
    there) -> BN -> ReLU, then 3 stages of `blocks` basic blocks, the first of each with
    stride 2, and a global average pool (the official code pools a fixed 10x10 window, which
    equals the global pool at 80x80 inputs).

    Args:
        in_channels: input channels.
        stem: stem channels (80).
        widths: channels of the 3 stages (160, 320, 640).
        blocks: basic blocks per stage (4).
    """

    def __init__(
        self,
        in_channels: int = 3,
        stem: int = 80,
        widths: Sequence[int] = (160, 320, 640),
        blocks: int = 4,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 3 or min(widths) < 1 or blocks < 1 or stem < 1:
            raise ConfigError(
                f"resnet25 widths={widths}, blocks={blocks}, stem={stem}: give 3 positive "
                "stage widths, blocks >= 1 and stem >= 1"
            )
        self.stem = ConvBN(in_channels, stem, 3, bias=True)
        stages = []
        prev = stem
        for w in widths:
            layer = [BasicBlock(prev, w, 2)] + [BasicBlock(w, w, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
            prev = w
        self.stages = nn.Sequential(*stages)
        self._describe(in_channels, widths[-1], stem=stem, widths=widths, blocks=blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images of shape (B, C, H, W) -> features of shape (B, widths[-1])."""
        x = self.stages(F.relu(self.stem(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# ---------------------------------------------------------------------------------------------
# Conv-4


class Conv4(Backbone):
    """4 x [conv3x3 -> BN -> ReLU -> 2x2 max-pool] and a global average pool.

    The classic Conv-4 flattens the last map (1600-d at 84x84 with width 64); here it is
    average-pooled like every other backbone, so features are `width`-d at any input size.

    Args:
        in_channels: 1 (Omniglot) or 3.
        width: channels of every layer (32 or 64 in the literature).
        bias: convs carry a bias (as the ProtoNet/MAML Conv-4; folded away at export).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, bias: bool = True) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"conv4 width={width}: must be >= 1 (32 or 64 are usual)")
        layers = []
        prev = in_channels
        for _ in range(4):
            layers.append(ConvBN(prev, width, 3, bias=bias))
            prev = width
        self.layers = nn.ModuleList(layers)
        self._describe(in_channels, width, width=width, bias=bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images of shape (B, C, H, W), H and W >= 16 -> features of shape (B, width)."""
        for layer in self.layers:
            x = F.max_pool2d(F.relu(layer(x)), 2)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# ---------------------------------------------------------------------------------------------
# Registry


def _resnet12_wide(
    in_channels: int = 3,
    widths: Sequence[int] = (64, 160, 320, 640),
    slope: float = 0.1,
    bias: bool = True,
) -> ResNet12:
    return ResNet12(in_channels=in_channels, widths=widths, slope=slope, bias=bias)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet12": ResNet12,
    "resnet12-wide": _resnet12_wide,
    "resnet25": ResNet25,
    "conv4": Conv4,
}


def backbone_names() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(BACKBONES)


def create_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build backbone `name` with keyword options (e.g. the `model_args` of a checkpoint).

    Keys in `SS_ARG_KEYS` are accepted and ignored (they describe the SS conversion).

    Raises:
        ConfigError: unknown name, unknown option or a bad value.
    """
    if name not in BACKBONES:
        raise ConfigError(
            f"backbone {name!r} is unknown; use one of: {', '.join(backbone_names())}"
        )
    factory = BACKBONES[name]
    kwargs = {k: v for k, v in kwargs.items() if k not in SS_ARG_KEYS}
    allowed = [p for p in inspect.signature(factory).parameters if p != "kwargs"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"backbone {name!r}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(allowed)}"
        )
    in_channels = kwargs.get("in_channels", 3)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"backbone {name!r}: in_channels={in_channels!r} must be 1 or 3")
    model = factory(**kwargs)
    model.name = name
    return model
