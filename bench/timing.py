"""Timing loop: warm-up, then repeated runs until both a time and a run count are reached."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from mtl_edge.errors import ConfigError


@dataclass(frozen=True)
class TimingBudget:
    """How long to warm up and to measure one (backend, precision, batch) setting.

    Attributes:
        warmup_s, warmup_runs: warm up until both are reached.
        min_time_s, min_runs: measure until both are reached.
        max_runs: stop measuring here even if min_time_s is not reached (slow models).
    """

    warmup_s: float = 0.2
    warmup_runs: int = 10
    min_time_s: float = 3.0
    min_runs: int = 100
    max_runs: int = 100_000

    def __post_init__(self) -> None:
        if self.warmup_s < 0 or self.min_time_s < 0:
            raise ConfigError("--min-time / warm-up time: must not be negative")
        if self.warmup_runs < 0 or self.min_runs < 1 or self.max_runs < self.min_runs:
            raise ConfigError(
                f"--min-runs {self.min_runs}: must be at least 1 (and warm-up runs >= 0)"
            )

    def split(self, rounds: int) -> TimingBudget:
        """The share of one of `rounds` interleaved rounds (warm-up is kept whole)."""
        return TimingBudget(
            warmup_s=self.warmup_s,
            warmup_runs=self.warmup_runs,
            min_time_s=self.min_time_s / rounds,
            min_runs=max(1, -(-self.min_runs // rounds)),
            max_runs=max(1, -(-self.max_runs // rounds)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _repeat(fn: Callable[[], Any], min_time_s: float, min_runs: int, max_runs: int) -> list[float]:
    times: list[float] = []
    total = 0.0
    while len(times) < max_runs and (len(times) < min_runs or total < min_time_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
    return times


def warm_up(fn: Callable[[], Any], budget: TimingBudget) -> int:
    """Run `fn` until budget.warmup_s and budget.warmup_runs are both reached; the run count."""
    return len(_repeat(fn, budget.warmup_s, budget.warmup_runs, 10**9))


def measure(fn: Callable[[], Any], budget: TimingBudget, warm: bool = True) -> list[float]:
    """Seconds per call of `fn` (which must block until its result is ready).

    Args:
        warm: warm up first.

    Returns:
        shape (runs,) list, runs >= budget.min_runs and total >= budget.min_time_s unless
        budget.max_runs stopped it.
    """
    if warm:
        warm_up(fn, budget)
    return _repeat(fn, budget.min_time_s, budget.min_runs, budget.max_runs)
