"""Meta-transfer (phase 2): learn SS and the FC initialisation over few-shot tasks.

The SS encoder embeds the support and query images of every task of a meta-batch (in one
forward pass per side when BN is frozen; task by task when BN uses batch statistics), the FC
base-learner of each task starts from the meta-learned initialisation (`fc_weight`, `fc_bias`)
and takes T gradient steps on its support set, all tasks at once
(`mtl_edge.train.base_learner.batched_inner_loop`; `meta.inner_loop = "autograd"` runs the
per-task autograd reference instead; SS is not adapted in the inner loop), and the query
cross-entropy of the fast weights is each task's meta-loss. `meta_step` reduces the meta-batch's
losses (mean over tasks by default, or the sum), runs one backward pass and one optimizer step
on SS (and BN affine when `bn_mode="train"`) and the FC initialisation. Its results stay on the
device (`mtl_edge.train.tasks.MetaStepStats`). With `compile`, the encoder runs through
`torch.compile` (`runtime.compile`; the driver sets it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.errors import ConfigError
from mtl_edge.fewshot.fc import HeadRecipe, loss_scale
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.base_learner import batched_inner_loop, fc_logits, inner_loop
from mtl_edge.train.checkpoint import deploy_section, meta_entry, meta_head_recipe
from mtl_edge.train.precision import fused_options
from mtl_edge.train.ss import (
    bn_parameters,
    convert_to_ss,
    freeze_backbone,
    set_bn_mode,
    ss_modules,
    ss_parameters,
)
from mtl_edge.train.stage_config import MetaConfig
from mtl_edge.train.tasks import (  # noqa: F401 - re-exported: the learner's task types
    MetaStepStats,
    Task,
    TaskBuilder,
    TaskStats,
    make_task,
    query_results,
)

log = logging.getLogger(__name__)


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
        self.compile = False  # run the encoder through torch.compile (set by the driver)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_compiled", None)  # a copy (the budget probe) compiles its own encoder
        return state

    def _encoder_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if not self.compile:
            return self.encoder
        cached = self.__dict__.get("_compiled")
        if cached is None or cached[0] is not self.encoder:
            cached = (self.encoder, torch.compile(self.encoder))
            self.__dict__["_compiled"] = cached
        return cached[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """FP32 features (B, D) of images (B, C, H, W); the encoder runs under `self.autocast`."""
        with self.autocast():
            return self._encoder_fn()(x).float()

    def encode_tasks(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """FP32 features (T, n, D) of T equally sized image batches (n, C, H, W): one encoder
        pass over all of them, or one per task when BN normalises with batch statistics
        (bn_mode="train": a task's statistics must not mix with another's)."""
        if self.settings.bn_mode == "train" and self.training:
            return torch.stack([self.encode(x) for x in images])
        feats = self.encode(torch.cat(list(images)))
        return feats.view(len(images), -1, feats.shape[1])

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
        """Adam with separate learning rates (official PyTorch code: 1e-4 SS, 1e-3 FC); the
        fused kernel on a GPU (`mtl_edge.train.precision.fused_options`)."""
        groups = self.meta_parameters()
        return torch.optim.Adam(
            [{"params": groups["ss"], "lr": ss_lr}, {"params": groups["fc"], "lr": fc_lr}],
            **fused_options(self.fc_weight.device),
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

    def adapt_tasks(
        self,
        support_features: torch.Tensor,
        support_y: torch.Tensor,
        ways: int,
        steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast FC weights (T, ways, D), (T, ways) from support features (T, n_s, D) and labels
        (T, n_s) of T tasks of `ways` classes, by `settings.inner_loop`."""
        s = self.settings
        if steps is None:
            steps = s.inner_steps if self.training else s.test_steps
        weight, bias = self.initial_head(ways)
        c = loss_scale(s.inner_loss, support_y.shape[1], ways)
        kw = {
            "steps": steps,
            "lr": s.inner_lr * c,
            "create_graph": s.second_order and self.training,
            "normalize": s.normalize,
            "weight_decay": s.inner_weight_decay / c,
        }
        if s.inner_loop == "batched":
            return batched_inner_loop(support_features, support_y, weight, bias, **kw)
        fast = [
            inner_loop(f, y, weight, bias, **kw)
            for f, y in zip(support_features, support_y, strict=True)
        ]
        return torch.stack([w for w, _ in fast]), torch.stack([b for _, b in fast])

    def adapt(
        self, support_features: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast FC weights (ways, D), (ways,) from support features (n_s, D) and labels (n_s,)."""
        ways = int(support_y.max()) + 1
        w, b = self.adapt_tasks(support_features[None], support_y[None], ways, steps)
        return w[0], b[0]

    def head_logits(
        self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Logits (..., n, ways) of features (..., n, D) under fast heads (..., ways, D)."""
        if self.settings.normalize:
            features = F.normalize(features, dim=-1, eps=1e-12)
        if features.ndim == 2:
            return fc_logits(features, weight, bias)
        return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))

    def tasks_logits(
        self,
        support_x: Sequence[torch.Tensor],
        support_y: torch.Tensor,
        query_x: Sequence[torch.Tensor],
        ways: int,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Query logits (T, n_q, ways) of T tasks after adapting each FC on its support set.

        Args:
            support_x: T batches (n_s, C, H, W); support_y: (T, n_s) episode labels.
            query_x: T batches (n_q, C, H, W).
            ways: classes per task.
            steps: inner steps; None uses inner_steps in train mode and test_steps in eval.
        """
        first_order = self.training and not self.settings.second_order
        # first order: support features never reach the outer gradient (see base_learner)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not first_order):
            support = self.encode_tasks(support_x)
        weight, bias = self.adapt_tasks(support, support_y, ways, steps)
        return self.head_logits(self.encode_tasks(query_x), weight, bias)

    def task_logits(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Query logits (ways * queries, ways) of one task (`tasks_logits` with T = 1)."""
        ways = int(support_y.max()) + 1
        return self.tasks_logits([support_x], support_y[None], [query_x], ways, steps)[0]

    def meta_step(self, tasks: Sequence[Task], optimizer: torch.optim.Optimizer) -> MetaStepStats:
        """One outer update on a meta-batch of tasks (equal ways, shots and queries): one
        batched forward, one backward, one optimizer step; nothing waits for the GPU.

        Returns:
            `MetaStepStats`: per-task query loss and accuracies on the device.
        """
        if not tasks:
            raise ValueError("meta_step needs at least one task")
        shapes = {(t.ways, len(t.support_y), len(t.query_y)) for t in tasks}
        if len(shapes) > 1:
            raise ValueError(f"meta_step: tasks of one meta-batch differ in shape: {shapes}")
        self.train()
        optimizer.zero_grad(set_to_none=True)
        query_y = torch.stack([t.query_y for t in tasks])
        logits = self.tasks_logits(
            [t.support_x for t in tasks],
            torch.stack([t.support_y for t in tasks]),
            [t.query_x for t in tasks],
            tasks[0].ways,
        )
        losses, accuracies, per_class = query_results(logits, query_y, tasks[0].ways)
        stats = MetaStepStats(losses, accuracies, per_class, tasks)
        (losses.mean() if self.settings.reduction == "mean" else losses.sum()).backward()
        optimizer.step()
        return stats

    def checkpoint_parts(self, head: HeadRecipe | None = None) -> dict[str, Any]:
        """The learner as plain data for a self-describing checkpoint (tensors and JSON-able
        values only, loadable with `torch.load(weights_only=True)`): {"model", "model_args",
        "state_dict" (the SS encoder, copies on the CPU), "meta": settings + "ways", "deploy":
        the head recipe of meta-test and the device (`head`, default from the settings) and the
        meta-learned FC init} (`mtl_edge.train.checkpoint`)."""
        encoder: Any = self.encoder
        return {
            "model": str(getattr(encoder, "name", "")),
            "model_args": dict(getattr(encoder, "model_args", {})),
            "state_dict": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
            "meta": meta_entry(self.settings, self.ways),
            "deploy": deploy_section(
                head or meta_head_recipe(self.settings),
                {"kind": "mtl"},
                (self.fc_weight.clone(), self.fc_bias.clone()),
            ),
        }

    @torch.no_grad()
    def evaluate_task(self, task: Task, steps: int | None = None) -> TaskStats:
        """Query results of one task in eval mode (validation)."""
        was_training = self.training
        self.eval()
        try:
            logits = self.tasks_logits(
                [task.support_x], task.support_y[None], [task.query_x], task.ways, steps
            )
            results = query_results(logits, task.query_y[None], task.ways)
            return MetaStepStats(*results, [task]).tasks[0]
        finally:
            self.train(was_training)


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
