"""Few-shot tasks as tensors, and the results of a meta-step kept on the training device.

A `Task` is one N-way K-shot episode's images and labels on the device (`TaskBuilder` makes it
from an `Episode`). `MetaStepStats` holds a meta-step's per-task query loss, accuracy and
per-class accuracy as device tensors, with a copy to the host started without waiting
(`Tensor.to("cpu", non_blocking=True)` + a CUDA event): the training loop accumulates the
device tensors and reads them once per epoch; only the hard-task sampler needs the per-class
accuracies of every meta-batch on the host (`MetaStepStats.tasks`), and by the time it asks, the
copy has usually landed while the GPU runs the meta-step's backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mtl_edge.data.episodes import Episode
from mtl_edge.train.gpu_data import to_device


@dataclass
class Task:
    """One few-shot task as tensors.

    Attributes:
        support_x: images of shape (ways * shots, C, H, W), class-major.
        support_y: int64 episode labels of shape (ways * shots,).
        query_x: images of shape (ways * queries, C, H, W).
        query_y: int64 episode labels of shape (ways * queries,).
        classes: split class ids of shape (ways,); episode label j is classes[j].
        is_hard: drawn by the hard-task sampler.
        indices: split sample indices used (support then query), for fresh-image re-sampling.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: np.ndarray
    is_hard: bool = False
    indices: np.ndarray | None = None

    @property
    def ways(self) -> int:
        return len(self.classes)


def make_task(
    episode: Episode,
    load: Callable[[np.ndarray], torch.Tensor],
    device: torch.device | str | None = None,
    is_hard: bool = False,
) -> Task:
    """A `Task` from an episode and `load(indices) -> images (n, C, H, W)`."""
    return Task(
        support_x=load(episode.support).to(device),
        support_y=to_device(episode.support_labels(), device),
        query_x=load(episode.query).to(device),
        query_y=to_device(episode.query_labels(), device),
        classes=np.asarray(episode.classes, dtype=np.int64),
        is_hard=is_hard,
        indices=np.concatenate([episode.support, episode.query]),
    )


class TaskBuilder:
    """Turns episodes into tasks with one image loader: `TaskBuilder(load, device)(episode)`."""

    def __init__(
        self, load: Callable[[np.ndarray], torch.Tensor], device: torch.device | str | None = None
    ) -> None:
        self.load, self.device = load, device

    def __call__(self, episode: Episode, is_hard: bool = False) -> Task:
        return make_task(episode, self.load, self.device, is_hard)


@dataclass
class TaskStats:
    """Query results of one task of a meta-step.

    Attributes:
        classes: split class ids (ways,).
        class_accuracy: query accuracy per episode label, (ways,).
        accuracy: query accuracy of the task.
        loss: query cross-entropy (mean over queries).
        is_hard: a hard task.
    """

    classes: list[int]
    class_accuracy: list[float]
    accuracy: float
    loss: float
    is_hard: bool


def query_results(
    logits: torch.Tensor, query_y: torch.Tensor, ways: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-task query loss (T,), accuracy (T,) and per-class accuracy (T, ways) of query
    logits (T, n_q, ways) and labels (T, n_q), on their device (a class without queries gets
    NaN)."""
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), query_y.flatten(), reduction="none"
    ).view(query_y.shape)
    hit = (logits.argmax(dim=2) == query_y).float()
    onehot = torch.nn.functional.one_hot(query_y, ways).float()
    per_class = (hit.unsqueeze(2) * onehot).sum(dim=1) / onehot.sum(dim=1)
    return losses.mean(dim=1), hit.mean(dim=1), per_class


class MetaStepStats:
    """A meta-step's query results on the training device, copied to the host in the background.

    Attributes:
        losses: query cross-entropy per task (T,) (device tensor, detached).
        accuracies: query accuracy per task (T,).
        class_accuracy: per task and episode label (T, ways).
    """

    def __init__(
        self,
        losses: torch.Tensor,
        accuracies: torch.Tensor,
        class_accuracy: torch.Tensor,
        tasks: Sequence[Task],
    ) -> None:
        self.losses, self.accuracies = losses.detach(), accuracies.detach()
        self.class_accuracy = class_accuracy.detach()
        self._meta = [(t.classes, t.is_hard) for t in tasks]
        packed = torch.cat([self.losses[:, None], self.accuracies[:, None], self.class_accuracy], 1)
        self._event = None
        if packed.is_cuda:
            self._host = packed.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed.clone()

    def _rows(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()

    @property
    def loss(self) -> float:
        """Mean query loss over the tasks (waits for the host copy)."""
        return float(self._rows()[:, 0].mean())

    @property
    def accuracy(self) -> float:
        """Mean query accuracy over the tasks (waits for the host copy)."""
        return float(self._rows()[:, 1].mean())

    @functools.cached_property
    def tasks(self) -> list[TaskStats]:
        """`TaskStats` per task (waits for the host copy)."""
        rows = self._rows()
        return [
            TaskStats(
                classes=[int(c) for c in classes],
                class_accuracy=[float(a) for a in row[2:]],
                accuracy=float(row[1]),
                loss=float(row[0]),
                is_hard=is_hard,
            )
            for row, (classes, is_hard) in zip(rows, self._meta, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "tasks": [asdict(t) for t in self.tasks],
        }
