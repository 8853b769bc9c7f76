"""Fill batch k+1 on a background thread while the caller runs batch k.

`prefetched(jobs, fill, buffers)` hands each job to a producer thread that writes it into one of
`buffers` (two pinned host arrays for the GPU path: decode, preprocess or copy into place), and
yields the filled buffer to the caller. The buffer the caller holds is given back to the
producer when the caller asks for the next one, so with two buffers the producer works one batch
ahead and the caller never waits for preprocessing unless preprocessing is the slower side.
numpy, Pillow's decoders and onnxruntime's `run` release the GIL, so a thread is enough.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
_DONE = object()


def prefetched(
    jobs: Iterable[T],
    fill: Callable[[T, np.ndarray], Any],
    buffers: Sequence[np.ndarray],
) -> Iterator[tuple[T, np.ndarray, Any]]:
    """Yield (job, buffer, fill's result) for each job, in order, filled ahead of time.

    Args:
        jobs: the work items (e.g. (start, stop) ranges of a batch).
        fill: writes job into the buffer it is given; runs on the producer thread.
        buffers: at least one preallocated array; two give one batch of look-ahead.

    The caller must be done with a yielded buffer before it asks for the next item. An
    exception raised by `fill` is raised here; leaving the loop early stops the producer.
    """
    if not buffers:
        raise ValueError("prefetched needs at least one buffer")
    free: queue.Queue[int] = queue.Queue()
    for i in range(len(buffers)):
        free.put(i)
    ready: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            for job in jobs:
                idx = free.get()
                if stop.is_set():
                    return
                ready.put((job, idx, fill(job, buffers[idx])))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            ready.put(e)
            return
        ready.put(_DONE)

    thread = threading.Thread(target=produce, name="mtl-edge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            job, idx, result = item
            yield job, buffers[idx], result
            free.put(idx)
    finally:
        stop.set()
        free.put(0)  # wakes a producer blocked on an empty free list
        thread.join(timeout=10)
