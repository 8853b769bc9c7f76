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
  `reused`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mtl_edge.data.episodes import Episode
from mtl_edge.errors import ConfigError


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


@dataclass(frozen=True)
class HardTaskConfig:
    """When and how hard tasks are drawn.

    Attributes:
        count: K', hard tasks per HT event (0 disables HT).
        start_epoch: first epoch (0-based) in which hard tasks are drawn; the early meta-batches
            rank classes with a barely adapted SS, so their "failures" are mostly noise.
        every_n_batches: draw after every n-th meta-batch of an epoch.
        fresh_images: use images the meta-batch did not use (True) or any images of the classes.
    """

    count: int = 2
    start_epoch: int = 0
    every_n_batches: int = 1
    fresh_images: bool = True

    def __post_init__(self) -> None:
        if self.count < 0 or self.start_epoch < 0 or self.every_n_batches < 1:
            raise ConfigError(
                f"hard tasks: count={self.count}, start_epoch={self.start_epoch}, "
                f"every_n_batches={self.every_n_batches}: need count >= 0, start_epoch >= 0, "
                "every_n_batches >= 1"
            )

    def active(self, epoch: int, batch: int) -> bool:
        """Whether hard tasks follow meta-batch `batch` (0-based) of epoch `epoch`."""
        return (
            self.count > 0 and epoch >= self.start_epoch and (batch + 1) % self.every_n_batches == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HardTaskSampler:
    """Draws hard tasks from failure classes.

    Args:
        indices_by_class: for each split class id, its sample indices.
        ways, shots, queries: N, K, Q of the hard tasks.
        seed: the sampler's generator seed (a stream: hard task sets depend on call order).
        fresh_images: avoid the `used` indices passed to `sample` when enough images remain.
    """

    def __init__(
        self,
        indices_by_class: Sequence[np.ndarray],
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        fresh_images: bool = True,
    ) -> None:
        if ways < 2 or shots < 1 or queries < 1:
            raise ConfigError(f"hard tasks: ways={ways}, shots={shots}, queries={queries} invalid")
        self.indices_by_class = [np.asarray(i, dtype=np.int64) for i in indices_by_class]
        self.ways, self.shots, self.queries = ways, shots, queries
        self.fresh_images = fresh_images
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4854]))
        self.skipped = 0
        self.reused = 0

    def pool(
        self, failure_classes: Sequence[int], rankings: Sequence[Sequence[int]] | None = None
    ) -> list[int]:
        """Distinct failure classes (first-seen order), topped up from `rankings` (per task,
        worst to best) rank by rank until it holds `ways` classes."""
        pool = list(dict.fromkeys(int(c) for c in failure_classes))
        depth = max((len(r) for r in rankings), default=0) if rankings else 0
        for rank in range(1, depth):
            if len(pool) >= self.ways:
                break
            for ranking in rankings or ():
                if rank < len(ranking) and int(ranking[rank]) not in pool:
                    pool.append(int(ranking[rank]))
                    if len(pool) >= self.ways:
                        break
        return pool

    def sample(
        self,
        failure_classes: Sequence[int],
        count: int,
        used: Iterable[int] | None = None,
        rankings: Sequence[Sequence[int]] | None = None,
    ) -> list[Episode]:
        """K' = `count` hard episodes whose classes all come from the (topped-up) pool.

        Args:
            failure_classes: split class ids, one per task of the meta-batch.
            used: sample indices the meta-batch used (avoided when `fresh_images`).
            rankings: per task, its split class ids worst to best (for topping up).

        Returns:
            The episodes; [] when the pool has fewer than `ways` classes (counted in `skipped`).
        """
        pool = self.pool(failure_classes, rankings)
        if len(pool) < self.ways:
            self.skipped += 1
            return []
        used_arr = (
            np.unique(np.fromiter(used, dtype=np.int64))
            if used is not None and self.fresh_images
            else np.zeros(0, dtype=np.int64)
        )
        need = self.shots + self.queries
        episodes = []
        for _ in range(count):
            classes = self.rng.choice(np.asarray(pool, dtype=np.int64), self.ways, replace=False)
            picks = [self._pick(int(c), need, used_arr) for c in classes]
            episodes.append(
                Episode(
                    classes=classes.astype(np.int64),
                    support=np.concatenate([p[: self.shots] for p in picks]),
                    query=np.concatenate([p[self.shots :] for p in picks]),
                )
            )
        return episodes

    def _pick(self, c: int, need: int, used: np.ndarray) -> np.ndarray:
        """`need` distinct sample indices of class `c`, unused ones first (shuffled)."""
        candidates = self.indices_by_class[c]
        if len(candidates) < need:
            raise ConfigError(
                f"hard tasks: class {c} has {len(candidates)} images, fewer than "
                f"shots + queries = {need}"
            )
        is_used = np.isin(candidates, used)
        fresh = candidates[~is_used]
        if len(fresh) >= need:
            return self.rng.choice(fresh, need, replace=False)
        self.reused += 1
        extra = self.rng.choice(candidates[is_used], need - len(fresh), replace=False)
        return self.rng.permutation(np.concatenate([fresh, extra]))


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

    def __init__(self, sampler: HardTaskSampler, config: HardTaskConfig) -> None:
        self.sampler, self.config = sampler, config
        self.sampler.fresh_images = config.fresh_images
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
        used: list[int] = []
        for t in tasks:
            if getattr(t, "indices", None) is not None:
                used += [int(i) for i in t.indices]
        skipped, reused = self.sampler.skipped, self.sampler.reused
        episodes = self.sampler.sample(failures, self.config.count, used, rankings)
        self.stats.skipped += self.sampler.skipped - skipped
        self.stats.reused += self.sampler.reused - reused
        if episodes:
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
