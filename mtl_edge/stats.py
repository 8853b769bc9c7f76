"""The one statistics module: means with 95% intervals, paired differences, latency percentiles.

Intervals are normal approximations, mean +- 1.96 standard errors with the sample standard
deviation (ddof=1), the convention of the few-shot literature for episode accuracies (the
official MTL code uses ddof=0: at 600 episodes the two half-widths differ by 0.08 %). With the
hundreds to thousands of samples an evaluation takes, the t and normal quantiles differ by well
under 1%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054

#: Latency percentiles every summary reports.
PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics.

    Raises:
        ValueError: no values, or q outside [0, 100].
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} outside [0, 100]")
    return float(np.percentile(arr, q, method="linear"))


def mean_ci(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the 95% interval) of a sample; the half-width is 0 for one value.

    Args:
        values: shape (n,).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean of an empty sample")
    if arr.size == 1:
        return float(arr[0]), 0.0
    return float(arr.mean()), float(Z95 * arr.std(ddof=1) / math.sqrt(arr.size))


def paired_difference(
    reference: Sequence[float] | np.ndarray, other: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(mean of other - reference, 95% half-width) over paired samples, e.g. per-episode
    accuracies of two precisions on the same episodes. Pairing removes the episode-to-episode
    variance that both share, so the interval is much narrower than either accuracy's.

    Args:
        reference, other: shape (n,), sample i of both measured on the same item.

    Raises:
        ValueError: different lengths.
    """
    ref = np.asarray(reference, dtype=np.float64)
    oth = np.asarray(other, dtype=np.float64)
    if ref.shape != oth.shape:
        raise ValueError(f"paired samples of different shapes {ref.shape} and {oth.shape}")
    return mean_ci(oth - ref)


def latency_summary(times_s: Sequence[float] | np.ndarray, batch_size: int) -> dict[str, float]:
    """Summary of per-run latencies of one batch.

    Args:
        times_s: seconds per run, shape (runs,).
        batch_size: images per run.

    Returns:
        runs, min/mean/median/p90/p95/p99 in milliseconds, and throughput in images/s
        (batch size over the median latency, which one slow outlier cannot move).
    """
    arr = np.asarray(times_s, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("latency summary of no runs")
    ms = arr * 1e3
    out = {
        "runs": int(arr.size),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "median_ms": percentile(ms, 50),
    }
    for q in PERCENTILES[1:]:
        out[f"p{q}_ms"] = percentile(ms, q)
    out["throughput_ips"] = float(batch_size / (out["median_ms"] / 1e3))
    return out
