"""The FC base-learner of MTL and its inner loop, in PyTorch.

This is the reference the device's numpy head (`mtl_edge.fewshot.fc.fit_head`) reproduces within
1e-4, so it stays plain: full-batch gradient descent w <- w - lr * grad on the mean
cross-entropy of the support set, no momentum, and weight decay only when asked (the coefficient
of 0.5 * ||W||^2; the bias is not decayed).

First- versus second-order (what the outer gradient sees):

- second order (`create_graph=True`): every inner gradient is part of the autograd graph, so the
  query loss differentiates through all T steps, into the FC initialisation and, through the
  support features, into the encoder (the TF code's setting).
- first order (`create_graph=False`, the official PyTorch code's setting): every inner gradient
  is a constant. The fast weights are w_T = w_0 - lr * (g_0 + ... + g_{T-1}) with the g_t
  detached, so d w_T / d w_0 is the identity ("straight-through") and the support features do
  not reach the outer gradient at all; the encoder (SS) learns from the query features only.
  The support features are detached for that reason, which also saves their backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fc_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits of shape (N, ways) for features (N, D), weight (ways, D), bias (ways,)."""
    return F.linear(features, weight, bias)


def inner_loop(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    steps: int,
    lr: float,
    create_graph: bool = False,
    normalize: bool = False,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T steps of gradient descent of the FC head on the support set.

    Args:
        features: support features of shape (N, D).
        labels: int64 episode labels of shape (N,), values in [0, ways).
        weight: initial weight of shape (ways, D) (e.g. the meta-learned `fc_weight`).
        bias: initial bias of shape (ways,).
        steps: T (0 returns the initialisation).
        lr: inner learning rate alpha.
        create_graph: second order (True) or first order (False); see the module docstring.
        normalize: L2-normalise the features first (the device head's `normalize`).
        weight_decay: coefficient of 0.5 * ||W||^2 added to the loss.

    Returns:
        (fast weight (ways, D), fast bias (ways,)). When the initialisation requires grad they
        stay connected to it (identity path in first order, full path in second order).
        Works under `torch.no_grad()` too (gradients are enabled locally).
    """
    if steps < 0 or lr <= 0:
        raise ValueError(f"inner loop: need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if normalize:
        features = F.normalize(features, dim=1, eps=1e-12)
    if not create_graph:
        features = features.detach()
    tracked = torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad)
    with torch.enable_grad():
        # a tensor the caller does not differentiate becomes a local leaf the loop can descend
        w = weight if tracked and weight.requires_grad else weight.detach().requires_grad_(True)
        b = bias if tracked and bias.requires_grad else bias.detach().requires_grad_(True)
        for _ in range(steps):
            loss = F.cross_entropy(fc_logits(features, w, b), labels)
            if weight_decay:
                loss = loss + 0.5 * weight_decay * (w * w).sum()
            grad_w, grad_b = torch.autograd.grad(loss, (w, b), create_graph=create_graph)
            w = w - lr * grad_w
            b = b - lr * grad_b
    if not tracked:
        return w.detach(), b.detach()
    return w, b
