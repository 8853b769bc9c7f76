"""The open-set threshold: leave-one-out calibration on the enrolled features.

Scores come from a rejection rule (`REJECTIONS`, `scorer`): "probability", the top softmax
probability of the fitted FC head (the paper's head; the default of every gallery made before
rules existed), or "cosine", the largest cosine similarity between the L2-normalised image
feature and the class prototypes (normalised means of the normalised enrolled features).

Known scores: the score of an example held out from the rule fitted on the rest (classes with
at least 2 examples). Unknown scores: the score of every example of a class held out entirely
(needs 3 classes, so that 2 remain). With both, the threshold maximises the balanced accuracy
(known accepted + unknown rejected) / 2, ties to the lowest (`balanced_threshold`); with known
scores only, it is their 5th percentile (`percentile_threshold`); otherwise 0 (no rejection).
Folds are spread evenly and capped (MAX_KNOWN_FOLDS, MAX_UNKNOWN_FOLDS, fewer for large
galleries: CALIBRATION_BUDGET).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mtl_edge.fewshot.fc import HeadWeights, l2_normalize, predict_proba

#: Upper bounds on the refits that threshold calibration runs (leave-one-example-out and
#: leave-one-class-out). Large galleries get fewer folds (never under 4 and 2), so that all
#: folds together cost about CALIBRATION_BUDGET multiply-adds (~2 s on one core).
MAX_KNOWN_FOLDS = 24
MAX_UNKNOWN_FOLDS = 8
CALIBRATION_BUDGET = 3e9
#: Rejection rules; "probability" is what a gallery without the setting uses.
REJECTIONS = ("probability", "cosine")
DEFAULT_REJECTION = "probability"
#: The rule of a gallery made now (chosen by `mtl-edge bench openset`; docs/device.md).
NEW_GALLERY_REJECTION = "cosine"
#: The known-score percentile used when no class can be held out.
KNOWN_PERCENTILE = 0.05

#: Fits a head on features (n, D), labels (n,) for `ways` classes.
FitFn = Callable[[np.ndarray, np.ndarray, int], HeadWeights]
#: Scores queries (n, D) against enrolled features (M, D), labels (M,) of `ways` classes:
#: (features, labels, ways, queries) -> scores (n,), higher meaning "more likely known".
Scorer = Callable[[np.ndarray, np.ndarray, int, np.ndarray], np.ndarray]


def prototypes(x: np.ndarray, y: np.ndarray, ways: int) -> np.ndarray:
    """Unit-norm class prototypes (ways, D): normalised means of the normalised features."""
    z = l2_normalize(np.asarray(x, dtype=np.float64))
    sums = np.zeros((ways, z.shape[1]))
    np.add.at(sums, y, z)
    return l2_normalize(sums / np.maximum(np.bincount(y, minlength=ways), 1)[:, None])


def max_cosine(queries: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """Largest cosine similarity (n,) of queries (n, D) to unit prototypes (ways, D)."""
    return (l2_normalize(np.asarray(queries, dtype=np.float64)) @ protos.T).max(axis=1)


def scorer(rejection: str, fit: FitFn) -> Scorer:
    """The `Scorer` of a rejection rule (see the module docstring)."""
    if rejection == "probability":
        return lambda x, y, ways, q: predict_proba(q, fit(x, y, ways)).max(axis=1)
    if rejection == "cosine":
        return lambda x, y, ways, q: max_cosine(q, prototypes(x, y, ways))
    raise ValueError(f"rejection {rejection!r}: use one of {', '.join(REJECTIONS)}")


def leave_out_scores(
    x: np.ndarray, y: np.ndarray, ways: int, steps: int, score: Scorer
) -> tuple[np.ndarray, np.ndarray]:
    """Known (held-out examples) and unknown (held-out classes) scores, 1-D float64 arrays.

    Args:
        x: enrolled features of shape (M, D), float32.
        y: their class indices of shape (M,), in [0, ways).
        steps: the recipe's gradient steps (sets the cost of one refit, so the fold count).
    """
    fit_cost = 2.0 * x.size * ways * max(steps, 1)
    scale = min(1.0, CALIBRATION_BUDGET / (fit_cost * (MAX_KNOWN_FOLDS + MAX_UNKNOWN_FOLDS)))
    max_known = max(4, int(MAX_KNOWN_FOLDS * scale))
    max_unknown = max(2, int(MAX_UNKNOWN_FOLDS * scale))
    counts = np.bincount(y, minlength=ways)
    candidates = np.flatnonzero(counts[y] >= 2) if ways >= 2 else np.zeros(0, np.int64)
    if len(candidates) > max_known:
        candidates = candidates[np.linspace(0, len(candidates) - 1, max_known).astype(int)]
    known = []
    for i in candidates:
        keep = np.arange(len(y)) != i
        known.append(float(score(x[keep], y[keep], ways, x[i : i + 1])[0]))
    unknown: list[float] = []
    if ways >= 3:
        held = np.linspace(0, ways - 1, min(ways, max_unknown)).astype(int)
        for c in np.unique(held):
            keep = y != c
            relabel = np.where(y[keep] > c, y[keep] - 1, y[keep])
            unknown.extend(np.asarray(score(x[keep], relabel, ways - 1, x[y == c])).tolist())
    return np.asarray(known, np.float64), np.asarray(unknown, np.float64)


def balanced_threshold(known: np.ndarray, unknown: np.ndarray) -> float:
    """The cut maximising (mean(known >= t) + mean(unknown < t)) / 2, ties to the lowest.

    The lowest cut is min(0, scores): every score of a probability rule is accepted there.
    """
    scores = np.unique(np.concatenate([known, unknown]))
    low = min(0.0, float(scores[0]))
    cuts = np.concatenate([[low], (scores[:-1] + scores[1:]) / 2, [scores[-1] + 1e-6]])
    balanced = [(np.mean(known >= t) + np.mean(unknown < t)) / 2 for t in cuts]
    return float(cuts[int(np.argmax(balanced))])


def percentile_threshold(known: np.ndarray) -> float:
    """The KNOWN_PERCENTILE quantile of the known scores."""
    return float(np.quantile(known, KNOWN_PERCENTILE))


def calibrate_threshold(
    x: np.ndarray,
    y: np.ndarray,
    ways: int,
    steps: int,
    fit: FitFn,
    rejection: str = DEFAULT_REJECTION,
) -> tuple[float, dict[str, Any]]:
    """The rejection threshold in [0, 1] and how it was found.

    Args:
        x: enrolled features of shape (M, D), float32.
        y: their class indices of shape (M,), in [0, ways).
        ways: number of enrolled classes.
        steps: the recipe's gradient steps (sets the cost of one refit).
        fit: refits a head on a subset (see FitFn).
        rejection: the rule whose score is thresholded (`REJECTIONS`).

    Returns:
        (threshold, stats): stats holds "method", "rejection", "known", "unknown" (score
        counts) and, when they exist, "known_accepted", "unknown_rejected", or a "note".
    """
    k, u = leave_out_scores(x, y, ways, steps, scorer(rejection, fit))
    stats: dict[str, Any] = {"method": "leave-one-out", "known": len(k), "unknown": len(u)}
    if rejection != DEFAULT_REJECTION:
        stats["rejection"] = rejection
    if len(k) and len(u):
        threshold = balanced_threshold(k, u)
        stats["known_accepted"] = float(np.mean(k >= threshold))
        stats["unknown_rejected"] = float(np.mean(u < threshold))
    elif len(k):
        threshold = percentile_threshold(k)
        stats["known_accepted"] = float(np.mean(k >= threshold))
    else:
        threshold = 0.0
        stats["note"] = "too little data: enroll 2+ images per class to enable rejection"
    return min(max(threshold, 0.0), 1.0), stats
