"""Work over many files in a process pool, results in input order (verify, decode)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from typing import Any


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def map_jobs(
    fn: Callable[[Any], Any],
    items: list[Any],
    workers: int,
    progress: bool,
    description: str = "verifying",
) -> Iterable[Any]:
    """`map(fn, items)` in order, over `workers` processes when there is enough work.

    `fn` must be a module-level function; results stream back in input order.
    """
    chunk = max(1, min(256, len(items) // (workers * 8) or 1))
    if workers <= 1 or len(items) < 64:
        results: Iterable[Any] = map(fn, items)
        pool = None
    else:
        # fork: "spawn" would re-run an unguarded __main__ script in every worker. All workers
        # start inside pool.map, before the progress bar starts its refresh thread.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method))
        results = pool.map(fn, items, chunksize=chunk)
    try:
        if progress:
            from rich.progress import track

            results = track(results, total=len(items), description=description, transient=True)
        yield from results
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
