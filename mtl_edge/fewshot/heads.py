"""Few-shot heads on features: one contract, one implementation per head.

Every head follows easyfsl's `process_support_set` / `forward` idea:
`fit(support (n_s, D), labels (n_s,))` with labels 0..ways-1, then
`predict(query (n_q, D)) -> scores (n_q, ways)` (the highest score is the prediction). A fresh
head is made per episode by a `HeadFactory` (a callable with no arguments), so every caller
(meta-test, the joint grid, export's checks, `bench accuracy`) runs the same code on the same
episodes and gets the same number.

- `FCHead` ("mtl"): the FC base-learner of MTL, T steps of gradient descent from the
  meta-learned initialisation (`mtl_edge.fewshot.fc`, the code the device runs).
- `CentroidHead` ("centroid", "centroid-euclidean"): ProtoNet-style class means. Cosine by
  default: pre-trained ReLU features are non-negative and their norms vary a lot between images,
  and with 1-5 shots the Euclidean distance is dominated by those norms (SimpleShot's
  observation); "euclidean" scores by the negative squared distance, as ProtoNet.
- `LogRegHead` ("logreg"): RFS-simple; L2-normalised features, multinomial logistic regression
  with scikit-learn's default objective (C * summed cross-entropy + 0.5 * ||W||^2, bias not
  penalised), solved by SciPy's L-BFGS in float64 from zeros (deterministic).

The image head that fine-tunes the whole backbone (`mtl_edge.train.finetune.FinetuneHead`) keeps
the same contract with images in place of features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from mtl_edge.errors import ConfigError, UnavailableError
from mtl_edge.fewshot.fc import HeadRecipe, HeadWeights, head_logits, l2_normalize, softmax

#: Feature heads by name; aliases resolve to them.
FEATURE_HEADS = ("mtl", "centroid", "centroid-euclidean", "logreg")
ALIASES = {"fc": "mtl", "ft": "finetune"}


class Head(Protocol):
    """A few-shot classifier fitted on one episode's support set."""

    def fit(self, support: np.ndarray, labels: np.ndarray) -> None:
        """Learn from support inputs (n_s, ...) and episode labels (n_s,) in 0..ways-1."""

    def predict(self, query: np.ndarray) -> np.ndarray:
        """Scores of shape (n_q, ways) for query inputs (n_q, ...)."""


HeadFactory = Callable[[], Head]


def _ways(labels: np.ndarray) -> int:
    return int(np.max(labels)) + 1


