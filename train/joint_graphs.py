"""One meta-iteration's gradients replayed as a CUDA graph (`joint.cuda_graphs`, GPU only).

On a GPU the joint method is bound by kernel launches: even batched (`mtl_edge.train.
joint_batched`), one meta-iteration of the paper's recipe is about a thousand small kernels.
`GraphedGradients` records them once per task shape into a `torch.cuda.CUDAGraph` and replays
the graph afterwards: one launch per iteration instead of a thousand, nothing else changed.
torch.compile was not chosen: it would compile the unrolled inner loop (every step, meta and
transfer) per model, minutes that a 9-minute lease does not have, while a capture costs one
iteration.

How it stays exact. The graph reads the backbone's parameters and buffers and the transfer
head's parameters where they live; `JointLearner.step` only ever updates them in place
(`copy_`, the optimizers), so their addresses never change. The task images go into static
input tensors (`copy_`) before each replay; the gradients come back in the graph's static
output tensors, which the next replay overwrites (the learner copies them into `.grad` at
once). Capturing does not run the kernels, so the call that captures then replays once; the
first `warmup` calls run eagerly on a side stream (cuDNN picks its algorithms, autograd and the
allocators warm up) and are real iterations. A shape not seen before (another ways / shots /
meta-batch) is captured anew. If a capture fails, the learner runs eagerly from then on and
says so once in the log (the lease's smoke check compares the two on the GPU first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from mtl_edge.train.joint_batched import TaskBatch

log = logging.getLogger(__name__)


class Graph(Protocol):
    """What `GraphedGradients` needs of a graph: record `fn` once, replay it later."""

    def capture(self, fn: Callable[[], Any]) -> Any:
        """Record the kernels `fn()` launches (without running them); its outputs."""
        ...

    def replay(self) -> None:
        """Run the recorded kernels again."""
        ...


class CudaGraph:
    """`Graph` over `torch.cuda.CUDAGraph` (capture on a side stream, the allocator's pool)."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Any]) -> Any:
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def _eager_on_side_stream(fn: Callable[[], Any]) -> Any:
    """Warm-up call: on a side stream, as torch.cuda.graphs asks before a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


class GraphedGradients:
    """Replay `fn(batch)` as a graph, one per batch shape (see the module docstring).

    Args:
        fn: the gradients of one meta-iteration of a `TaskBatch` (nested tuples, lists and
            dicts of tensors, or None).
        warmup: eager calls before the capture of each shape.
        make_graph: the graph factory (`CudaGraph`; the tests pass a stand-in that runs on CPU).
        eager: runs a warm-up call (`_eager_on_side_stream` on CUDA).
    """

    def __init__(
        self,
        fn: Callable[[TaskBatch], Any],
        warmup: int = 2,
        make_graph: Callable[[], Graph] = CudaGraph,
        eager: Callable[[Callable[[], Any]], Any] = _eager_on_side_stream,
    ) -> None:
        self.fn, self.warmup, self.make_graph, self.eager = fn, warmup, make_graph, eager
        self._seen: dict[tuple, int] = {}
        self._graphs: dict[tuple, tuple[Graph, TaskBatch, Any]] = {}
        self.failed: str | None = None

    @staticmethod
    def _key(batch: TaskBatch) -> tuple:
        return (tuple(batch.x.shape), batch.x.dtype, batch.ways, batch.n_support)

    def __call__(self, batch: TaskBatch) -> Any:
        if self.failed is not None:
            return self.fn(batch)
        key = self._key(batch)
        if key in self._graphs:
            graph, static, out = self._graphs[key]
            static.x.copy_(batch.x)
            static.y.copy_(batch.y)
            static.base.copy_(batch.base)
            graph.replay()
            return out
        seen = self._seen.get(key, 0)
        if seen < self.warmup:
            self._seen[key] = seen + 1
            return self.eager(lambda: self.fn(batch))
        static = TaskBatch(
            batch.x.clone(), batch.y.clone(), batch.base.clone(), batch.ways, batch.n_support
        )
        graph = self.make_graph()
        try:
            out = graph.capture(lambda: self.fn(static))
        except RuntimeError as e:  # capture refused: run eagerly from now on
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            log.warning("joint.cuda_graphs: capture failed (%s); running eagerly", self.failed)
            return self.fn(batch)
        self._graphs[key] = (graph, static, out)
        graph.replay()
        return out
