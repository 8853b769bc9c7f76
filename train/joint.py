"""Joint transfer + meta-learning (Eshratifar, Abrishami, Eigen, Pedram, AAAI-19 student abstract).

Each meta-iteration samples a meta-batch of N-way tasks and computes two proposals for the
backbone weights theta:

- the meta step: Reptile (pseudo-gradient sum_i (theta - theta_i), theta_i after k inner SGD
  steps on the task's images) or MAML (sum_i of the query-loss gradient at theta_i, first or
  second order, through `torch.func.functional_call`), applied by the outer optimizer;
- the transfer step: one step of ordinary classification over all base classes on all images of
  the sampled tasks, through a base-class head of its own, applied by a second optimizer.

`mix="paper"` sets theta = beta * theta_meta + (1 - beta) * theta_transfer; `mix="code"` is the
variant of the authors' code: theta + (delta_meta + beta * delta_transfer) / 2. With
`mix="paper"`, beta = 1 is plain Reptile/MAML and beta = 0 plain transfer learning; the step
whose weight is 0 is not computed at all.

The task head is not meta-learned: every task starts from a fresh (ways, D) head (`head_init`:
zeros, or the support set's prototypes), so the same initialisation serves tasks of any number
of ways (at training and at evaluation time).

BatchNorm: every training forward (inner loops, query, transfer) runs in train mode on the batch
statistics of its own images and updates the running averages; evaluation and export use the
running averages (non-transductive, the same numbers the exported, BN-folded bundle computes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mtl_edge.data.episodes import Episode
from mtl_edge.errors import ConfigError
from mtl_edge.train.joint_batched import Batched, TaskBatch, batch_reason
from mtl_edge.train.joint_graphs import GraphedGradients
from mtl_edge.train.stage_config import JointConfig

log = logging.getLogger(__name__)


def support_labels(episode: Episode) -> torch.Tensor:
    """Episode labels 0..ways-1 of the support set, shape (ways * shots,)."""
    return torch.from_numpy(episode.support_labels())


def query_labels(episode: Episode) -> torch.Tensor:
    """Episode labels 0..ways-1 of the query set, shape (ways * queries,)."""
    return torch.from_numpy(episode.query_labels())


def all_indices(episode: Episode) -> np.ndarray:
    """Support then query sample indices, shape (ways * (shots + queries),)."""
    return np.concatenate([episode.support, episode.query])


def all_labels(episode: Episode) -> torch.Tensor:
    """Episode labels of `all_indices(episode)` (support block then query block), shape (n,)."""
    return torch.cat([support_labels(episode), query_labels(episode)])


def all_base_labels(episode: Episode) -> torch.Tensor:
    """Base-class ids of `all_indices(episode)`, shape (ways * (shots + queries),)."""
    return torch.from_numpy(np.asarray(episode.classes)[all_labels(episode).numpy()])


Params = dict[str, torch.Tensor]
#: Maps image indices of shape (n,) to float images of shape (n, C, H, W).
ImageFn = Callable[[np.ndarray], torch.Tensor]


def backbone_params(backbone: nn.Module) -> Params:
    """The backbone's trainable parameters by name."""
    return {k: p for k, p in backbone.named_parameters() if p.requires_grad}


def feature_dim(model: nn.Module) -> int:
    """The size D of `model`'s features (its `feature_dim` attribute)."""
    return cast(int, model.feature_dim)


