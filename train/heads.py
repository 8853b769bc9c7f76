"""Meta-test heads on frozen, cached features, and the image-based fine-tune-everything ablation.

Every feature head follows one protocol (easyfsl's process_support_set / forward idea):
`fit(support_features (n_s, D), support_labels (n_s,))`, then
`predict(query_features (n_q, D)) -> logits (n_q, ways)`. A fresh head is made per episode
through a `HeadFactory` (a callable with no arguments).

- `MTLHead`: the FC base-learner of MTL, T steps from the meta-learned initialisation.
- `NearestCentroidHead`: ProtoNet-style class means. Cosine by default: pre-trained ReLU
  features are non-negative and their norms vary a lot between images, and with 1-5 shots the
  Euclidean distance is dominated by those norms (SimpleShot's observation); "euclidean" (negative
  squared distance, as ProtoNet) is available.
- `LogisticRegressionHead`: RFS-simple; L2-normalised features, multinomial logistic regression
  with the objective of scikit-learn's default (C * summed cross-entropy + 0.5 * ||W||^2, bias not
  penalised), solved by L-BFGS in float64 (no scikit-learn dependency).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.errors import ConfigError
from mtl_edge.train.base_learner import fc_logits, inner_loop, mean_loss_scale
from mtl_edge.train.ss import revert_ss


class Head(Protocol):
    """A few-shot classifier on features."""

    def fit(self, support_features: torch.Tensor, support_labels: torch.Tensor) -> None: ...

    def predict(self, query_features: torch.Tensor) -> torch.Tensor: ...


HeadFactory = Callable[[], Head]


def _ways(labels: torch.Tensor) -> int:
    return int(labels.max()) + 1


class MTLHead:
    """FC base-learner adapted by `inner_loop` from an initialisation.

    Args:
        weight, bias: the meta-learned init of shape (ways_m, D), (ways_m,); None, or a task of
            another number of ways, starts from zeros.
        steps, lr: T and alpha of the test-time inner loop (100, 0.01 as the PyTorch code).
        normalize: L2-normalise features.
        weight_decay: coefficient of 0.5 * ||W||^2.
        inner_loss: "mean", "sum" or "tf" (see `MetaSettings.inner_loss`).
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        steps: int = 100,
        lr: float = 0.01,
        normalize: bool = False,
        weight_decay: float = 0.0,
        inner_loss: str = "mean",
    ) -> None:
        self.init_weight = None if weight is None else weight.detach().float().cpu()
        self.init_bias = None if bias is None else bias.detach().float().cpu()
        self.steps, self.lr = steps, lr
        self.normalize, self.weight_decay = normalize, weight_decay
        self.inner_loss = inner_loss
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    @classmethod
    def factory_from_learner(cls, learner: Any) -> HeadFactory:
        """A factory of heads with a `MetaTransferLearner`'s init and test settings."""
        s = learner.settings
        weight, bias = learner.fc_weight, learner.fc_bias
        return lambda: cls(
            weight, bias, s.test_steps, s.inner_lr, s.normalize, s.inner_weight_decay, s.inner_loss
        )

    def fit(self, support_features: torch.Tensor, support_labels: torch.Tensor) -> None:
        """Adapt on support features (n_s, D) and labels (n_s,)."""
        ways, dim = _ways(support_labels), support_features.shape[1]
        x = support_features.float()
        if self.init_weight is not None and self.init_weight.shape == (ways, dim):
            w0, b0 = self.init_weight.to(x.device), self.init_bias.to(x.device)  # type: ignore[union-attr]
        else:
            w0, b0 = x.new_zeros(ways, dim), x.new_zeros(ways)
        c = mean_loss_scale(self.inner_loss, len(support_labels), ways)
        lr, wd = self.lr * c, self.weight_decay / c
        self.weight, self.bias = inner_loop(
            x, support_labels, w0, b0, self.steps, lr, normalize=self.normalize, weight_decay=wd
        )

    def predict(self, query_features: torch.Tensor) -> torch.Tensor:
        """Logits of shape (n_q, ways)."""
        if self.weight is None or self.bias is None:
            raise RuntimeError("MTLHead.predict before fit")
        x = query_features.float()
        if self.normalize:
            x = F.normalize(x, dim=1, eps=1e-12)
        return fc_logits(x, self.weight, self.bias)


