"""Meta-transfer (phase 2): learn SS and the FC initialisation over few-shot tasks.

Per task, the SS encoder embeds the support and query images, the FC base-learner starts from
the meta-learned initialisation (`fc_weight`, `fc_bias`) and takes T gradient steps on the
support set (`mtl_edge.train.base_learner.inner_loop`; SS is not adapted in the inner loop), and
the query cross-entropy of the fast weights is the task's meta-loss. `meta_step` accumulates the
meta-loss of a meta-batch (mean over tasks by default, or the sum) and takes one optimizer step
on SS (and BN affine when `bn_mode="train"`) and the FC initialisation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.data.episodes import Episode
from mtl_edge.errors import ConfigError
from mtl_edge.fewshot.fc import HeadRecipe, loss_scale
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.base_learner import fc_logits, inner_loop
from mtl_edge.train.checkpoint import deploy_section, meta_entry, meta_head_recipe
from mtl_edge.train.hard_tasks import per_class_accuracy
from mtl_edge.train.ss import (
    bn_parameters,
    convert_to_ss,
    freeze_backbone,
    set_bn_mode,
    ss_modules,
    ss_parameters,
)
from mtl_edge.train.stage_config import MetaConfig

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One few-shot task as tensors.

    Attributes:
        support_x: images of shape (ways * shots, C, H, W), class-major.
        support_y: int64 episode labels of shape (ways * shots,).
        query_x: images of shape (ways * queries, C, H, W).
        query_y: int64 episode labels of shape (ways * queries,).
        classes: split class ids of shape (ways,); episode label j is classes[j].
        is_hard: drawn by the hard-task sampler.
        indices: split sample indices used (support then query), for fresh-image re-sampling.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: np.ndarray
    is_hard: bool = False
    indices: np.ndarray | None = None

    @property
    def ways(self) -> int:
        return len(self.classes)


def make_task(
    episode: Episode,
    load: Callable[[np.ndarray], torch.Tensor],
    device: torch.device | str | None = None,
    is_hard: bool = False,
) -> Task:
    """A `Task` from an episode and `load(indices) -> images (n, C, H, W)`."""
    return Task(
        support_x=load(episode.support).to(device),
        support_y=torch.from_numpy(episode.support_labels()).to(device),
        query_x=load(episode.query).to(device),
        query_y=torch.from_numpy(episode.query_labels()).to(device),
        classes=np.asarray(episode.classes, dtype=np.int64),
        is_hard=is_hard,
        indices=np.concatenate([episode.support, episode.query]),
    )


class TaskBuilder:
    """Turns episodes into tasks with one image loader: `TaskBuilder(load, device)(episode)`."""

    def __init__(
        self, load: Callable[[np.ndarray], torch.Tensor], device: torch.device | str | None = None
    ) -> None:
        self.load, self.device = load, device

    def __call__(self, episode: Episode, is_hard: bool = False) -> Task:
        return make_task(episode, self.load, self.device, is_hard)


@dataclass
class TaskStats:
    """Query results of one task of a meta-step.

    Attributes:
        classes: split class ids (ways,).
        class_accuracy: query accuracy per episode label, (ways,).
        accuracy: query accuracy of the task.
        loss: query cross-entropy (mean over queries).
        is_hard: a hard task.
    """

    classes: list[int]
    class_accuracy: list[float]
    accuracy: float
    loss: float
    is_hard: bool


@dataclass
class MetaStepStats:
    """Result of one meta-step: mean query loss and accuracy over its tasks, and per task."""

    loss: float
    accuracy: float
    tasks: list[TaskStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fc_init(ways: int, dim: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(ways, dim)
    if kind == "normal":
        nn.init.normal_(weight, std=0.01)
    elif kind == "kaiming":
        nn.init.kaiming_normal_(weight)
    return weight, torch.zeros(ways)


class MetaTransferLearner(nn.Module):
    """SS encoder + meta-learned FC initialisation.

    Args:
        encoder: a registry backbone; converted to SS (`ss_shortcut`) when it has no SS convs
            yet. Everything but SS is frozen; BN follows `settings.bn_mode`.
        ways: N of the meta-training tasks (the FC initialisation has N rows).
        settings: `MetaConfig`; keyword `overrides` replace single fields.
        ss_shortcut: convert the 1x1 shortcuts too (only used when converting here).
    """

    def __init__(
        self,
        encoder: nn.Module,
        ways: int,
        settings: MetaConfig | None = None,
        ss_shortcut: bool = True,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if ways < 2:
            raise ConfigError(f"meta-transfer ways={ways}: need at least 2 classes per task")
        known = {f.name for f in fields(MetaConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"meta settings: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        self.settings = replace(settings or MetaConfig(), **(overrides | {"ways": ways}))
        if not ss_modules(encoder):
            convert_to_ss(encoder, shortcut=ss_shortcut)
        self.encoder = encoder
        self.ways = ways
        dim = int(getattr(encoder, "feature_dim"))  # noqa: B009 - registry attribute
        weight, bias = _fc_init(ways, dim, self.settings.fc_init)
        ref = next(iter(encoder.buffers()))
        self.fc_weight = nn.Parameter(weight.to(ref.device))
        self.fc_bias = nn.Parameter(bias.to(ref.device))
        freeze_backbone(self.encoder)
        set_bn_mode(self.encoder, self.settings.bn_mode)
        # the encoder's autocast (`mtl_edge.train.precision.Precision.autocast`, set by the driver)
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """FP32 features (B, D) of images (B, C, H, W); the encoder runs under `self.autocast`."""
        with self.autocast():
            return self.encoder(x).float()

    def train(self, mode: bool = True) -> MetaTransferLearner:
        """Train/eval mode; BNs then follow `settings.bn_mode` (frozen BN stays in eval)."""
        super().train(mode)
        set_bn_mode(self.encoder, self.settings.bn_mode)
        return self

    def meta_parameters(self) -> dict[str, list[nn.Parameter]]:
        """{"ss": Phi_S1 and Phi_S2 (+ BN affine when bn_mode="train"), "fc": [weight, bias]}."""
        ss = ss_parameters(self.encoder)
        if self.settings.bn_mode == "train":
            ss += bn_parameters(self.encoder)
        return {"ss": ss, "fc": [self.fc_weight, self.fc_bias]}

    def make_optimizer(self, ss_lr: float = 1e-4, fc_lr: float = 1e-3) -> torch.optim.Adam:
        """Adam with separate learning rates (official PyTorch code: 1e-4 SS, 1e-3 FC)."""
        groups = self.meta_parameters()
        return torch.optim.Adam(
            [{"params": groups["ss"], "lr": ss_lr}, {"params": groups["fc"], "lr": fc_lr}]
        )

    def initial_head(self, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The head the inner loop starts from: the meta-learned init for `self.ways`-way
        tasks, zeros for any other number of ways (its rows are tied to episode slots)."""
        if ways == self.ways:
            return self.fc_weight, self.fc_bias
        return (
            torch.zeros(ways, self.fc_weight.shape[1], device=self.fc_weight.device),
            torch.zeros(ways, device=self.fc_weight.device),
        )

    def adapt(
        self, support_features: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast FC weights (ways, D), (ways,) from support features (n_s, D) and labels (n_s,)."""
        s = self.settings
        if steps is None:
            steps = s.inner_steps if self.training else s.test_steps
        ways = int(support_y.max()) + 1
        weight, bias = self.initial_head(ways)
        c = loss_scale(s.inner_loss, len(support_y), ways)
        lr, wd = s.inner_lr * c, s.inner_weight_decay / c
        return inner_loop(
            support_features,
            support_y,
            weight,
            bias,
            steps=steps,
            lr=lr,
            create_graph=s.second_order and self.training,
            normalize=s.normalize,
            weight_decay=wd,
        )

    def head_logits(
        self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Logits (n, ways) of features (n, D) under a fast head."""
        if self.settings.normalize:
            features = F.normalize(features, dim=1, eps=1e-12)
        return fc_logits(features, weight, bias)

    def task_logits(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Query logits of shape (ways * queries, ways) after adapting the FC on the support set.

        Args:
            support_x: (ways * shots, C, H, W); support_y: (ways * shots,) episode labels.
            query_x: (ways * queries, C, H, W).
            steps: inner steps; None uses inner_steps in train mode and test_steps in eval.
        """
        first_order = self.training and not self.settings.second_order
        # first order: support features never reach the outer gradient (see base_learner)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not first_order):
            support_features = self.encode(support_x)
        weight, bias = self.adapt(support_features, support_y, steps)
        return self.head_logits(self.encode(query_x), weight, bias)

    def meta_step(self, tasks: Sequence[Task], optimizer: torch.optim.Optimizer) -> MetaStepStats:
        """One outer update on a meta-batch of tasks (backward task by task to save memory).

        Returns:
            `MetaStepStats` with the mean query loss and accuracy and per-task results.
        """
        if not tasks:
            raise ValueError("meta_step needs at least one task")
        self.train()
        optimizer.zero_grad(set_to_none=True)
        scale = 1.0 / len(tasks) if self.settings.reduction == "mean" else 1.0
        per_task: list[TaskStats] = []
        for task in tasks:
            logits = self.task_logits(task.support_x, task.support_y, task.query_x)
            loss = F.cross_entropy(logits, task.query_y)
            (loss * scale).backward()
            per_task.append(task_stats(logits.detach(), task, float(loss.detach())))
        optimizer.step()
        return MetaStepStats(
            loss=float(np.mean([t.loss for t in per_task])),
            accuracy=float(np.mean([t.accuracy for t in per_task])),
            tasks=per_task,
        )

    def checkpoint_parts(self, head: HeadRecipe | None = None) -> dict[str, Any]:
        """The learner as plain data for a self-describing checkpoint (tensors and JSON-able
        values only, loadable with `torch.load(weights_only=True)`): {"model", "model_args",
        "state_dict" (the SS encoder), "meta": settings + "ways", "deploy": the head recipe of
        meta-test and the device (`head`, default from the settings) and the meta-learned FC
        init} (`mtl_edge.train.checkpoint`)."""
        encoder: Any = self.encoder
        return {
            "model": str(getattr(encoder, "name", "")),
            "model_args": dict(getattr(encoder, "model_args", {})),
            "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
            "meta": meta_entry(self.settings, self.ways),
            "deploy": deploy_section(
                head or meta_head_recipe(self.settings),
                {"kind": "mtl"},
                (self.fc_weight, self.fc_bias),
            ),
        }

    @torch.no_grad()
    def evaluate_task(self, task: Task, steps: int | None = None) -> TaskStats:
        """Query results of one task in eval mode (validation)."""
        was_training = self.training
        self.eval()
        try:
            logits = self.task_logits(task.support_x, task.support_y, task.query_x, steps)
            loss = float(F.cross_entropy(logits, task.query_y))
            return task_stats(logits, task, loss)
        finally:
            self.train(was_training)


def task_stats(logits: torch.Tensor, task: Task, loss: float) -> TaskStats:
    """`TaskStats` from query logits (n_q, ways)."""
    acc = per_class_accuracy(logits, task.query_y, task.ways)
    return TaskStats(
        classes=[int(c) for c in task.classes],
        class_accuracy=[float(a) for a in acc],
        accuracy=float((logits.argmax(1) == task.query_y).float().mean()),
        loss=loss,
        is_hard=task.is_hard,
    )


def learner_from_parts(
    model: str,
    model_args: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    deploy: dict[str, Any] | None = None,
    meta: dict[str, Any] | MetaConfig | None = None,
    ways: int | None = None,
) -> MetaTransferLearner:
    """A `MetaTransferLearner` from checkpoint parts (see `checkpoint_parts`).

    Args:
        model, model_args: the registry backbone.
        state_dict: the encoder's weights, with SS parameters (meta-training checkpoint) or
            without (pre-training checkpoint: SS starts at identity).
        deploy: a checkpoint's deploy section; its "fc_init" {"weight" (ways, D), "bias"
            (ways,)} is the FC initialisation (None or no fc_init: the settings' `fc_init`).
        meta: `MetaConfig` or a mapping; keys that are not settings fields (e.g. "ways",
            learning rates of the driver) are ignored here.
        ways: N when there is no `fc_init` (default meta["ways"], else 5).

    Raises:
        ConfigError: unknown backbone or weights that do not fit it (one line).
    """
    fc_init = (deploy or {}).get("fc_init")

    if isinstance(meta, MetaConfig):
        settings, meta_map = meta, {}
    else:
        meta_map = dict(meta or {})
        known = {f.name for f in fields(MetaConfig)}
        settings = MetaConfig(**{k: v for k, v in meta_map.items() if k in known})
    encoder = create_backbone(model, **model_args)
    shortcut = bool(model_args.get("ss_shortcut", True))
    has_ss = any(k.endswith("ss_scale") for k in state_dict)
    if has_ss:
        convert_to_ss(encoder, shortcut=shortcut)
    try:
        encoder.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        details = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        first = (details or [str(e)])[0][:200]
        raise ConfigError(
            f"checkpoint weights do not fit backbone {model!r} with {model_args} ({first}); "
            "was it written for another architecture?"
        ) from None
    if fc_init is not None:
        ways = int(fc_init["weight"].shape[0])
    elif ways is None:
        ways = int(meta_map.get("ways", 5))
    learner = MetaTransferLearner(encoder, ways, settings, ss_shortcut=shortcut)
    if fc_init is not None:
        if tuple(fc_init["weight"].shape) != tuple(learner.fc_weight.shape):
            raise ConfigError(
                f"checkpoint fc_init weight {tuple(fc_init['weight'].shape)} does not fit "
                f"({ways}, {learner.fc_weight.shape[1]}) of backbone {model!r}"
            )
        with torch.no_grad():
            learner.fc_weight.copy_(fc_init["weight"])
            learner.fc_bias.copy_(fc_init["bias"])
    return learner
