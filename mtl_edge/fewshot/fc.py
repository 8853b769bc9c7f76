"""The FC softmax base-learner of MTL, trained on support features in numpy, and its recipe.

This is the only learning that happens on the device, and the one implementation of the MTL head
that every evaluation uses (meta-test, grid, export checks, `bench accuracy`): a linear layer
(weight (ways, D), bias (ways,)) fitted by T steps of full-batch gradient descent on the mean
cross-entropy of the support set, with the analytic gradient

    G = (softmax(X W^T + b) - onehot(y)) / N,   dW = G^T X + weight_decay * W,   db = sum_n G

(weight_decay is the coefficient of 0.5 * ||W||^2; the bias is not decayed). It matches the
training stack's PyTorch inner loop (`mtl_edge.train.base_learner.inner_loop`, plain SGD
w <- w - lr * grad) within 1e-4; a test checks it.

Arithmetic runs in float64 internally: on features of a few hundred dimensions float32
accumulation drifts by ~1e-6 per step, float64 keeps the result independent of BLAS blocking
and still fits 25 x 640 features for 100 steps in well under 5 ms. Weights are returned as
float32.

The recipe's `loss` names the reduction the head was meta-trained with: "mean" (the default);
"sum" over the support set; "tf", the TF code's per-example cross-entropy / shots, summed
(= ways x the mean). The gradient of each is c x the gradient of the mean (`loss_scale`), so the
mean-loss loop runs with lr x c and weight decay / c, which is the same update.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np

from mtl_edge.errors import BundleError, shown

log = logging.getLogger(__name__)

HEAD_INITS = ("zeros", "meta", "imprint")
HEAD_LOSSES = ("mean", "sum", "tf")
#: Bounds of a `HeadRecipe` (the paper's recipes use 10-100 steps at lr 1e-3..1e-2).
MAX_HEAD_STEPS = 10_000
MAX_HEAD_LR = 100.0
MAX_WEIGHT_DECAY = 1000.0
_EPS = 1e-12


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class HeadRecipe:
    """How the FC base-learner is fitted on support features.

    Attributes:
        steps: gradient steps T of the inner loop.
        lr: learning rate alpha (of the mean loss; see `loss`).
        init: "zeros", "meta" (the meta-learned initialisation) or "imprint" (rows set to
            normalised class means).
        normalize: L2-normalise features before the head.
        weight_decay: coefficient of 0.5 * ||W||^2.
        loss: "mean", "sum" or "tf" (see the module docstring).
    """

    steps: int = 100
    lr: float = 0.01
    init: str = "zeros"
    normalize: bool = False
    weight_decay: float = 0.0
    loss: str = "mean"

    def __post_init__(self) -> None:
        # A recipe comes from manifests and galleries, which are untrusted: every field is
        # type-checked and bounded (steps: 1e9 would hang the device).
        if not isinstance(self.init, str) or self.init not in HEAD_INITS:
            raise BundleError(f"head.init={shown(self.init)}: use one of {', '.join(HEAD_INITS)}")
        if not isinstance(self.loss, str) or self.loss not in HEAD_LOSSES:
            raise BundleError(f"head.loss={shown(self.loss)}: use one of {', '.join(HEAD_LOSSES)}")
        if not _is_int(self.steps) or not 0 <= self.steps <= MAX_HEAD_STEPS:
            raise BundleError(
                f"head.steps={shown(self.steps)}: use an integer in 0..{MAX_HEAD_STEPS}"
            )
        if not _is_real(self.lr) or not 0 < self.lr <= MAX_HEAD_LR:
            raise BundleError(f"head.lr={shown(self.lr)}: use a number in (0, {MAX_HEAD_LR:g}]")
        if not _is_real(self.weight_decay) or not 0 <= self.weight_decay <= MAX_WEIGHT_DECAY:
            raise BundleError(
                f"head.weight_decay={shown(self.weight_decay)}: use a number in "
                f"[0, {MAX_WEIGHT_DECAY:g}]"
            )
        if not isinstance(self.normalize, bool):
            raise BundleError(f"head.normalize={shown(self.normalize)}: use true or false")
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "weight_decay", float(self.weight_decay))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        ways: int,
        meta_init: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> HeadWeights:
        """`fit_head` with this recipe; a "meta" init that does not fit `ways` (or is absent)
        falls back to zeros silently (`resolve_init`), as every evaluation and the gallery do."""
        return fit_head(
            features,
            labels,
            ways,
            self.steps,
            self.lr,
            resolve_init(self.init, meta_init, ways),
            meta_init,
            self.normalize,
            self.weight_decay,
            self.loss,
        )


def loss_scale(loss: str, n_support: int, ways: int) -> float:
    """Factor c such that the gradient of the `loss` reduction is c x the mean loss's."""
    if loss == "mean":
        return 1.0
    if loss == "sum":
        return float(n_support)
    if loss == "tf":
        return float(ways)
    raise ValueError(f"loss={loss!r}: use one of {', '.join(HEAD_LOSSES)}")


def resolve_init(init: str, meta_init: tuple[np.ndarray, np.ndarray] | None, ways: int) -> str:
    """The init that `init` means for a task of `ways` classes: "meta" becomes "zeros" when
    there is no meta-learned init or it was learned for another number of classes."""
    if init == "meta" and (meta_init is None or meta_init[0].shape[0] != ways):
        return "zeros"
    return init


