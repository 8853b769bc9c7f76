"""The open-set threshold: leave-one-out calibration on the enrolled features.

Known scores: the top probability of an example held out from a head fitted on the rest
(classes with at least 2 examples). Unknown scores: the top probability of every example of a
class held out entirely (needs 3 classes, so that 2 remain). With both, the threshold maximises
the balanced accuracy (known accepted + unknown rejected) / 2, ties to the lowest; with known
scores only, it is their 5th percentile; otherwise 0 (no rejection). Folds are spread evenly and
capped (MAX_KNOWN_FOLDS, MAX_UNKNOWN_FOLDS, fewer for large galleries: CALIBRATION_BUDGET).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mtl_edge.fewshot.fc import HeadWeights, predict_proba

#: Upper bounds on the refits that threshold calibration runs (leave-one-example-out and
#: leave-one-class-out). Large galleries get fewer folds (never under 4 and 2), so that all
#: folds together cost about CALIBRATION_BUDGET multiply-adds (~2 s on one core).
MAX_KNOWN_FOLDS = 24
MAX_UNKNOWN_FOLDS = 8
CALIBRATION_BUDGET = 3e9

#: Fits a head on features (n, D), labels (n,) for `ways` classes.
FitFn = Callable[[np.ndarray, np.ndarray, int], HeadWeights]


def calibrate_threshold(
    x: np.ndarray, y: np.ndarray, ways: int, steps: int, fit: FitFn
) -> tuple[float, dict[str, Any]]:
    """The rejection threshold in [0, 1] and how it was found.

    Args:
        x: enrolled features of shape (M, D), float32.
        y: their class indices of shape (M,), in [0, ways).
        ways: number of enrolled classes.
        steps: the recipe's gradient steps (sets the cost of one refit).
        fit: refits a head on a subset (see FitFn).

    Returns:
        (threshold, stats): stats holds "method", "known", "unknown" (score counts) and, when
        they exist, "known_accepted", "unknown_rejected", or a "note".
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
        head = fit(x[keep], y[keep], ways)
        known.append(float(predict_proba(x[i : i + 1], head).max()))
    unknown = []
    if ways >= 3:
        held = np.linspace(0, ways - 1, min(ways, max_unknown)).astype(int)
        for c in np.unique(held):
            keep = y != c
            relabel = np.where(y[keep] > c, y[keep] - 1, y[keep])
            head = fit(x[keep], relabel, ways - 1)
            unknown.extend(predict_proba(x[y == c], head).max(axis=1).tolist())
    stats: dict[str, Any] = {"method": "leave-one-out", "known": len(known)}
    stats["unknown"] = len(unknown)
    if known and unknown:
        k, u = np.asarray(known), np.asarray(unknown)
        scores = np.unique(np.concatenate([k, u]))
        cuts = np.concatenate([[0.0], (scores[:-1] + scores[1:]) / 2, [scores[-1] + 1e-6]])
        balanced = [(np.mean(k >= t) + np.mean(u < t)) / 2 for t in cuts]
        threshold = float(cuts[int(np.argmax(balanced))])
        stats["known_accepted"] = float(np.mean(k >= threshold))
        stats["unknown_rejected"] = float(np.mean(u < threshold))
    elif known:
        threshold = float(np.quantile(known, 0.05))
        stats["known_accepted"] = float(np.mean(np.asarray(known) >= threshold))
    else:
        threshold = 0.0
        stats["note"] = "too little data: enroll 2+ images per class to enable rejection"
    return min(max(threshold, 0.0), 1.0), stats
