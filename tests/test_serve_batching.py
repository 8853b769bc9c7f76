"""DynamicBatcher: concurrent images share backend runs, bounded in size, in order, off the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest

from mtl_edge.serve.batching import DynamicBatcher
from mtl_edge.serve.errors import HttpError


class GatedBackend:
    """Features = per-image sums; every run sets `running`, waits for `gate` (set by the test)
    on the worker thread, and records its batch size and thread name."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.running = threading.Event()
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.running.set()
        self.gate.wait(timeout=30)
        self.sizes.append(len(images))
        self.threads.add(threading.current_thread().name)
        return images.reshape(len(images), -1).sum(axis=1, keepdims=True) * np.ones((1, 3))


def images(n: int, start: int = 0) -> np.ndarray:
    """n images of shape (1, 2, 2), image i filled with start + i (its feature sum is 4x that)."""
    return np.stack([np.full((1, 2, 2), start + i, np.float32) for i in range(n)])


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


def test_requests_queued_while_busy_join_one_batch() -> None:
    async def main() -> tuple[GatedBackend, list[np.ndarray]]:
        backend = GatedBackend()
        batcher = DynamicBatcher(backend, max_batch=8, max_delay_s=0.0)
        await batcher.start()
        first = asyncio.create_task(batcher.extract(images(1, 100)))
        await _wait_for(backend.running.is_set)  # the first image is running, gated
        rest = [asyncio.create_task(batcher.extract(images(1, i))) for i in range(10)]
        await _wait_for(lambda: batcher.queued == 10)
        backend.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return backend, results

    backend, results = asyncio.run(main())
    assert backend.sizes == [1, 8, 2]  # bounded by max_batch; the rest runs next
    assert [float(r[0, 0]) for r in results] == [400.0] + [4.0 * i for i in range(10)]
    assert backend.threads == {"mtl-edge-backend_0"}  # one worker thread, one extractor


def test_batching_off_runs_every_image_alone() -> None:
    async def main() -> GatedBackend:
        backend = GatedBackend()
        backend.gate.set()
        batcher = DynamicBatcher(backend, max_batch=8, max_delay_s=0.01, enabled=False)
        await batcher.start()
        out = await asyncio.gather(*(batcher.extract(images(2, 10 * i)) for i in range(5)))
        assert [r.shape for r in out] == [(2, 3)] * 5
        assert float(out[3][1, 0]) == 4.0 * 31
        await batcher.stop()
        return backend

    assert asyncio.run(main()).sizes == [1] * 10


def test_delay_lets_a_batch_fill() -> None:
    async def main() -> GatedBackend:
        backend = GatedBackend()
        backend.gate.set()
        # A long delay: requests arriving one by one still meet in one batch of 4.
        batcher = DynamicBatcher(backend, max_batch=4, max_delay_s=5.0)
        await batcher.start()
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(batcher.extract(images(1, i))))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        await batcher.stop()
        return backend

    assert asyncio.run(main()).sizes == [4]


def test_event_loop_runs_while_the_backend_works() -> None:
    async def main() -> int:
        backend = GatedBackend()
        batcher = DynamicBatcher(backend, max_batch=4, max_delay_s=0.0)
        await batcher.start()
        job = asyncio.create_task(batcher.extract(images(1)))
        ticks = 0
        while ticks < 50:  # the gated backend blocks its thread, not this loop
            await asyncio.sleep(0.001)
            ticks += 1
        assert not job.done()
        backend.gate.set()
        await job
        await batcher.stop()
        return ticks

    assert asyncio.run(main()) == 50


def test_full_queue_is_busy_and_errors_reach_every_request() -> None:
    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("backend exploded")

    async def main() -> None:
        batcher = DynamicBatcher(broken, max_batch=4, max_delay_s=0.0, max_queue=3)
        await batcher.start()
        with pytest.raises(HttpError) as busy:
            await batcher.extract(images(4))
        assert busy.value.status == 503
        results = await asyncio.gather(
            batcher.extract(images(2)), batcher.extract(images(1)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        await batcher.stop()

    asyncio.run(main())


def test_cancelled_requests_are_skipped() -> None:
    async def main() -> GatedBackend:
        backend = GatedBackend()
        batcher = DynamicBatcher(backend, max_batch=8, max_delay_s=0.0)
        await batcher.start()
        first = asyncio.create_task(batcher.extract(images(1)))
        await _wait_for(backend.running.is_set)
        gone = asyncio.create_task(batcher.extract(images(3)))
        kept = asyncio.create_task(batcher.extract(images(2, 7)))
        await _wait_for(lambda: batcher.queued == 5)
        gone.cancel()  # the client went away
        backend.gate.set()
        await first
        assert float((await kept)[1, 0]) == 32.0
        await batcher.stop()
        return backend

    assert asyncio.run(main()).sizes == [1, 2]
