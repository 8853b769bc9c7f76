"""Dynamic batching of feature extraction, as Triton's dynamic batcher does it.

Requests put single preprocessed images on one queue and await one future each. A single
scheduler task takes the first image, adds every image already queued, and, while the batch is
under `max_batch`, waits for more until the first image has been queued `max_delay_s`. The
batch then runs on the one backend worker thread, so the event loop never blocks and there is
one feature extractor per process. While the backend runs, new images queue up: the busier the
server, the larger the next batch, with no wait added to a lone request beyond `max_delay_s`.

With batching off every image runs alone, on the same worker thread: the baseline that
`mtl-edge bench serve` compares against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mtl_edge.serve.errors import HttpError
from mtl_edge.serve.metrics import Metrics

log = logging.getLogger(__name__)

ExtractFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Item:
    image: np.ndarray  # (C, H, W) float32
    future: asyncio.Future[np.ndarray]
    queued: float  # time.perf_counter() when queued


class DynamicBatcher:
    """Gathers images of concurrent requests into backend batches.

    Args:
        extract: the backend, float32 (N, C, H, W) -> float32 (N, D); runs on the worker thread.
        max_batch: most images per run.
        max_delay_s: longest wait for more images after the first one of a batch queued.
        max_queue: most images queued; beyond it `extract` answers 503.
        enabled: False runs every image alone.
        metrics: where queue waits, run times and batch sizes go.
    """

    def __init__(
        self,
        extract: ExtractFn,
        max_batch: int = 16,
        max_delay_s: float = 0.002,
        max_queue: int = 512,
        enabled: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self._extract = extract
        self.max_batch = max_batch if enabled else 1
        self.max_delay_s = max_delay_s if enabled else 0.0
        self.max_queue = max_queue
        self.enabled = enabled
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mtl-edge-backend")
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        self.images = 0

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the scheduler on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="batcher")

    async def stop(self) -> None:
        """Stop the scheduler; images still queued fail with 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(HttpError(503, "the server is shutting down; retry"))
        self._executor.shutdown(wait=True)

    async def extract(self, images: np.ndarray) -> np.ndarray:
        """Features of preprocessed images.

        Args:
            images: float32 array of shape (n, C, H, W).

        Returns:
            float32 array of shape (n, D), in the order of `images`.

        Raises:
            HttpError: 503 when the queue is full.
        """
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if self._queue.qsize() + len(images) > self.max_queue:
            raise HttpError(
                503,
                f"busy: {self._queue.qsize()} images are waiting for the backend (limit "
                f"{self.max_queue}, --max-queue); retry in a moment",
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        for image in images:
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.put_nowait(_Item(image, future, now))
            futures.append(future)
        self._set_gauge()
        rows = await asyncio.gather(*futures)
        return np.stack(rows)

    def _set_gauge(self) -> None:
        if self.metrics is not None and self._queue is not None:
            self.metrics.queue_images.set(self._queue.qsize())

    async def _gather(self) -> list[_Item]:
        """The next batch: the first image, those already queued, more until the deadline."""
        assert self._queue is not None
        queue = self._queue
        batch = [await queue.get()]
        deadline = batch[0].queued + self.max_delay_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:  # not the builtin TimeoutError before 3.11
                break
        # A request that went away (client disconnected) cancelled its futures: skip them.
        return [item for item in batch if not item.future.done()]

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self._set_gauge()
            if not batch:
                continue
            start = time.perf_counter()
            images = np.stack([item.image for item in batch])
            try:
                features = await loop.run_in_executor(self._executor, self._extract, images)
            except Exception as e:  # the backend failed: every waiting request gets the error
                log.exception("feature extraction failed on a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            done = time.perf_counter()
            self.runs += 1
            self.images += len(batch)
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch))
                self.metrics.observe_stage("extract", done - start)
                for item in batch:
                    self.metrics.observe_stage("queue", start - item.queued)
            for item, row in zip(batch, features, strict=True):
                if not item.future.done():
                    item.future.set_result(row)
