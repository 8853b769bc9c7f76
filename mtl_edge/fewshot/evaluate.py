"""The one evaluation loop: every head on every episode of one fixed list.

`evaluate_episodes(inputs, labels, episodes, heads)` fits a fresh head per episode on the support
rows of `inputs` and scores its query rows; every head sees the same episodes, so differences
between heads (and between models, backends or precisions evaluated on the same list) are
paired. Accuracies are in percent with a 95% interval (`mtl_edge.stats.mean_ci`). Meta-test,
the joint grid, export's checks and `bench accuracy` all call it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.progress import Progress

from mtl_edge.data.episodes import Episode
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.fewshot.heads import HeadFactory
from mtl_edge.stats import mean_ci, paired_difference

#: Rows of the inputs for sample indices (n,): a feature table (N, D) or a loader of images.
Inputs = np.ndarray | Callable[[np.ndarray], Any]


@dataclass
class EvalResult:
    """Accuracy of one head over an episode list, in percent.

    Attributes:
        mean: mean accuracy; ci95: half-width of the 95% interval; accuracies: per episode.
    """

    mean: float
    ci95: float
    accuracies: list[float]

    @classmethod
    def from_accuracies(cls, accuracies: Sequence[float]) -> EvalResult:
        mean, half = mean_ci(accuracies)
        return cls(mean, half, [float(a) for a in accuracies])

    def to_dict(self, with_accuracies: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"mean": self.mean, "ci95": self.ci95, "episodes": len(self.accuracies)}
        if with_accuracies:
            d["accuracies"] = [round(a, 4) for a in self.accuracies]
        return d

    def minus(self, reference: EvalResult) -> tuple[float, float]:
        """(mean of self - reference, 95% half-width), paired over the same episodes."""
        return paired_difference(reference.accuracies, self.accuracies)


def episode_accuracy(scores: Any, labels: np.ndarray) -> float:
    """Accuracy in percent of scores (n, ways) against labels (n,)."""
    pred = np.asarray(scores).argmax(axis=1)
    return float(np.mean(pred == np.asarray(labels)) * 100.0)


def check_episode(episode: Episode, labels: np.ndarray) -> None:
    """Raise DatasetError unless the episode's indices carry its classes in `labels` (N,)."""
    if not (
        np.array_equal(labels[episode.support], np.repeat(episode.classes, episode.shots))
        and np.array_equal(labels[episode.query], np.repeat(episode.classes, episode.queries))
    ):
        raise DatasetError(
            "episode indices do not match the labels of the data; the episode list was made for "
            "another split, make it again for this one"
        )


def _rows(inputs: Inputs, indices: np.ndarray) -> Any:
    return inputs[indices] if isinstance(inputs, np.ndarray) else inputs(indices)


def evaluate_episodes(
    inputs: Inputs,
    labels: np.ndarray,
    episodes: Sequence[Episode],
    heads: Mapping[str, HeadFactory],
    description: str = "episodes",
) -> dict[str, EvalResult]:
    """Every head on every episode (the same episodes for all heads).

    Args:
        inputs: features of shape (N, D) of the split the episodes index, or a function from
            sample indices (n,) to the inputs an image head takes (e.g. image batches).
        labels: split class ids of shape (N,), checked against each episode's classes.
        episodes: the episode list.
        heads: name -> factory of a fresh head per episode.
        description: the progress bar's label (shown on a terminal only).

    Returns:
        name -> `EvalResult` (percent).

    Raises:
        ConfigError: no episodes. DatasetError: inputs or episodes that do not fit the labels.
    """
    if not episodes:
        raise ConfigError("evaluation: no episodes; use episodes >= 1")
    labels = np.asarray(labels, dtype=np.int64)
    if isinstance(inputs, np.ndarray) and (inputs.ndim != 2 or len(inputs) != len(labels)):
        raise DatasetError(
            f"features of shape {inputs.shape} do not match {len(labels)} labels; extract them "
            "again for this split"
        )
    accs: dict[str, list[float]] = {name: [] for name in heads}
    with Progress(disable=not sys.stderr.isatty(), transient=True) as progress:
        bar = progress.add_task(description, total=len(episodes))
        for e in episodes:
            check_episode(e, labels)
            support, query = _rows(inputs, e.support), _rows(inputs, e.query)
            ys, yq = e.support_labels(), e.query_labels()
            for name, factory in heads.items():
                head = factory()
                head.fit(support, ys)
                accs[name].append(episode_accuracy(head.predict(query), yq))
            progress.advance(bar)
    return {name: EvalResult.from_accuracies(a) for name, a in accs.items()}
