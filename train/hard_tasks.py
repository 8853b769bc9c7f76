"""Hard-task (HT) meta-batch (Sun et al., CVPR 2019 / TPAMI "Meta-Transfer Learning through
Hard Tasks").

After the tasks of a meta-batch have been run, each task's query accuracy is computed per class
and its worst class is its *failure class*. The failure classes of the meta-batch are pooled and
K' new tasks are drawn whose classes come only from that pool, with fresh images of those classes
(not the ones the meta-batch used) when enough remain. The hard tasks then get their own
meta-update right after the meta-batch's, as in the paper's algorithm (hard tasks are learned and
optimised like the ordinary ones).

Decisions the papers leave open, made here:

- Ties: the failure class is the one with the lowest query accuracy; among equal accuracies the
  one with the lowest episode label (first in the task's class order, which is random) wins.
- Small pool: a meta-batch of B tasks gives at most B failure classes, often fewer than N ways.
  The pool is then topped up with each task's *next-worst* classes, rank by rank (every task's
  2nd-worst class, then every task's 3rd-worst, ...; within a rank, in task order), until it
  holds N distinct classes. So every class of a hard task is among the worst of some task of the
  meta-batch; no class from outside the meta-batch is ever used. Without rankings to top up
  from, no hard task is drawn and the event is counted as `skipped`.
- Fresh images: drawn from the class's images not used by the meta-batch; when fewer than
  shots + queries remain (Omniglot: 20 images, 16 used by a 1-shot 15-query task), all the
  unused ones are taken and the rest is filled with used ones, shuffled together (counted as
  `reused`). The hard tasks are drawn by the training episode sampler itself
  (`mtl_edge.data.episodes.EpisodeSampler.hard_episode`, a stream of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.train.stage_config import HardTaskConfig


def per_class_accuracy(query_logits: torch.Tensor, query_y: torch.Tensor, ways: int) -> np.ndarray:
    """Query accuracy per episode label.

    Args:
        query_logits: of shape (n_query, ways).
        query_y: episode labels of shape (n_query,).

    Returns:
        float64 array of shape (ways,); a label with no queries gets NaN.
    """
    pred = query_logits.detach().argmax(1).cpu().numpy()
    y = query_y.detach().cpu().numpy()
    correct = np.bincount(y, weights=(pred == y).astype(np.float64), minlength=ways)
    total = np.bincount(y, minlength=ways).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct / total


def class_ranking(
    class_accuracy: Sequence[float] | np.ndarray, classes: Sequence[int] | np.ndarray
) -> list[int]:
    """Split class ids from worst to best query accuracy (ties: lower episode label first)."""
    acc = np.nan_to_num(np.asarray(class_accuracy, dtype=np.float64), nan=np.inf)
    order = np.argsort(acc, kind="stable")
    return [int(classes[i]) for i in order]


def failure_class(query_logits: torch.Tensor, query_y: torch.Tensor, classes: Sequence[int]) -> int:
    """The split class id with the lowest query accuracy (ties: lowest episode label).

    Args:
        query_logits: of shape (n_query, ways); query_y: of shape (n_query,).
        classes: split class ids of shape (ways,), episode label j is classes[j].
    """
    acc = per_class_accuracy(query_logits, query_y, len(classes))
    return class_ranking(acc, classes)[0]


def hard_pool(
    failure_classes: Sequence[int], rankings: Sequence[Sequence[int]] | None, ways: int
) -> list[int]:
    """Distinct failure classes (first-seen order), topped up from `rankings` (per task, worst
    to best) rank by rank until the pool holds `ways` classes (see the module docstring)."""
    pool = list(dict.fromkeys(int(c) for c in failure_classes))
    depth = max((len(r) for r in rankings), default=0) if rankings else 0
    for rank in range(1, depth):
        if len(pool) >= ways:
            break
        for ranking in rankings or ():
            if rank < len(ranking) and int(ranking[rank]) not in pool:
                pool.append(int(ranking[rank]))
                if len(pool) >= ways:
                    break
    return pool


@dataclass
class HardTaskStats:
    """How often hard tasks were drawn and how they went (the driver logs `to_dict()`).

    Attributes:
        events: HT events that drew tasks; skipped: events with too few pooled classes.
        tasks: hard tasks run; accuracy_sum: sum of their query accuracies.
        normal_accuracy_sum, normal_tasks: the same for the ordinary tasks, to compare.
        reused: classes that fell back to already-used images.
    """

    events: int = 0
    skipped: int = 0
    tasks: int = 0
    accuracy_sum: float = 0.0
    normal_tasks: int = 0
    normal_accuracy_sum: float = 0.0
    reused: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy"] = self.accuracy_sum / self.tasks if self.tasks else None
        d["normal_accuracy"] = (
            self.normal_accuracy_sum / self.normal_tasks if self.normal_tasks else None
        )
        return d


class HardTaskMiner:
    """Glue for the meta-training loop: after each meta-step, decide whether to draw hard tasks
    and from what.

    Usage::

        stats = learner.meta_step(tasks, opt)
        hard = miner.after_batch(tasks, stats.tasks, epoch, batch)
        if hard:
            miner.record(learner.meta_step([builder(e, is_hard=True) for e in hard], opt).tasks)
    """

    def __init__(self, sampler: EpisodeSampler, config: HardTaskConfig) -> None:
        self.sampler, self.config = sampler, config
        self.stats = HardTaskStats()

    def after_batch(
        self, tasks: Sequence[Any], task_stats: Sequence[Any], epoch: int, batch: int
    ) -> list[Episode]:
        """Hard episodes to run after meta-batch `batch` of `epoch` ([] when HT is inactive).

        Args:
            tasks: the meta-batch's `Task`s (their `indices` are the used images).
            task_stats: their `TaskStats` (class_accuracy, classes, accuracy, is_hard).
        """
        self.record(task_stats)
        if not self.config.active(epoch, batch):
            return []
        ordinary = [s for s in task_stats if not s.is_hard]
        rankings = [class_ranking(s.class_accuracy, s.classes) for s in ordinary]
        failures = [r[0] for r in rankings]
        pool = hard_pool(failures, rankings, self.sampler.ways)
        if len(pool) < self.sampler.ways:
            self.stats.skipped += 1
            return []
        used = [t.indices for t in tasks if getattr(t, "indices", None) is not None]
        avoid = np.concatenate(used) if used and self.config.fresh_images else None
        reused = self.sampler.reused
        first = self.stats.events * self.config.count  # hard episodes drawn so far (resumable)
        indices = range(first, first + self.config.count)
        episodes = [self.sampler.hard_episode(i, pool, avoid) for i in indices]
        self.stats.reused += self.sampler.reused - reused
        self.stats.events += 1
        return episodes

    def record(self, task_stats: Sequence[Any]) -> None:
        """Count the tasks of a finished meta-step (hard and ordinary separately)."""
        for s in task_stats:
            if s.is_hard:
                self.stats.tasks += 1
                self.stats.accuracy_sum += s.accuracy
            else:
                self.stats.normal_tasks += 1
                self.stats.normal_accuracy_sum += s.accuracy
