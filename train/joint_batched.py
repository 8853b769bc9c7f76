"""Batched meta-learning: the inner loops of all tasks of a meta-batch run as one computation.

The T tasks of a meta-batch become one network T times as wide: the *grouped twin* of the
backbone (`grouped_twin`), in which every convolution is a grouped convolution with T groups
(group t holds task t's weights) and every BatchNorm normalises T x C channels. Task t's images
sit in channel block t of the input (shape (n, T * C, H, W)), so task t's images only ever meet
task t's weights, and one kernel per layer serves all tasks instead of one per task. The task
parameters are one tensor per backbone parameter, shape (T, *shape), handed to the twin by
`torch.func.functional_call` as views of shape (T * out, ...); plain autograd differentiates
the sum of the tasks' losses, which gives every task its own gradient (the tasks share
nothing). The per-task loop of `mtl_edge.train.joint` stays the reference: every function here
returns the same meta-gradient within float rounding (tests/test_joint_batched.py). An
alternative, `torch.func.vmap` over `functional_call`, computes the same numbers but moves the
task axis in and out of every layer (copies); on the CPU it ran at about half this speed with
2.4x this engine's operator count (docs/joint.md, "Batched meta-learning").

BatchNorm. In training mode every forward normalises with the batch statistics of its own
images; in the loop those images are one task's, and here too: channel (t, c) of the twin sees
only task t's images. Its running averages are a (T * C) view of per-task copies (T, C), so
every task moves its own copy. The loop moves ONE set of running averages task after task
(r <- (1 - m) r + m s, u times per task); all of these updates are linear, so the loop's final
running averages follow exactly from the T per-task copies:

    a = (1 - m)^u,   D_i = r_i - a r_0   (task i's own contribution)
    r = a^T r_0 + sum_i a^(T - 1 - i) D_i,   num_batches_tracked = n_0 + u T

(`compose_running_stats`, computed on the device without a host sync, so that a CUDA graph can
hold it; `mtl_edge.train.joint_graphs`). The transfer step is one forward over all images of the
meta-batch already (BatchNorm statistics of the whole batch, as in ordinary training) and runs
unchanged. `batch_reason` names what this engine cannot reproduce (a layer other than Conv2d /
BatchNorm2d holding weights, a cumulative-average BatchNorm, tasks of unequal shapes); the
learner then keeps the loop.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mtl_edge.data.episodes import Episode
from mtl_edge.train.backbones import Backbone
from mtl_edge.train.stage_config import JointConfig

Params = dict[str, torch.Tensor]
Head = tuple[torch.Tensor, torch.Tensor]
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class TaskBatch:
    """The images of a meta-batch of T tasks of equal shape, gathered in one call.

    Attributes:
        x: images of shape (T, n, C, H, W): per task its support block, then its query block.
        y: episode labels of shape (T, n) in 0..ways-1 (the same layout).
        base: base-class ids of shape (T, n) (the transfer step's labels).
        ways: classes per task; n_support: the first n_support images of a task are its support.
    """

    x: torch.Tensor
    y: torch.Tensor
    base: torch.Tensor
    ways: int
    n_support: int

    @classmethod
    def gather(cls, images: Any, tasks: Sequence[Episode]) -> TaskBatch:
        """One `images(idx)` call for all tasks (`images` maps indices (n,) to (n, C, H, W)).

        Raises:
            ValueError: the tasks differ in ways, shots or queries (a sampler never does that).
        """
        shapes = {(t.ways, len(t.support), len(t.query)) for t in tasks}
        if len(shapes) != 1:
            raise ValueError(f"batched tasks must share ways, shots and queries; got {shapes}")
        ways, n_s, n_q = shapes.pop()
        idx = np.concatenate([np.concatenate([t.support, t.query]) for t in tasks])
        x = images(idx)
        labels = np.concatenate([tasks[0].support_labels(), tasks[0].query_labels()])
        base = np.stack([np.asarray(t.classes)[labels] for t in tasks])
        count = len(tasks)
        return cls(
            x.reshape(count, n_s + n_q, *x.shape[1:]),
            torch.as_tensor(np.tile(labels, (count, 1)), device=x.device),
            torch.as_tensor(base, device=x.device),
            ways,
            n_s,
        )

    @property
    def tasks(self) -> int:
        return int(self.x.shape[0])

    def part(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """("support" | "query" | "all") -> (images (T, m, C, H, W), labels (T, m))."""
        cut = {"support": slice(None, self.n_support), "query": slice(self.n_support, None)}
        s = cut.get(which, slice(None))
        return self.x[:, s], self.y[:, s]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (T * n, C, H, W) and their base-class ids (T * n,), task after task."""
        return self.x.flatten(0, 1), self.base.flatten()


def batch_reason(backbone: nn.Module, tasks: Sequence[Episode] = ()) -> str | None:
    """Why the batched engine would not reproduce the per-task loop for this backbone (and
    these tasks), or None when it does.

    The twin is exact for the registered backbones (`mtl_edge.train.backbones.Backbone`: every
    operation between their convolutions acts channel by channel) whose weights all sit in
    Conv2d and BatchNorm2d layers, with BatchNorm momenta that are numbers."""
    if not isinstance(backbone, Backbone):
        return f"{type(backbone).__name__} is not a registered backbone"
    for name, m in backbone.named_modules():
        owns = any(True for _ in m.parameters(recurse=False)) or any(
            True for _ in m.buffers(recurse=False)
        )
        if owns and not isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            return f"layer {name!r} ({type(m).__name__}) is neither Conv2d nor BatchNorm2d"
        if isinstance(m, _BN) and m.track_running_stats and m.momentum is None:
            return f"BatchNorm {name!r} keeps a cumulative average (momentum=None)"
    if len({(t.ways, len(t.support), len(t.query)) for t in tasks}) > 1:
        return "the tasks differ in ways, shots or queries"
    return None


def grouped_twin(backbone: nn.Module, tasks: int) -> nn.Module:
    """A copy of `backbone` for `tasks` tasks at once: Conv2d(in, out, groups=g) becomes
    Conv2d(T * in, T * out, groups=T * g), BatchNorm2d(C) becomes BatchNorm2d(T * C). Its own
    tensors are never used (`functional_call` passes the task weights and buffers), so the new
    layers live on the "meta" device: no memory, and no draw from the global random stream."""
    twin = copy.deepcopy(backbone)
    for m in list(twin.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, nn.Conv2d):
                wide: nn.Module = nn.Conv2d(
                    child.in_channels * tasks, child.out_channels * tasks, child.kernel_size,
                    child.stride, child.padding, child.dilation, child.groups * tasks,
                    child.bias is not None, child.padding_mode, device="meta",
                )  # fmt: skip
            elif isinstance(child, nn.BatchNorm2d):
                wide = nn.BatchNorm2d(
                    child.num_features * tasks, child.eps, child.momentum, child.affine,
                    child.track_running_stats, device="meta",
                )  # fmt: skip
            else:
                continue
            setattr(m, name, wide)
    return twin


def _stacked(values: Params, count: int) -> Params:
    """Each tensor repeated along a new leading task axis: shape (count, *shape), a copy."""
    return {k: v.detach().unsqueeze(0).repeat(count, *([1] * v.ndim)) for k, v in values.items()}


def compose_running_stats(
    backbone: nn.Module, before: Params, per_task: Params, updates: Params
) -> None:
    """Write into `backbone`'s BatchNorm buffers what the loop over tasks 0..T-1 would have
    left there (see the module docstring), from the buffers `before` the meta-batch, the
    per-task running averages `per_task` (shape (T, C)) after it and the count of updates
    of each task `updates` (0-d). In place, no host sync."""
    with torch.no_grad():
        for name, m in backbone.named_modules():
            if not isinstance(m, _BN) or not m.track_running_stats:
                continue
            key = f"{name}." if name else ""
            u = updates[key + "num_batches_tracked"]
            a = (1.0 - float(m.momentum)) ** u.to(m.running_mean.dtype)  # type: ignore[arg-type]
            tasks = per_task[key + "running_mean"].shape[0]
            powers = torch.arange(tasks - 1, -1, -1, device=a.device, dtype=a.dtype)
            weights = a**powers  # a^(T-1-i), shape (T,)
            for stat in ("running_mean", "running_var"):
                r0, r = before[key + stat], per_task[key + stat]
                getattr(m, stat).copy_(a**tasks * r0 + (weights[:, None] * (r - a * r0)).sum(0))
            m.num_batches_tracked.add_(u * tasks)  # type: ignore[union-attr]


def prototypes(features: torch.Tensor, onehot: torch.Tensor) -> Head:
    """The prototype head (`mtl_edge.train.joint.prototype_head`) from one-hot labels.

    Args:
        features: shape (..., B, D); onehot: shape (..., B, ways), every class present.

    Returns:
        weight (..., ways, D) = 2 * class means, bias (..., ways) = -||class mean||^2.
    """
    sums = onehot.transpose(-1, -2) @ features
    means = sums / onehot.sum(-2).clamp(min=1)[..., None]
    return 2 * means, -(means**2).sum(-1)


def one_hot(y: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., B) labels -> (..., B, ways); a comparison, so no host sync (unlike F.one_hot)."""
    return (y[..., None] == torch.arange(ways, device=y.device)).to(dtype)


class Batched:
    """The batched inner loops of one backbone: Reptile's and MAML's meta-gradients.

    Args:
        backbone: the network (its parameters theta and BatchNorm buffers are read, and its
            running averages updated as the loop would); cfg: the joint options.
    """

    def __init__(self, backbone: nn.Module, cfg: JointConfig) -> None:
        self.backbone, self.cfg = backbone, cfg
        self._twins: dict[int, nn.Module] = {}

    def _twin(self, tasks: int) -> nn.Module:
        if tasks not in self._twins:
            self._twins[tasks] = grouped_twin(self.backbone, tasks)
        return self._twins[tasks]

    def _begin(self, batch: TaskBatch) -> None:
        """Per-task BatchNorm state for this meta-batch: copies (T, ...) of the buffers."""
        buffers = {k: b.detach() for k, b in self.backbone.named_buffers()}
        self._before = {k: b.clone() for k, b in buffers.items()}
        floats = {k: b for k, b in buffers.items() if b.is_floating_point()}
        self._per_task = _stacked(floats, batch.tasks)
        self._updates = {k: torch.zeros_like(b) for k, b in buffers.items() if k not in floats}
        self._twin_shapes = {k: p.shape for k, p in self._twin(batch.tasks).named_parameters()}

    def _finish(self) -> None:
        compose_running_stats(self.backbone, self._before, self._per_task, self._updates)

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Task features (T, n, D) of images x (T, n, C, H, W) under task weights `params`
        (shapes (T, *shape)); moves the per-task BatchNorm statistics."""
        tasks, n = x.shape[:2]
        wide = {k: v.reshape(self._twin_shapes[k]) for k, v in params.items()}
        buffers = {k: v.view(-1) for k, v in self._per_task.items()} | self._updates
        grouped = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])
        feats = functional_call(self._twin(tasks), (wide, buffers), (grouped,))
        return feats.view(n, tasks, -1).transpose(0, 1)

    def loss(self, params: Params, head: Head, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over tasks of each task's mean cross-entropy; head (T, ways, D), (T, ways)."""
        logits = torch.baddbmm(head[1].unsqueeze(1), self.features(params, x), head[0].mT)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]

    def _adapt(
        self, fast: Params, head: Head, x: torch.Tensor, y: torch.Tensor, create_graph: bool
    ) -> tuple[Params, Head]:
        """`cfg.inner_steps` SGD steps of every task at once (`mtl_edge.train.joint.
        inner_adapt`); tensors of shape (T, ...) in and out."""
        names, lr = list(fast), self.cfg.inner_lr
        for _ in range(self.cfg.inner_steps):
            wrt = [fast[k] for k in names] + list(head)
            grads = torch.autograd.grad(self.loss(fast, head, x, y), wrt, create_graph=create_graph)
            if create_graph:
                new = [v - lr * g for v, g in zip(wrt, grads, strict=True)]
            else:  # one multi-tensor kernel on a GPU instead of two per tensor
                with torch.no_grad():
                    new = [
                        v.requires_grad_(True) for v in torch._foreach_add(wrt, grads, alpha=-lr)
                    ]
            fast = dict(zip(names, new[: len(names)], strict=True))
            head = (new[-2], new[-1])
        return fast, head

    def _start(self, params: Params, x: torch.Tensor, y: torch.Tensor, ways: int) -> Head:
        """Every task's starting head, (T, ways, D) and (T, ways): zeros, or the prototypes of
        the task's images under `params` (kept differentiable)."""
        if self.cfg.head_init == "zero":
            dim = int(self.backbone.feature_dim)  # type: ignore[arg-type]
            like = {"dtype": x.dtype, "device": x.device, "requires_grad": True}
            return torch.zeros(x.shape[0], ways, dim, **like), torch.zeros(x.shape[0], ways, **like)
        return prototypes(self.features(params, x), one_hot(y, ways, x.dtype))

    def _theta(self, tasks: int, detach: bool) -> tuple[list[torch.Tensor], Params]:
        """(the backbone's trainable parameters, their task copies (T, *shape)): detached
        leaves, or expanded views of theta through which gradients reach it."""
        named = [(k, p) for k, p in self.backbone.named_parameters() if p.requires_grad]
        if detach:
            reps = _stacked(dict(named), tasks)
            return [p for _, p in named], {k: v.requires_grad_(True) for k, v in reps.items()}
        return [p for _, p in named], {k: p.expand(tasks, *p.shape) for k, p in named}

    def reptile(self, batch: TaskBatch) -> Params:
        """Reptile's pseudo-gradient sum_i (theta - theta_i), theta_i after the inner steps on
        all of task i's images (`mtl_edge.train.joint.reptile_gradient`)."""
        self._begin(batch)
        x, y = batch.part("all")
        _, fast = self._theta(batch.tasks, detach=True)
        theta = {k: v[0].detach() for k, v in fast.items()}
        with torch.no_grad():
            start = self._start(fast, x, y, batch.ways)
        head = (start[0].detach().requires_grad_(True), start[1].detach().requires_grad_(True))
        fast, _ = self._adapt(fast, head, x, y, create_graph=False)
        self._finish()
        return {k: (v.unsqueeze(0) - fast[k].detach()).sum(0) for k, v in theta.items()}

    def maml(self, batch: TaskBatch) -> Params:
        """MAML's meta-gradient sum_i dL_query(theta_i)/dtheta (`mtl_edge.train.joint.
        maml_gradient`): first order, through the prototype start too (fo-Proto-MAML), or
        second order (`cfg.second_order`)."""
        self._begin(batch)
        (xs, ys), (xq, yq) = batch.part("support"), batch.part("query")
        theta, reps = self._theta(batch.tasks, detach=False)
        names = list(reps)
        if self.cfg.second_order:
            # inner gradients with respect to aliases: the head stays a separate parameter
            head = self._start(reps, xs, ys, batch.ways)
            fast = {k: v.view_as(v) for k, v in reps.items()}
            fast, head = self._adapt(fast, head, xs, ys, create_graph=True)
            grads = torch.autograd.grad(self.loss(fast, head, xq, yq), theta)
        else:
            start = self._start(reps, xs, ys, batch.ways)
            fast = {k: v.detach().requires_grad_(True) for k, v in reps.items()}
            head = (start[0].detach().requires_grad_(True), start[1].detach().requires_grad_(True))
            fast, head = self._adapt(fast, head, xs, ys, create_graph=False)
            wrt = [fast[k] for k in names] + list(head)
            g = torch.autograd.grad(self.loss(fast, head, xq, yq), wrt)
            grads = tuple(gk.sum(0) for gk in g[: len(names)])
            if self.cfg.head_init == "prototypes":  # the gradient through the start too
                through = torch.autograd.grad(start, theta, grad_outputs=g[len(names) :])
                grads = tuple(a + b for a, b in zip(grads, through, strict=True))
        self._finish()
        return dict(zip(names, (gk.detach() for gk in grads), strict=True))