def zero_head(ways: int, dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh task head: weight of shape (ways, dim) and bias of shape (ways,), zeros."""
    w = torch.zeros(ways, dim, dtype=like.dtype, device=like.device, requires_grad=True)
    b = torch.zeros(ways, dtype=like.dtype, device=like.device, requires_grad=True)
    return w, b


def prototype_head(
    features: torch.Tensor, labels: torch.Tensor, ways: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest-mean classifier as a linear head (Proto-MAML's initialisation).

    Args:
        features: shape (B, D); labels: shape (B,) in 0..ways-1, every class present.

    Returns:
        weight (ways, D) = 2 * class means, bias (ways,) = -||class mean||^2, so that the logits
        equal -||f - mean_c||^2 up to a per-image constant. Differentiable in `features`.
        At least float32 even from bf16 features (autocast): the head adapts in FP32.
    """
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    sums = torch.zeros(ways, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, labels, features)
    counts = torch.bincount(labels, minlength=ways).clamp(min=1).to(features.dtype)
    means = sums / counts[:, None]
    return 2 * means, -(means**2).sum(1)


def initial_head(
    kind: str,
    features: Callable[[], torch.Tensor],
    labels: torch.Tensor,
    ways: int,
    dim: int,
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A task head to start adapting from: `zero_head`, or `prototype_head` of `features()`
    (called only for "prototypes"; shape (B, D), matching `labels` (B,))."""
    if kind == "zero":
        return zero_head(ways, dim, like)
    return prototype_head(features(), labels, ways)


def task_logits(
    backbone: nn.Module, params: Params, head: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Logits of shape (B, ways) of images x (B, C, H, W) under backbone weights `params`."""
    feats = functional_call(backbone, params, (x,), strict=False)
    return F.linear(feats, head[0], head[1])


def inner_adapt(
    backbone: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    ways: int,
    steps: int,
    lr: float,
    create_graph: bool = False,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    head_init: str = "zero",
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Params, tuple[torch.Tensor, torch.Tensor]]:
    """k SGD steps on (x, y) from `params` and a fresh head (`initial_head` of kind `head_init`,
    the prototypes taken from all of x), or from the head `start` when given.

    Args:
        x: images of shape (B, C, H, W); y: labels of shape (B,) in 0..ways-1.
        create_graph: keep the graph through the steps (second-order MAML); otherwise every
            step's result is detached (first order, Reptile, evaluation).
        batch_size: images per step (a random subset, drawn with `generator`); None uses all.

    Returns:
        (adapted backbone parameters, adapted head (weight (ways, D), bias (ways,))).
    """
    any_param = next(iter(params.values()))
    y = y.to(x.device)
    # The inner steps differentiate with respect to aliases of theta, so that the gradient of
    # the first step holds the head fixed even when the head's start is a function of theta
    # (second-order prototypes): the head and the backbone are separate inner parameters.
    if create_graph:
        fast = {k: v.view_as(v) for k, v in params.items()}
    else:
        fast = {k: v.detach().requires_grad_(True) for k, v in params.items()}

    def features() -> torch.Tensor:
        return functional_call(backbone, params, (x,), strict=False)

    if start is None:
        start = initial_head(head_init, features, y, ways, feature_dim(backbone), any_param)
    head = start
    if not create_graph:
        head = (head[0].detach().requires_grad_(True), head[1].detach().requires_grad_(True))
    for _ in range(steps):
        if batch_size is not None and batch_size < len(x):
            pick = torch.randperm(len(x), generator=generator)[:batch_size]
            xb, yb = x[pick], y[pick]
        else:
            xb, yb = x, y
        loss = F.cross_entropy(task_logits(backbone, fast, head, xb), yb)
        names = list(fast)
        grads = torch.autograd.grad(
            loss, [fast[k] for k in names] + list(head), create_graph=create_graph
        )
        new = [
            v - lr * g for v, g in zip([fast[k] for k in names] + list(head), grads, strict=True)
        ]
        if not create_graph:
            new = [v.detach().requires_grad_(True) for v in new]
        fast = dict(zip(names, new[: len(names)], strict=True))
        head = (new[-2], new[-1])
    return fast, head


def reptile_gradient(
    backbone: nn.Module, images: ImageFn, tasks: Sequence[Episode], cfg: JointConfig
) -> Params:
    """Reptile's pseudo-gradient sum_i (theta - theta_i), so theta - lr * g = theta + lr * sum_i
    (theta_i - theta); each theta_i after `cfg.inner_steps` steps on the task's support + query."""
    theta = backbone_params(backbone)
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in tasks:
        idx = all_indices(t)
        y = all_labels(t)
        fast, _ = inner_adapt(
            backbone,
            theta,
            images(idx),
            y,
            len(t.classes),
            cfg.inner_steps,
            cfg.inner_lr,
            head_init=cfg.head_init,
        )
        for k in total:
            total[k] += theta[k].detach() - fast[k].detach()
    return total


def maml_gradient(
    backbone: nn.Module, images: ImageFn, tasks: Sequence[Episode], cfg: JointConfig
) -> Params:
    """MAML's meta-gradient sum_i d L_query(theta_i) / d theta; first order (the gradient at
    theta_i) unless `cfg.second_order`.

    With prototype heads the first-order gradient also flows through the head's initialisation
    (fo-Proto-MAML, Triantafillou et al. 2020): only the inner loop's Jacobian is dropped, the
    prototypes stay a function of theta. With zero inner steps this is exactly ProtoNet's gradient.
    """
    theta = backbone_params(backbone)
    names = list(theta)
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    through_init = not cfg.second_order and cfg.head_init == "prototypes"
    for t in tasks:
        x_support, ways = images(t.support), len(t.classes)
        y_support = support_labels(t).to(x_support.device)
        start = None
        if through_init:
            feats = functional_call(backbone, theta, (x_support,), strict=False)
            start = prototype_head(feats, y_support, ways)
        fast, head = inner_adapt(
            backbone,
            theta,
            x_support,
            y_support,
            ways,
            cfg.inner_steps,
            cfg.inner_lr,
            create_graph=cfg.second_order,
            head_init=cfg.head_init,
            start=start,
        )
        if start is not None:
            # the adapted head = its start (a function of theta) + the inner loop's detached change
            head = (
                start[0] + (head[0] - start[0]).detach(),
                start[1] + (head[1] - start[1]).detach(),
            )
        y_query = query_labels(t).to(x_support.device)
        loss = F.cross_entropy(task_logits(backbone, fast, head, images(t.query)), y_query)
        wrt = [theta[k] for k in names] if cfg.second_order else [fast[k] for k in names]
        if through_init:
            wrt += [theta[k] for k in names]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        for i, g in enumerate(grads):  # wrt names every parameter once, or twice (through_init)
            if g is not None:
                total[names[i % len(names)]] += g.detach()
    return total


def transfer_gradient(
    backbone: nn.Module, transfer_head: nn.Linear, images: ImageFn, tasks: Sequence[Episode]
) -> tuple[Params, list[torch.Tensor]]:
    """Gradient of ordinary base-class cross-entropy on every image of `tasks`.

    Returns:
        (gradients of the backbone parameters by name, gradients of [head weight, head bias]).
    """
    idx = np.concatenate([all_indices(t) for t in tasks])
    labels = torch.cat([all_base_labels(t) for t in tasks])
    x = images(idx)
    return transfer_gradient_on(backbone, transfer_head, x, labels.to(x.device))


def transfer_gradient_on(
    backbone: nn.Module, transfer_head: nn.Linear, x: torch.Tensor, labels: torch.Tensor
) -> tuple[Params, list[torch.Tensor]]:
    """`transfer_gradient` of images x (B, C, H, W) with base-class ids `labels` (B,)."""
    theta = backbone_params(backbone)
    names = list(theta)
    loss = F.cross_entropy(transfer_head(backbone(x)), labels)
    grads = torch.autograd.grad(loss, [theta[k] for k in names] + list(transfer_head.parameters()))
    return dict(zip(names, grads[: len(names)], strict=True)), list(grads[len(names) :])


#: What one meta-iteration computes before any optimizer step: the meta step's gradient and
#: the transfer step's (backbone, head) gradients, each None when its weight is 0.
Gradients = tuple[Params | None, Params | None, list[torch.Tensor] | None]


class JointLearner:
    """Owns the backbone, the base-class head and the two optimizers; `step(tasks)` is one
    meta-iteration of Algorithm 1.

    The gradients come from the batched engine (`mtl_edge.train.joint_batched`: all inner loops
    of the meta-batch at once, replayed as a CUDA graph on a GPU with `cfg.cuda_graphs`) when
    `cfg.batched` and the backbone allows it (`batch_reason`), else from the per-task loop of
    this module (the reference); `engine` says which runs.

    Args:
        backbone: a network with `forward_features` and `feature_dim` (e.g. Conv-4), already on
            its training device (the transfer head is put beside it; images come from there).
        num_base_classes: outputs of the transfer head (all base classes).
        cfg: the options; validated here.

    Raises:
        ConfigError: a bad option.
    """

    def __init__(self, backbone: nn.Module, num_base_classes: int, cfg: JointConfig) -> None:
        if num_base_classes < 2:
            raise ConfigError(f"transfer head needs >= 2 base classes, got {num_base_classes}")
        self.cfg = cfg
        self.backbone = backbone
        device = next(backbone.parameters()).device
        self.transfer_head = nn.Linear(feature_dim(backbone), num_base_classes).to(device)
        params = list(backbone_params(backbone).values())
        self.meta_opt = _optimizer(cfg.optimizer, params, cfg.outer_lr)
        self.transfer_opt = _optimizer(
            cfg.optimizer, params + list(self.transfer_head.parameters()), cfg.transfer_lr
        )
        reason = batch_reason(backbone) if cfg.batched else "joint.batched = false"
        if cfg.batched and reason:
            log.warning("joint.batched: %s; the per-task loop runs instead", reason)
        self._engine = "loop" if reason else "batched"
        self._batched = Batched(backbone, cfg)
        self._graphed: GraphedGradients | None = None
        if self._engine == "batched" and cfg.cuda_graphs and device.type == "cuda":
            self.enable_graphs()

    @property
    def engine(self) -> str:
        """What computes the gradients: "loop", "batched" or "batched+cuda-graphs"."""
        if self._graphed is not None and self._graphed.failed is None:
            return "batched+cuda-graphs"
        return self._engine

    def enable_graphs(self, **graph_options: Any) -> None:
        """Replay the batched gradients as a graph (`GraphedGradients(..., **graph_options)`;
        on a GPU by default when `cfg.cuda_graphs`; the tests pass a CPU stand-in)."""
        if self._engine == "loop":
            raise ConfigError("joint.cuda_graphs needs the batched engine (joint.batched = true)")
        self._graphed = GraphedGradients(self._batched_gradients, **graph_options)

    def gradients(self, images: ImageFn, tasks: Sequence[Episode]) -> Gradients:
        """The meta-iteration's gradients at the current theta (see `Gradients`); moves the
        BatchNorm running averages as the loop does (meta step first, then transfer step)."""
        cfg = self.cfg
        if self._engine != "loop":
            batch = TaskBatch.gather(images, tasks)
            if self._graphed is not None:
                return self._graphed(batch)
            return self._batched_gradients(batch)
        meta = transfer = head = None
        if cfg.uses_meta:
            fn = reptile_gradient if cfg.meta == "reptile" else maml_gradient
            meta = fn(self.backbone, images, tasks, cfg)
        if cfg.uses_transfer:
            transfer, head = transfer_gradient(self.backbone, self.transfer_head, images, tasks)
        return meta, transfer, head

    def _batched_gradients(self, batch: TaskBatch) -> Gradients:
        cfg = self.cfg
        meta = transfer = head = None
        if cfg.uses_meta:
            engine = self._batched
            meta = engine.reptile(batch) if cfg.meta == "reptile" else engine.maml(batch)
        if cfg.uses_transfer:
            transfer, head = transfer_gradient_on(self.backbone, self.transfer_head, *batch.flat())
        return meta, transfer, head

    def step(
        self, images: ImageFn, tasks: Sequence[Episode], stats: bool = True
    ) -> dict[str, float]:
        """One meta-iteration on `tasks`; `images(idx)` gives float images (len(idx), C, H, W).

        Returns:
            {"delta_meta": |theta_meta - theta|, "delta_transfer": |theta_transfer - theta|}
            for the steps computed; {} with `stats=False` (no wait for the device).
        """
        self.backbone.train()
        named = backbone_params(self.backbone)
        params = list(named.values())
        with torch.no_grad():
            theta0 = torch._foreach_mul(params, 1.0)  # a copy of theta
        meta, transfer, head = self.gradients(images, tasks)
        deltas: dict[str, list[torch.Tensor]] = {}
        if meta is not None:
            deltas["meta"] = _delta(self.meta_opt, params, [meta[k] for k in named], theta0)
        if transfer is not None and head is not None:
            for p, g in zip(self.transfer_head.parameters(), head, strict=True):
                p.grad = g
            grads = [transfer[k] for k in named]
            deltas["transfer"] = _delta(self.transfer_opt, params, grads, theta0)
        weights = dict(zip(("meta", "transfer"), mix_weights(self.cfg), strict=True))
        with torch.no_grad():
            for name, delta in deltas.items():
                torch._foreach_add_(params, delta, alpha=weights[name])
        if not stats:
            return {}
        return {
            f"delta_{name}": float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(d))))
            for name, d in deltas.items()
        }