def _features(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


class FCHead:
    """The MTL FC base-learner: `recipe` fitted from `meta_init` (or zeros, see
    `mtl_edge.fewshot.fc.resolve_init`) on the support features.

    Args:
        recipe: steps, lr, init, normalize, weight decay and loss of the inner loop.
        meta_init: the meta-learned (weight (ways_m, D), bias (ways_m,)), or None.
    """

    def __init__(
        self,
        recipe: HeadRecipe | None = None,
        meta_init: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.recipe = recipe or HeadRecipe()
        self.meta_init = meta_init
        self.weights: HeadWeights | None = None

    def fit(self, support: np.ndarray, labels: np.ndarray) -> None:
        """Fit on support features (n_s, D) and labels (n_s,)."""
        labels = np.asarray(labels, dtype=np.int64)
        self.weights = self.recipe.fit(support, labels, _ways(labels), self.meta_init)

    def predict(self, query: np.ndarray) -> np.ndarray:
        """Logits of shape (n_q, ways)."""
        if self.weights is None:
            raise RuntimeError("FCHead.predict before fit")
        return head_logits(query, self.weights)


class CentroidHead:
    """Class means of the support features; scores are cosine similarities (default) or
    negative squared Euclidean distances to them.

    Args:
        metric: "cosine" or "euclidean".
    """

    def __init__(self, metric: str = "cosine") -> None:
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"centroid metric={metric!r}: use cosine or euclidean")
        self.metric = metric
        self.centroids: np.ndarray | None = None

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = _features(x)
        return l2_normalize(x) if self.metric == "cosine" else x

    def fit(self, support: np.ndarray, labels: np.ndarray) -> None:
        """Centroids of shape (ways, D) from features (n_s, D) and labels (n_s,)."""
        x, labels = self._prepare(support), np.asarray(labels, dtype=np.int64)
        ways = _ways(labels)
        sums = np.zeros((ways, x.shape[1]))
        np.add.at(sums, labels, x)
        counts = np.maximum(np.bincount(labels, minlength=ways), 1)
        self.centroids = sums / counts[:, None]

    def predict(self, query: np.ndarray) -> np.ndarray:
        """Scores of shape (n_q, ways)."""
        if self.centroids is None:
            raise RuntimeError("CentroidHead.predict before fit")
        x = self._prepare(query)
        if self.metric == "cosine":
            return x @ l2_normalize(self.centroids).T
        sq = (x * x).sum(1)[:, None] - 2 * x @ self.centroids.T
        return -(sq + (self.centroids * self.centroids).sum(1)[None, :])


class LogRegHead:
    """Multinomial logistic regression on L2-normalised features (RFS-simple).

    Minimises C * sum_n CE(x_n W^T + b, y_n) + 0.5 * ||W||^2 (scikit-learn's default with
    C = 1) with SciPy's L-BFGS-B, float64, from zeros.

    Args:
        C: inverse regularisation strength.
        max_iter: L-BFGS iterations.

    Raises:
        UnavailableError: SciPy is not installed (pip install 'mtl-edge[train]' or scipy).
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100) -> None:
        if C <= 0 or max_iter < 1:
            raise ConfigError(f"logreg C={C}, max_iter={max_iter}: need C > 0, max_iter >= 1")
        try:
            from scipy.optimize import minimize
        except ImportError:
            raise UnavailableError(
                "the logreg head needs SciPy; pip install scipy (or mtl-edge[train])"
            ) from None
        self._minimize = minimize
        self.C, self.max_iter = C, max_iter
        self.weights: HeadWeights | None = None

    def fit(self, support: np.ndarray, labels: np.ndarray) -> None:
        """Fit on features (n_s, D) and labels (n_s,)."""
        x = l2_normalize(_features(support))
        y = np.asarray(labels, dtype=np.int64)
        n, dim = x.shape
        ways = _ways(y)
        onehot = np.zeros((n, ways))
        onehot[np.arange(n), y] = 1.0

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[: ways * dim].reshape(ways, dim), theta[ways * dim :]
            z = x @ w.T + b
            z_max = z.max(axis=1, keepdims=True)
            log_norm = z_max[:, 0] + np.log(np.exp(z - z_max).sum(axis=1))
            loss = self.C * float((log_norm - z[np.arange(n), y]).sum()) + 0.5 * float(
                (w * w).sum()
            )
            g = self.C * (softmax(z) - onehot)
            return loss, np.concatenate([(g.T @ x + w).ravel(), g.sum(axis=0)])

        result = self._minimize(
            objective,
            np.zeros(ways * dim + ways),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "maxcor": 20, "gtol": 1e-8, "ftol": 1e-12},
        )
        theta = result.x
        self.weights = HeadWeights(
            theta[: ways * dim].reshape(ways, dim).astype(np.float32),
            theta[ways * dim :].astype(np.float32),
            normalize=True,
        )

    def predict(self, query: np.ndarray) -> np.ndarray:
        """Logits of shape (n_q, ways)."""
        if self.weights is None:
            raise RuntimeError("LogRegHead.predict before fit")
        return head_logits(query, self.weights)


def canonical_heads(names: list[str] | tuple[str, ...], known: tuple[str, ...]) -> list[str]:
    """Head names with aliases resolved ("fc" -> "mtl", "ft" -> "finetune"), in order, without
    duplicates.

    Raises:
        ConfigError: a name not in `known`.
    """
    resolved = [ALIASES.get(n, n) for n in names]
    unknown = [n for n in resolved if n not in known]
    if unknown:
        raise ConfigError(f"heads {', '.join(unknown)} unknown; use some of {', '.join(known)}")
    return list(dict.fromkeys(resolved))


def feature_head(
    name: str,
    recipe: HeadRecipe | None = None,
    meta_init: tuple[np.ndarray, np.ndarray] | None = None,
) -> HeadFactory:
    """The factory of feature head `name` (see `FEATURE_HEADS`); "mtl" fits `recipe` from
    `meta_init`.

    Raises:
        ConfigError: an unknown name.
    """
    (name,) = canonical_heads([name], FEATURE_HEADS)
    if name == "mtl":
        return lambda: FCHead(recipe, meta_init)
    if name == "centroid":
        return CentroidHead
    if name == "centroid-euclidean":
        return lambda: CentroidHead("euclidean")
    return LogRegHead