class NearestCentroidHead:
    """Class means of the support features; logits are cosine similarities (default) or
    negative squared Euclidean distances to them.

    Args:
        metric: "cosine" or "euclidean".
    """

    def __init__(self, metric: str = "cosine") -> None:
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"centroid metric={metric!r}: use cosine or euclidean")
        self.metric = metric
        self.centroids: torch.Tensor | None = None

    def fit(self, support_features: torch.Tensor, support_labels: torch.Tensor) -> None:
        """Centroids of shape (ways, D) from features (n_s, D) and labels (n_s,)."""
        x = support_features.float()
        if self.metric == "cosine":
            x = F.normalize(x, dim=1, eps=1e-12)
        ways = _ways(support_labels)
        sums = x.new_zeros(ways, x.shape[1]).index_add_(0, support_labels, x)
        counts = torch.bincount(support_labels, minlength=ways).clamp_min(1)
        self.centroids = sums / counts[:, None].to(x.dtype)

    def predict(self, query_features: torch.Tensor) -> torch.Tensor:
        """Logits of shape (n_q, ways)."""
        if self.centroids is None:
            raise RuntimeError("NearestCentroidHead.predict before fit")
        x = query_features.float()
        if self.metric == "cosine":
            return F.normalize(x, dim=1, eps=1e-12) @ F.normalize(self.centroids, dim=1).T
        return -torch.cdist(x, self.centroids).pow(2)


class LogisticRegressionHead:
    """Multinomial logistic regression on L2-normalised features (RFS-simple).

    Minimises C * sum_n CE(x_n W^T + b, y_n) + 0.5 * ||W||^2 (scikit-learn's default with
    C = 1) by L-BFGS with a strong-Wolfe line search, float64, from zeros (deterministic).

    Args:
        C: inverse regularisation strength.
        max_iter: L-BFGS iterations.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100) -> None:
        if C <= 0 or max_iter < 1:
            raise ConfigError(f"logreg C={C}, max_iter={max_iter}: need C > 0, max_iter >= 1")
        self.C, self.max_iter = C, max_iter
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(self, support_features: torch.Tensor, support_labels: torch.Tensor) -> None:
        """Fit on features (n_s, D) and labels (n_s,)."""
        x = F.normalize(support_features.double(), dim=1, eps=1e-12)
        ways = _ways(support_labels)
        with torch.enable_grad():
            w = x.new_zeros(ways, x.shape[1]).requires_grad_(True)
            b = x.new_zeros(ways).requires_grad_(True)
            opt = torch.optim.LBFGS(
                [w, b],
                lr=1.0,
                max_iter=self.max_iter,
                tolerance_grad=1e-8,
                tolerance_change=1e-12,
                history_size=20,
                line_search_fn="strong_wolfe",
            )

            def closure() -> torch.Tensor:
                opt.zero_grad()
                ce = F.cross_entropy(fc_logits(x, w, b), support_labels, reduction="sum")
                loss = self.C * ce + 0.5 * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()

    def predict(self, query_features: torch.Tensor) -> torch.Tensor:
        """Logits of shape (n_q, ways)."""
        if self.weight is None or self.bias is None:
            raise RuntimeError("LogisticRegressionHead.predict before fit")
        x = F.normalize(query_features.double(), dim=1, eps=1e-12)
        return fc_logits(x, self.weight, self.bias).float()


def _feature_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The (B, C, H, W) -> (B, D) feature function of a backbone or a learner's encoder."""
    inner = getattr(model, "encoder", model)
    fn = getattr(inner, "forward_features", None)
    if fn is None:
        raise ConfigError(f"{type(model).__name__} has no forward_features; pass a backbone")
    return fn


def finetune_everything(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    steps: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
) -> torch.Tensor:
    """The paper's FT ablation: fine-tune a copy of the whole backbone and a zero-initialised FC
    on the support set, then classify the query set.

    The copy's SS convs are turned back into plain convs so every weight trains; BatchNorm stays
    in eval mode (running statistics: a 5-25 image support set gives poor batch statistics) but
    its affine parameters train. Full-batch SGD with momentum on the mean cross-entropy.

    Args:
        model: a backbone (or a `MetaTransferLearner`, whose encoder is used); left unchanged.
        support_x: (n_s, C, H, W); support_y: (n_s,) episode labels; query_x: (n_q, C, H, W).

    Returns:
        Query logits of shape (n_q, ways), detached.
    """
    net = revert_ss(copy.deepcopy(getattr(model, "encoder", model))).eval()
    for p in net.parameters():
        p.requires_grad_(True)
    features = _feature_fn(net)
    ways = _ways(support_y)
    dim = int(getattr(net, "feature_dim"))  # noqa: B009 - registry attribute
    device = support_x.device
    fc = nn.Linear(dim, ways).to(device)
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    opt = torch.optim.SGD(list(net.parameters()) + list(fc.parameters()), lr=lr, momentum=momentum)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(fc(features(support_x)), support_y).backward()
            opt.step()
    with torch.no_grad():
        return fc(features(query_x))
