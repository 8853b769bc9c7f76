"""Hard-task meta-batch: the failure class is the worst, hard tasks use only failure classes,
fresh images differ from the meta-batch's, the miner follows its schedule and counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.train.hard_tasks import (
    HardTaskMiner,
    class_ranking,
    failure_class,
    hard_pool,
    per_class_accuracy,
)
from mtl_edge.train.meta_transfer import TaskStats
from mtl_edge.train.stage_config import HardTaskConfig


def _logits_for(pred: list[int], ways: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), ways).float()


def test_per_class_accuracy_and_failure_class() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = _logits_for([0, 0, 1, 0, 1, 1], 3)  # class acc 1.0, 0.5, 0.0
    np.testing.assert_allclose(per_class_accuracy(logits, y, 3), [1.0, 0.5, 0.0])
    assert failure_class(logits, y, [40, 41, 42]) == 42


def test_failure_class_ties_lowest_label() -> None:
    y = torch.tensor([0, 1, 2])
    logits = _logits_for([0, 0, 0], 3)  # labels 1 and 2 both at 0.0
    assert failure_class(logits, y, [7, 5, 9]) == 5
    assert class_ranking([1.0, 0.0, 0.0], [7, 5, 9]) == [5, 9, 7]


def _by_class(n_classes: int = 10, per: int = 20) -> list[np.ndarray]:
    return [np.arange(c * per, (c + 1) * per) for c in range(n_classes)]


def test_hard_episodes_contain_only_pool_classes_and_fresh_images() -> None:
    by_class = _by_class()
    sampler = EpisodeSampler(by_class, ways=3, shots=2, queries=3, seed=0)
    used = np.concatenate([by_class[c][:10] for c in (1, 4, 7)])
    episodes = [sampler.hard_episode(i, [1, 4, 7], used) for i in range(5)]
    for e in episodes:
        assert set(e.classes.tolist()) == {1, 4, 7}
        idx = np.concatenate([e.support, e.query])
        assert not np.isin(idx, used).any()
        for j, c in enumerate(e.classes):  # class-major and from the right class
            assert np.isin(e.support[j * 2 : (j + 1) * 2], by_class[c]).all()
    assert sampler.reused == 0
    assert len({tuple(e.query) for e in episodes}) == 5  # distinct hard episodes


def test_hard_episodes_are_a_stream_of_their_own() -> None:
    sampler = EpisodeSampler(_by_class(), 3, 1, 2, seed=5)
    again = EpisodeSampler(_by_class(), 3, 1, 2, seed=5)
    a, b = sampler.hard_episode(4, [0, 1, 2, 3]), again.hard_episode(4, [0, 1, 2, 3])
    assert np.array_equal(a.query, b.query)  # a pure function of (seed, index, pool)
    ordinary = sampler.episode(4)
    assert not np.array_equal(a.support, ordinary.support)
    with pytest.raises(DatasetError, match="pool of 2 classes"):
        sampler.hard_episode(0, [1, 2])


def test_too_few_fresh_images_takes_every_fresh_one_first() -> None:
    by_class = _by_class(per=6)
    sampler = EpisodeSampler(by_class, 2, 2, 3, seed=0)
    used = np.concatenate([by_class[c][:3] for c in (0, 1)])  # 3 fresh left < 5 needed
    episode = sampler.hard_episode(0, [0, 1], used)
    assert sampler.reused == 2
    for j, c in enumerate(episode.classes):
        picked = np.concatenate(
            [episode.support[j * 2 : (j + 1) * 2], episode.query[j * 3 : (j + 1) * 3]]
        )
        assert len(set(picked.tolist())) == 5
        assert set(by_class[c][3:].tolist()) <= set(picked.tolist())


def test_small_pool_is_topped_up_from_rankings_only() -> None:
    rankings = [[2, 3, 5, 8], [6, 3, 9, 0]]
    assert hard_pool([2, 6], rankings, 4) == [2, 6, 3, 5]
    assert hard_pool([2, 6], rankings + [[2, 1, 4, 0]], 4) == [2, 6, 3, 1]
    assert hard_pool([2, 6], None, 4) == [2, 6]


def test_config_schedule_and_validation() -> None:
    cfg = HardTaskConfig(count=2, start_epoch=1, every_n_batches=2)
    assert not cfg.active(0, 1) and not cfg.active(1, 0) and cfg.active(1, 1)
    assert not HardTaskConfig(count=0).active(5, 0)
    with pytest.raises(ConfigError, match="every_n_batches"):
        HardTaskConfig(every_n_batches=0)


def test_miner_draws_from_worst_classes_and_counts() -> None:
    by_class = _by_class()
    miner = HardTaskMiner(
        EpisodeSampler(by_class, 2, 1, 2, seed=0), HardTaskConfig(count=3, fresh_images=True)
    )
    stats = [
        TaskStats([0, 1, 2], [1.0, 0.2, 0.9], 0.7, 0.5, False),
        TaskStats([3, 4, 5], [0.1, 0.8, 0.9], 0.6, 0.6, False),
    ]

    class _T:
        indices = np.concatenate([by_class[c][:5] for c in range(6)])

    episodes = miner.after_batch([_T()], stats, epoch=0, batch=0)
    assert len(episodes) == 3
    assert all(set(e.classes.tolist()) == {1, 3} for e in episodes)
    miner.record([TaskStats([1, 3], [0.5, 0.5], 0.5, 0.7, True)] * 3)
    d = miner.stats.to_dict()
    assert d["events"] == 1 and d["tasks"] == 3 and d["normal_tasks"] == 2
    used = _T.indices
    assert all(not np.isin(np.concatenate([e.support, e.query]), used).any() for e in episodes)
    later = miner.after_batch([_T()], stats, epoch=0, batch=1)  # the next hard episodes
    assert not any(np.array_equal(a.query, b.query) for a in episodes for b in later)
    assert d["accuracy"] == pytest.approx(0.5) and d["normal_accuracy"] == pytest.approx(0.65)
