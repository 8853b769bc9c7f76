"""The FC base-learner of MTL and its inner loop, in PyTorch.

Full-batch gradient descent w <- w - lr * grad on the mean cross-entropy of the support set, no
momentum, and weight decay only when asked (the coefficient of 0.5 * ||W||^2; the bias is not
decayed); the device's numpy head (`mtl_edge.fewshot.fc.fit_head`) reproduces it within 1e-4.
Two implementations of the same update (`meta.inner_loop`):

- `batched_inner_loop` (default): the tasks of a meta-batch together, features (T, n, D), with
  the gradient of the softmax cross-entropy in closed form,

      G = (softmax(X W^T + b) - Y) / n,   dW = G^T X + weight_decay * W,   db = sum_n G,

  so each step is a few batched kernels (baddbmm, softmax, bmm) for all tasks at once instead
  of one autograd round trip per task (what made the GPU launch bound: T=100 steps x tasks);
- `inner_loop`: one task through `torch.autograd.grad` at every step, as both official codes
  do. It is the reference the batched loop is tested against (same fast weights and the same
  meta-gradients, first and second order, to 1e-5) and what `bench train --modes fp32+loop`
  times the batched loop against.

First- versus second-order (what the outer gradient sees):

- second order (`create_graph=True`): every inner gradient is part of the autograd graph, so the
  query loss differentiates through all T steps, into the FC initialisation and, through the
  support features, into the encoder (the TF code's setting).
- first order (`create_graph=False`, the official PyTorch code's setting): every inner gradient
  is a constant. The fast weights are w_T = w_0 - lr * (g_0 + ... + g_{T-1}) with the g_t
  detached, so d w_T / d w_0 is the identity ("straight-through") and the support features do
  not reach the outer gradient at all; the encoder (SS) learns from the query features only.
  The support features are detached for that reason, which also saves their backward pass.

In the batched loop, second order is the closed form evaluated with autograd recording (its
derivative is the same second-order term create_graph=True gives); first order runs the loop
without recording and adds the update to the initialisation as a constant.
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


def batched_inner_loop(
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
    """`inner_loop` for T tasks at once, with the closed-form gradient (module docstring).

    Args:
        features: support features of shape (T, n, D), float32.
        labels: int64 episode labels of shape (T, n), values in [0, ways).
        weight: initial weight of shape (ways, D) (shared by the tasks) or (T, ways, D).
        bias: initial bias of shape (ways,) or (T, ways).
        steps, lr, create_graph, normalize, weight_decay: as `inner_loop`.

    Returns:
        (fast weights (T, ways, D), fast biases (T, ways)), connected to the initialisation
        like `inner_loop`'s (identity in first order, full path in second order) when it
        requires grad and grad is enabled; plain tensors otherwise.
    """
    if steps < 0 or lr <= 0:
        raise ValueError(f"inner loop: need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if features.ndim != 3 or labels.shape != features.shape[:2]:
        raise ValueError(
            f"batched inner loop: features (T, n, D) and labels (T, n), got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    tasks, n, dim = features.shape
    ways = weight.shape[-2]
    if normalize:
        features = F.normalize(features, dim=2, eps=1e-12)
    tracked = torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad)
    record = tracked and create_graph
    w0 = weight.expand(tasks, ways, dim)
    b0 = bias.expand(tasks, ways)
    onehot = F.one_hot(labels, ways).to(features.dtype)
    with torch.set_grad_enabled(record):
        x = features if record else features.detach()
        w, b = (w0, b0) if record else (w0.detach(), b0.detach())
        for _ in range(steps):
            logits = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # (T, n, ways)
            g = (torch.softmax(logits, dim=2) - onehot) / n
            grad_w = torch.bmm(g.transpose(1, 2), x)  # (T, ways, D)
            if weight_decay:
                grad_w = grad_w + weight_decay * w
            w = w - lr * grad_w
            b = b - lr * g.sum(dim=1)
    if record:
        return w, b
    if tracked:  # first order: d w_T / d w_0 is the identity
        return w0 + (w - w0.detach()), b0 + (b - b0.detach())
    return w, b
