"""Fold scaling-and-shifting (SS) and BatchNorm into plain convolutions.

After meta-transfer the SS parameters are fixed, so an SS conv computes an ordinary convolution
with W' = W * Phi_S1 (Phi_S1 of shape (out, in / groups, 1, 1), broadcast over the k x k kernel)
and b' = b + Phi_S2. A BatchNorm in eval mode is an affine map per channel, so it folds into the
conv before it: W'' = W' * g, b'' = (b' - mean) * g + beta with g = gamma / sqrt(var + eps).
The result is a plain ConvNet that exports to ONNX without Mul, Expand or BatchNormalization.
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

ConvBnPairs = list[tuple[nn.Conv2d, nn.BatchNorm2d]]


def is_ss_conv(module: nn.Module) -> bool:
    """True for an SS conv (`mtl_edge.train.ss.SSConv2d` or anything with its contract)."""
    return hasattr(module, "ss_scale") and hasattr(module, "effective_weight_and_bias")


def plain_conv_from_ss(ss: nn.Module) -> nn.Conv2d:
    """A plain `nn.Conv2d` (with bias) computing what the SS conv computes.

    Args:
        ss: a module with `effective_weight_and_bias()` -> (weight of shape
            (out, in / groups, k, k), bias of shape (out,) or None) and the usual conv
            attributes (stride, padding, dilation, groups, padding_mode).
    """
    conv_like: Any = ss
    with torch.no_grad():
        weight, bias = conv_like.effective_weight_and_bias()
    weight = weight.detach()
    out_ch, in_per_group, kh, kw = weight.shape
    groups = int(getattr(conv_like, "groups", 1))
    conv = nn.Conv2d(
        in_per_group * groups,
        out_ch,
        (kh, kw),
        stride=getattr(conv_like, "stride", 1),
        padding=getattr(conv_like, "padding", 0),
        dilation=getattr(conv_like, "dilation", 1),
        groups=groups,
        bias=True,
        padding_mode=getattr(conv_like, "padding_mode", "zeros"),
        device=weight.device,
        dtype=weight.dtype,
    )
    conv_bias: Any = conv.bias
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is None:
            conv_bias.zero_()
        else:
            conv_bias.copy_(bias.detach())
    return conv


def _replace_modules(model: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace, in place, every sub-module for which `replace` returns a module. Returns count."""
    count = 0
    for name, child in list(model.named_children()):
        new = replace(child)
        if new is not None:
            setattr(model, name, new)
            count += 1
        else:
            count += _replace_modules(child, replace)
    return count


def fold_ss(model: nn.Module) -> int:
    """Replace every SS conv in `model` (in place) by an equivalent plain conv. Returns count."""
    return _replace_modules(model, lambda m: plain_conv_from_ss(m) if is_ss_conv(m) else None)


def traced_conv_bn_pairs(model: nn.Module) -> ConvBnPairs:
    """(conv, bn) pairs where the conv's output feeds only that BatchNorm, found by tracing
    `model.forward_features` (or `forward`) with torch.fx."""
    import torch.fx

    class _Features(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fn = getattr(self.inner, "forward_features", self.inner.forward)
            return fn(x)

    try:
        graph = torch.fx.symbolic_trace(_Features(model)).graph
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable code
        raise MtlEdgeError(
            f"{type(model).__name__}: cannot find its conv -> BatchNorm pairs (not traceable: "
            f"{type(e).__name__}); give the backbone a conv_bn_pairs() entry"
        ) from None
    modules = dict(model.named_modules())
    pairs: ConvBnPairs = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target).removeprefix("inner.")
        bn = modules.get(target)
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        src = node.args[0]
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(str(src.target).removeprefix("inner."))
        if isinstance(conv, nn.Conv2d):
            pairs.append((conv, bn))
    return pairs


def registry_conv_bn_pairs(model: nn.Module) -> ConvBnPairs | None:
    """The backbone registry's `conv_bn_pairs(model)` for the registry's own backbones, or None
    (another network, or no training stack).

    The registry knows the pairs of SS networks too (its convs may be SS convs)."""
    if not type(model).__module__.startswith(("mtl_edge.train", "train.")):
        return None
    try:
        from mtl_edge.train.backbones import conv_bn_pairs
    except ImportError:
        return None
    return list(conv_bn_pairs(model))


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold `bn`'s eval-mode affine map into `conv` in place (float64 arithmetic)."""
    if bn.running_mean is None or bn.running_var is None:
        raise MtlEdgeError(
            "a BatchNorm without running statistics cannot be folded; train with "
            "track_running_stats=True"
        )
    with torch.no_grad():
        var = bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
        bias = (bias - bn.running_mean.double()) * scale + beta
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))


def fold_bn(model: nn.Module, pairs: ConvBnPairs | None = None) -> int:
    """Fold every BatchNorm into its conv and replace it by `nn.Identity` (in place).

    Args:
        pairs: the (conv, bn) pairs; None finds them (registry, else tracing).

    Raises:
        MtlEdgeError: a BatchNorm is left that follows no conv (the graph would keep it).
    """
    if pairs is None:
        pairs = registry_conv_bn_pairs(model)
    if pairs is None:
        pairs = traced_conv_bn_pairs(model)
    folded = {id(bn) for _, bn in pairs}
    for conv, bn in pairs:
        fold_bn_into_conv(conv, bn)
    _replace_modules(model, lambda m: nn.Identity() if id(m) in folded else None)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise MtlEdgeError(
            f"{type(model).__name__}: BatchNorm {left[0]} follows no conv and cannot be folded"
        )
    return len(pairs)


def fold_model(model: nn.Module) -> nn.Module:
    """A folded copy of `model` in eval mode: SS convs become plain convs, BatchNorms fold into
    them. `model` itself is left unchanged.

    The conv -> BN pairs come from the backbone registry (found on the SS network and mapped
    onto the plain convs that replace its SS convs), else from tracing the plain network.
    """
    folded = copy.deepcopy(model).eval()
    pairs = registry_conv_bn_pairs(folded)
    replaced: dict[int, nn.Conv2d] = {}

    def swap(m: nn.Module) -> nn.Module | None:
        if not is_ss_conv(m):
            return None
        conv = plain_conv_from_ss(m)
        replaced[id(m)] = conv
        return conv

    n_ss = _replace_modules(folded, swap)
    if pairs is not None:
        pairs = [(replaced.get(id(conv), conv), bn) for conv, bn in pairs]
    n_bn = fold_bn(folded, pairs)
    log.info("folded %d SS convs and %d BatchNorms", n_ss, n_bn)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


@torch.no_grad()
def fold_error(reference: nn.Module, folded: nn.Module, inputs: torch.Tensor) -> float:
    """Max abs difference of `forward_features` between two networks on `inputs` of shape
    (N, C, H, W); both are run in eval mode."""
    ref: Any = reference.eval()
    out: Any = folded.eval()
    a = ref.forward_features(inputs)
    b = out.forward_features(inputs)
    return float((a - b).abs().max())
