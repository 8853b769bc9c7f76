"""Episodic sampling: reproducible by seed, stored as JSON, many-way many-shot, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtl_edge.data.episodes import EpisodeSampler, load_episodes, save_episodes
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError


def make_split(num_classes: int, per_class: int) -> ImageSplit:
    labels = np.repeat(np.arange(num_classes), per_class)
    arrays = np.zeros((len(labels), 4, 4), dtype=np.uint8)
    return ImageSplit(
        "toy", [f"c{i}" for i in range(num_classes)], labels, arrays=arrays, color_mode="L"
    )


def test_episode_structure_is_class_major_and_disjoint() -> None:
    split = make_split(10, 30)
    episode = EpisodeSampler.for_split(split, ways=5, shots=3, queries=4, seed=1).episode(0)
    assert episode.ways == 5 and episode.shots == 3 and episode.queries == 4
    assert len(set(episode.classes.tolist())) == 5
    assert not set(episode.support) & set(episode.query)
    for j, c in enumerate(episode.classes):
        assert (split.labels[episode.support[j * 3 : (j + 1) * 3]] == c).all()
        assert (split.labels[episode.query[j * 4 : (j + 1) * 4]] == c).all()
    assert episode.support_labels().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_same_seed_same_episodes_in_any_order() -> None:
    split = make_split(12, 20)
    a = EpisodeSampler.for_split(split, 5, 1, 15, seed=7)
    b = EpisodeSampler.for_split(split, 5, 1, 15, seed=7)
    forward = a.episodes(20)
    backward = [b.episode(i) for i in reversed(range(20))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert np.array_equal(x.classes, y.classes) and np.array_equal(x.query, y.query)
    other = EpisodeSampler.for_split(split, 5, 1, 15, seed=8).episode(0)
    assert not np.array_equal(other.support, forward[0].support)


def test_json_round_trip(tmp_path: Path) -> None:
    split = make_split(8, 10)
    episodes = EpisodeSampler.for_split(split, 4, 2, 3, seed=0).episodes(5)
    save_episodes(tmp_path / "e.json", episodes, {"seed": 0, "split": split.fingerprint()})
    loaded, meta = load_episodes(tmp_path / "e.json")
    assert meta["split"] == split.fingerprint()
    for x, y in zip(episodes, loaded, strict=True):
        assert np.array_equal(x.support, y.support) and np.array_equal(x.classes, y.classes)


def test_many_way_many_shot() -> None:
    split = make_split(36, 120)
    episode = EpisodeSampler.for_split(split, ways=35, shots=100, queries=15, seed=0).episode(3)
    assert episode.support.shape == (3500,) and episode.query.shape == (525,)


def test_errors_name_the_short_class_and_the_split() -> None:
    split = make_split(6, 10)
    split.labels[-4:] = 0  # class c5 keeps 6 images
    split._by_class = None
    with pytest.raises(DatasetError, match="'c5' has 6 images"):
        EpisodeSampler.for_split(split, 5, 5, 2)
    with pytest.raises(DatasetError, match="fewer than the 7 ways"):
        EpisodeSampler.for_split(make_split(6, 10), 7, 1, 1)


def test_bad_episode_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such episode file; write one with"):
        load_episodes(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json: not valid JSON .*mtl-edge data episodes"):
        load_episodes(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"schema": "something-else"}')
    with pytest.raises(DatasetError, match="not an mtl-edge episode file"):
        load_episodes(tmp_path / "other.json")


def test_split_subset_relabels_and_fingerprint_changes() -> None:
    split = make_split(5, 3)
    sub = split.subset([3, 1])
    assert sub.class_names == ["c3", "c1"] and sorted(set(sub.labels.tolist())) == [0, 1]
    assert len(sub) == 6 and sub.fingerprint() != split.fingerprint()
    with pytest.raises(DatasetError, match="'c0' has 3 images"):
        split.require(ways=2, min_per_class=4)
