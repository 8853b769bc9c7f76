"""Deploy-time fusion: modules that can be folded fold themselves, one function walks them.

A module with a `fuse()` method returns a plain module computing the same map in eval mode:
`mtl_edge.train.ss.SSConv2d.fuse()` a plain conv holding W * Phi_S1 and b + Phi_S2, and
`mtl_edge.train.backbones.ConvBN.fuse()` that conv with its BatchNorm folded in
(W'' = W' * g, b'' = (b' - mean) * g + beta with g = gamma / sqrt(var + eps)). `fuse_model`
walks a network (as timm's `reparameterize_model` does) and replaces every such module, so
the exported network is a plain ConvNet with no Mul, Expand or BatchNormalization left.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtl_edge.errors import MtlEdgeError

log = logging.getLogger(__name__)


def replace_modules(model: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace, in place, every sub-module for which `replace` returns a module (its children
    are not visited then). Returns how many were replaced."""
    count = 0
    for name, child in list(model.named_children()):
        new = replace(child)
        if new is not None:
            setattr(model, name, new)
            count += 1
        else:
            count += replace_modules(child, replace)
    return count


def fuse_model(model: nn.Module) -> nn.Module:
    """A fused copy of `model` in eval mode with frozen weights; `model` is left unchanged.

    Raises:
        MtlEdgeError: a BatchNorm or scale-and-shift conv is left that no `fuse()` covered.
    """
    fused = copy.deepcopy(model).eval()
    count = replace_modules(fused, lambda m: m.fuse() if hasattr(m, "fuse") else None)
    left = [
        n
        for n, m in fused.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or hasattr(m, "ss_scale")
    ]
    if left:
        raise MtlEdgeError(
            f"{type(model).__name__}: {left[0]} cannot be folded (no fuse() covers it); give "
            "its block a fuse() method"
        )
    log.info("fused %d modules of %s", count, type(model).__name__)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


@torch.no_grad()
def fuse_error(reference: nn.Module, fused: nn.Module, inputs: torch.Tensor) -> float:
    """Max abs difference of `forward_features` of two networks on `inputs` of shape
    (N, C, H, W), both in eval mode."""
    ref: Any = reference.eval()
    out: Any = fused.eval()
    return float((ref.forward_features(inputs) - out.forward_features(inputs)).abs().max())
