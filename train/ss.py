"""Scaling and shifting (SS) of a pre-trained network's convolutions (Sun et al., CVPR 2019).

An SS conv keeps the pre-trained weight W and bias b as frozen buffers and learns a scale
Phi_S1 of shape (out, in / groups, 1, 1), initialised to 1 and broadcast over the k x k kernel,
and a shift Phi_S2 of shape (out,), initialised to 0. It computes the convolution with
W' = W * Phi_S1 and b' = b + Phi_S2, so right after conversion it computes exactly what the
plain conv did, and after meta-training it folds into a plain conv (`fuse`).

BatchNorm during meta-transfer (`set_bn_mode`):

- "frozen" (default): every BN uses its pre-trained running statistics and its affine
  parameters are not trained; only SS (and the FC) learn. Reasons: the network that is
  meta-trained and validated is then exactly the one that is folded and deployed (eval-mode BN
  folds into the convs; batch statistics cannot), and a 5-way 1-shot support set of 5 images
  gives useless batch statistics. Neither official code does exactly this: the TF code leaves
  BN affine untrained too but normalises with batch statistics, at meta-test as well
  (transductive over the query set); the PyTorch code trains BN.
- "train": BN in training mode while meta-training (batch statistics, running statistics
  updated) with trainable affine parameters, as the official PyTorch code does (its encoder
  runs in `train()` mode and every parameter with requires_grad goes to the SS optimizer);
  evaluation uses the running statistics.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.errors import ConfigError
from mtl_edge.train.fuse import replace_modules

BnMode = Literal["frozen", "train"]
BN_MODES = ("frozen", "train")


class SSConv2d(nn.Module):
    """A conv with frozen W, b and learnable scale `ss_scale` (Phi_S1) and shift `ss_shift`
    (Phi_S2). Maps (B, in, H, W) -> (B, out, H', W') like the conv it was built from.

    Args:
        conv: the plain `nn.Conv2d` to wrap; its weight and bias are copied into buffers
            (a conv without bias gets a zero bias buffer). Only zero padding is supported.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    kernel_size: Any
    stride: Any
    padding: Any
    dilation: Any

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ConfigError(
                f"SS conversion: padding_mode={conv.padding_mode!r} is not supported; "
                "use zero padding"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        w = conv.weight.detach().clone()
        b = torch.zeros_like(w[:, 0, 0, 0]) if conv.bias is None else conv.bias.detach().clone()
        self.register_buffer("weight", w)
        self.register_buffer("bias", b)
        out_ch, in_per_group = w.shape[:2]
        self.ss_scale = nn.Parameter(
            torch.ones(out_ch, in_per_group, 1, 1, dtype=w.dtype, device=w.device)
        )
        self.ss_shift = nn.Parameter(torch.zeros(out_ch, dtype=w.dtype, device=w.device))

    def effective_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W * Phi_S1 of shape (out, in / groups, k, k), b + Phi_S2 of shape (out,))."""
        return self.weight * self.ss_scale, self.bias + self.ss_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H', W')."""
        w, b = self.effective_weight_and_bias()
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def fuse(self) -> nn.Conv2d:
        """A plain `nn.Conv2d` (with bias) holding W * Phi_S1 and b + Phi_S2: the same map."""
        w, b = self.effective_weight_and_bias()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)  # type: ignore[union-attr]
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}"
        )


def _is_shortcut(conv: nn.Conv2d) -> bool:
    """In the registry backbones every 1x1 conv is a residual shortcut (projection)."""
    return tuple(conv.kernel_size) == (1, 1)


def convert_to_ss(model: nn.Module, shortcut: bool = True) -> nn.Module:
    """Replace, in place, every `nn.Conv2d` of `model` by an `SSConv2d` built from it.

    Outputs are unchanged right after conversion (Phi_S1 = 1, Phi_S2 = 0).

    Args:
        shortcut: also convert the 1x1 shortcut convs (True, as the official PyTorch code, where
            the downsample conv is a Conv2dMtl too); False leaves them plain (they are then
            frozen by `freeze_backbone` like everything else but SS).

    Returns:
        `model` itself. Its `model_args` (when present) records `ss_shortcut` so a checkpoint
        can be rebuilt with the same conversion.
    """

    def walk(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d):
                if shortcut or not _is_shortcut(child):
                    setattr(module, name, SSConv2d(child))
            else:
                walk(child)

    walk(model)
    args: Any = getattr(model, "model_args", None)
    if isinstance(args, dict):
        args["ss_shortcut"] = shortcut
    return model


def ss_modules(model: nn.Module) -> list[SSConv2d]:
    """The SS convs of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, SSConv2d)]


def ss_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every Phi_S1 and Phi_S2 of `model` (scale then shift per conv, in module order)."""
    params: list[nn.Parameter] = []
    for m in ss_modules(model):
        params += [m.ss_scale, m.ss_shift]
    return params


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_backbone(model: nn.Module) -> None:
    """requires_grad False on every parameter of `model` except the SS parameters."""
    keep = {id(p) for p in ss_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def set_bn_mode(model: nn.Module, mode: str = "frozen") -> None:
    """Put every BatchNorm of `model` in `mode` ("frozen" or "train", see the module docstring).

    "frozen" switches the BNs to eval mode and stops gradients to their affine parameters;
    "train" lets them follow the model's train/eval mode (batch statistics while training,
    running statistics in evaluation) and makes their affine parameters trainable. The mode is
    remembered in `model.bn_mode`; note that `model.train()` puts BNs back into train mode, so
    call this again after it (`MetaTransferLearner.train` does).

    Raises:
        ConfigError: an unknown mode.
    """
    if mode not in BN_MODES:
        raise ConfigError(f"bn_mode={mode!r}: use one of {', '.join(BN_MODES)}")
    frozen = mode == "frozen"
    for bn in bn_modules(model):
        bn.train(not frozen and model.training)
        for p in (bn.weight, bn.bias):
            if p is not None:
                p.requires_grad_(not frozen)
    model.bn_mode = mode  # type: ignore[assignment]


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every BatchNorm of `model` (gamma then beta per BN)."""
    params: list[nn.Parameter] = []
    for bn in bn_modules(model):
        params += [p for p in (bn.weight, bn.bias) if p is not None]
    return params


def revert_ss(model: nn.Module) -> nn.Module:
    """Replace, in place, every SS conv by its `fuse()`d plain conv (so every weight is
    trainable again, e.g. for the fine-tune-everything ablation); BatchNorms stay. Returns
    `model`."""
    replace_modules(model, lambda m: m.fuse() if isinstance(m, SSConv2d) else None)
    return model
