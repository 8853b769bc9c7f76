"""The matrix work a training stage actually did, for its achieved FLOP/s.

FLOPs are 2 x multiply-accumulates of convolutions and linear layers (the matrix units' work;
BatchNorm, activations and pooling are not counted), per image at the model's input size,
counted on the network as the stage trains it:

- forward: every conv and linear layer;
- backward, input gradients: the layers whose input requires grad (not the first conv, whose
  input is the image);
- backward, weight gradients: the layers with a trainable weight. In meta-transfer the conv
  weights are frozen, but the SS scale Phi_S1 multiplies them (W' = W * Phi_S1), so autograd
  still runs the weight-gradient convolution for dL/dW' and reduces it to the per-channel
  dL/dPhi_S1: it is counted, because it is done. A conv left plain (`ss_shortcut = false`) has
  no weight-gradient pass.

Per stage (`stage_flops`), from the work the stage reports (`work` of `pretrain` and
`meta_train`): pre-training is forward + backward of every training image through backbone and
classifier, plus the forward passes of validation; meta-transfer is, per task, the support images
forward only in first order (their features are detached) or forward + backward in second order,
the query images forward + backward, the FC inner loop (T steps of two (n x ways x D) products,
three times that in second order for the backward through the loop) and the query logits, plus
the validation forward passes. `tests/test_flops.py` checks the counts by hand on a small net and
against `torch.utils.flop_counter` on real steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.config import Recipe
from mtl_edge.train.ss import SSConv2d, convert_to_ss, freeze_backbone, set_bn_mode


@dataclass(frozen=True)
class LayerCost:
    """One conv or linear layer's FLOPs for one image.

    Attributes:
        name: the module's name.
        forward: FLOPs of its forward pass (2 x MACs).
        input_grad: its input requires grad (the backward computes the input gradient).
        weight_grad: its weight (or SS scale) is trained (the backward computes dL/dW).
    """

    name: str
    forward: float
    input_grad: bool
    weight_grad: bool


def layer_costs(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerCost]:
    """The conv and linear layers of `model` as it is set up (requires_grad flags as trained),
    from one forward pass of a batch of 1 of shape (1, *input_shape) with grad enabled."""
    costs: list[LayerCost] = []
    names = {m: n for n, m in model.named_modules()}

    def trained(mod: nn.Module) -> bool:
        if isinstance(mod, SSConv2d):
            return mod.ss_scale.requires_grad
        return bool(getattr(mod, "weight", None) is not None and mod.weight.requires_grad)

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            macs = out.numel() * mod.in_features
        else:
            kh, kw = mod.kernel_size  # type: ignore[misc]
            macs = out.numel() * (mod.in_channels // mod.groups) * kh * kw  # type: ignore[operator]
        costs.append(LayerCost(names[mod], 2.0 * macs, bool(inp[0].requires_grad), trained(mod)))

    handles = [
        m.register_forward_hook(hook)  # type: ignore[arg-type]
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | SSConv2d)
    ]
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()  # BN running statistics stay as they are
    try:
        with torch.enable_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return costs


def image_flops(costs: list[LayerCost], backward: bool) -> float:
    """FLOPs of one image: forward, plus the backward's input and weight gradients."""
    total = sum(c.forward for c in costs)
    if backward:
        total += sum(c.forward for c in costs if c.input_grad)
        total += sum(c.forward for c in costs if c.weight_grad)
    return total


def pretrain_network(model: str, model_args: dict[str, Any], classes: int) -> nn.Module:
    """Backbone + linear classifier, every parameter trained (pre-training)."""
    backbone = create_backbone(model, **model_args)
    return nn.Sequential(backbone, nn.Linear(int(backbone.feature_dim), classes))


def meta_encoder(model: str, model_args: dict[str, Any], cfg: Recipe) -> nn.Module:
    """The SS encoder as meta-transfer trains it: SS convs (shortcuts by `meta.ss_shortcut`),
    everything else frozen, BN by `meta.bn_mode`."""
    encoder = convert_to_ss(create_backbone(model, **model_args), shortcut=cfg.meta.ss_shortcut)
    freeze_backbone(encoder)
    set_bn_mode(encoder, cfg.meta.bn_mode)
    return encoder


def stage_flops(
    stage: str,
    model: str,
    model_args: dict[str, Any],
    cfg: Recipe,
    input_shape: tuple[int, int, int],
    work: dict[str, int],
) -> dict[str, float]:
    """The FLOPs a stage did (module docstring).

    Args:
        stage: "pretrain" or "meta".
        model, model_args: the registry backbone.
        cfg: the recipe the stage ran (meta settings: ways, order, steps, shortcut, BN).
        input_shape: (C, H, W) of the training images.
        work: pretrain {"train_images", "eval_images", "classes" (the classifier's outputs)};
            meta {"tasks", "support_images", "query_images", "eval_images"}.

    Returns:
        {"total", "forward_per_image", "train_per_image", by part: "train", "support",
        "query", "inner_loop", "eval"} in FLOPs.
    """
    if stage == "pretrain":
        net = pretrain_network(model, model_args, int(work.get("classes", 64)))
        costs = layer_costs(net, input_shape)
        backbone_fwd = image_flops([c for c in costs if c.name != "1"], False)  # no classifier
        train = image_flops(costs, True)
        parts = {
            "train": train * work.get("train_images", 0),
            "eval": backbone_fwd * work.get("eval_images", 0),
        }
        return {
            "total": sum(parts.values()),
            "forward_per_image": image_flops(costs, False),
            "train_per_image": train,
            **parts,
        }
    if stage != "meta":
        raise ValueError(f"stage_flops: stage {stage!r} is not pretrain or meta")
    m = cfg.meta
    encoder = meta_encoder(model, model_args, cfg)
    costs = layer_costs(encoder, input_shape)
    fwd, train = image_flops(costs, False), image_flops(costs, True)
    dim = int(getattr(encoder, "feature_dim"))  # noqa: B009 - registry attribute
    n_s, n_q = m.ways * m.shots, m.ways * m.queries
    loop = m.inner_steps * 4.0 * n_s * m.ways * dim + 2.0 * n_q * m.ways * dim
    if m.second_order:
        loop *= 3.0
    parts = {
        "support": (train if m.second_order else fwd) * work.get("support_images", 0),
        "query": train * work.get("query_images", 0),
        "inner_loop": loop * work.get("tasks", 0),
        "eval": fwd * work.get("eval_images", 0),
    }
    summary = {"total": sum(parts.values()), "forward_per_image": fwd, "train_per_image": train}
    return summary | parts