def _optimizer(kind: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def _delta(
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    theta0: list[torch.Tensor],
) -> list[torch.Tensor]:
    """The step `opt` takes from theta0 (= the parameters now) with `grads`, as a list of
    changes; the parameters are theta0 again afterwards (the optimizer's state keeps the step).
    """
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        delta = torch._foreach_sub(params, theta0)
        torch._foreach_copy_(params, theta0)
    return delta


def mix_weights(cfg: JointConfig) -> tuple[float, float]:
    """(weight of the meta step, weight of the transfer step) in theta + sum w * delta:
    paper: (beta, 1 - beta); code: (1/2, beta/2)."""
    if cfg.mix == "paper":
        return cfg.beta, 1.0 - cfg.beta
    return 0.5, 0.5 * cfg.beta


def mix_parameters(
    theta: Params, meta: Params | None, transfer: Params | None, cfg: JointConfig
) -> Params:
    """Combine the proposals (weights proposed by each step; see `mix_weights`).

    paper: beta * meta + (1 - beta) * transfer (a missing proposal has weight 0);
    code: theta + ((meta - theta) + beta * (transfer - theta)) / 2.
    """
    w_meta, w_transfer = mix_weights(cfg)
    out = {}
    for k, t in theta.items():
        d_meta = meta[k] - t if meta is not None else torch.zeros_like(t)
        d_tr = transfer[k] - t if transfer is not None else torch.zeros_like(t)
        out[k] = t + w_meta * d_meta + w_transfer * d_tr
    return out