@dataclass(frozen=True)
class HeadWeights:
    """A fitted FC head.

    Attributes:
        weight: float32 array of shape (ways, D).
        bias: float32 array of shape (ways,).
        normalize: features are L2-normalised before the head (at fit and at predict time).
        init: the initialisation actually used ("zeros", "meta" or "imprint"); after a
            fallback this names the fallback.
    """

    weight: np.ndarray
    bias: np.ndarray
    normalize: bool = False
    init: str = "zeros"

    @property
    def ways(self) -> int:
        return int(self.weight.shape[0])


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero). Shape preserved: (N, D)."""
    norm = np.sqrt(np.sum(features * features, axis=1, keepdims=True))
    return features / np.maximum(norm, _EPS)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits of shape (N, ways), numerically stable."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check_inputs(features: np.ndarray, labels: np.ndarray, ways: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be ({features.shape[0]},), got {labels.shape}")
    if ways < 1:
        raise ValueError(f"ways must be >= 1, got {ways}")
    if labels.size and (labels.min() < 0 or labels.max() >= ways):
        raise ValueError(f"labels must lie in [0, {ways}), got [{labels.min()}, {labels.max()}]")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or infinity")


def initial_weights(
    features: np.ndarray,
    labels: np.ndarray,
    ways: int,
    init: str,
    meta_init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The starting point of the inner loop.

    Args:
        features: float64 array of shape (N, D), already normalised if the head normalises.
        labels: int array of shape (N,).
        init: "zeros", "meta" or "imprint".
        meta_init: (weight (ways_m, D), bias (ways_m,)), the bundle's meta-learned init.

    Returns:
        (weight (ways, D) float64, bias (ways,) float64, the init actually used). "meta" falls
        back to "zeros" with a warning when there is no meta init or it was learned for another
        number of classes: the meta-learned rows are tied to episode slots, not to classes, so
        they cannot be cut or padded meaningfully.
    """
    dim = features.shape[1]
    if init not in HEAD_INITS:
        raise ValueError(f"init={init!r}: use one of {', '.join(HEAD_INITS)}")
    if init == "meta":
        if meta_init is None:
            log.warning("head init 'meta': the bundle has no meta-learned init; using zeros")
            init = "zeros"
        else:
            weight, bias = meta_init
            if weight.shape[1] != dim:
                raise BundleError(
                    f"meta-learned head init has feature size {weight.shape[1]}, features have "
                    f"{dim}; the bundle is inconsistent, export it again"
                )
            if weight.shape[0] != ways:
                log.warning(
                    "head init 'meta' was learned for %d classes, the gallery has %d; "
                    "using zeros instead",
                    weight.shape[0],
                    ways,
                )
                init = "zeros"
            else:
                return weight.astype(np.float64), bias.astype(np.float64).reshape(ways), "meta"
    if init == "imprint":
        counts = np.bincount(labels, minlength=ways)
        if np.any(counts == 0):
            raise ValueError(f"init 'imprint' needs an example of every class, counts {counts}")
        sums = np.zeros((ways, dim), dtype=np.float64)
        np.add.at(sums, labels, features)
        return l2_normalize(sums / counts[:, None]), np.zeros(ways, dtype=np.float64), "imprint"
    return np.zeros((ways, dim), dtype=np.float64), np.zeros(ways, dtype=np.float64), "zeros"


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    ways: int,
    steps: int = 100,
    lr: float = 0.01,
    init: str = "zeros",
    meta_init: tuple[np.ndarray, np.ndarray] | None = None,
    normalize: bool = False,
    weight_decay: float = 0.0,
    loss: str = "mean",
) -> HeadWeights:
    """Fit the FC head by `steps` of full-batch gradient descent on the cross-entropy.

    Deterministic: the same inputs give bit-identical weights.

    Args:
        features: array of shape (N, D) (any float dtype).
        labels: int array of shape (N,) with values in [0, ways).
        ways: number of classes.
        steps: T, the number of gradient steps (0 returns the initialisation).
        lr: learning rate alpha.
        init: "zeros", "meta" or "imprint" (see `initial_weights`).
        meta_init: (weight (ways, D), bias (ways,)) for init "meta".
        normalize: L2-normalise features first.
        weight_decay: coefficient of 0.5 * ||W||^2 added to the loss.
        loss: "mean", "sum" or "tf" reduction (see the module docstring).

    Returns:
        The fitted `HeadWeights` (float32).
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    _check_inputs(x, y, ways)
    if steps < 0 or lr <= 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if normalize:
        x = l2_normalize(x)
    weight, bias, used = initial_weights(x, y, ways, init, meta_init)
    n = x.shape[0]
    c = loss_scale(loss, n, ways)
    lr, weight_decay = lr * c, weight_decay / c
    if n:
        onehot = np.zeros((n, ways), dtype=np.float64)
        onehot[np.arange(n), y] = 1.0
        for _ in range(steps):
            grad = softmax(x @ weight.T + bias)
            grad -= onehot
            grad /= n
            grad_w = grad.T @ x
            if weight_decay:
                grad_w = grad_w + weight_decay * weight
            weight = weight - lr * grad_w
            bias = bias - lr * grad.sum(axis=0)
    return HeadWeights(
        weight=weight.astype(np.float32),
        bias=bias.astype(np.float32),
        normalize=normalize,
        init=used,
    )


def head_logits(features: np.ndarray, head: HeadWeights) -> np.ndarray:
    """Logits of shape (N, ways) for features of shape (N, D), float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != head.weight.shape[1]:
        raise ValueError(f"features must be (N, {head.weight.shape[1]}), got {x.shape}")
    if head.normalize:
        x = l2_normalize(x)
    return x @ head.weight.astype(np.float64).T + head.bias.astype(np.float64)


def predict_proba(features: np.ndarray, head: HeadWeights) -> np.ndarray:
    """Class probabilities of shape (N, ways), float32, for features of shape (N, D)."""
    return softmax(head_logits(features, head)).astype(np.float32)
