"""The built-in synthetic dataset: shapes, determinism, disjoint splits, learnability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl_edge.data.synthetic import (
    make_synthetic_split,
    synthetic_split,
    synthetic_splits,
    write_class_folders,
)
from mtl_edge.errors import DatasetError, MtlEdgeError


def _ncm_accuracy(features: np.ndarray, labels: np.ndarray, episodes: int, seed: int) -> float:
    """Mean 5-way 5-shot 15-query accuracy of nearest class mean on `features` (N, D)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    correct = total = 0
    for _ in range(episodes):
        chosen = rng.choice(classes, 5, replace=False)
        means, queries, truth = [], [], []
        for j, c in enumerate(chosen):
            idx = rng.choice(np.flatnonzero(labels == c), 20, replace=False)
            means.append(features[idx[:5]].mean(axis=0))
            queries.append(features[idx[5:]])
            truth += [j] * 15
        dist = ((np.concatenate(queries)[:, None] - np.stack(means)[None]) ** 2).sum(-1)
        correct += int((dist.argmin(axis=1) == np.array(truth)).sum())
        total += len(truth)
    return correct / total


@pytest.mark.parametrize(("size", "mode"), [(84, "RGB"), (32, "RGB"), (28, "L")])
def test_shapes_labels_and_modes(size: int, mode: str) -> None:
    split = make_synthetic_split(3, 4, size=size, seed=1, color_mode=mode)
    shape = (12, size, size, 3) if mode == "RGB" else (12, size, size)
    assert split.arrays is not None and split.arrays.shape == shape
    assert split.arrays.dtype == np.uint8
    assert split.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert split.class_names == ["synth0000", "synth0001", "synth0002"]
    assert split.color_mode == mode
    img = split.image(5)
    assert img.mode == mode and img.size == (size, size)


def test_deterministic_by_seed() -> None:
    a = make_synthetic_split(2, 3, size=32, seed=7)
    b = make_synthetic_split(2, 3, size=32, seed=7)
    c = make_synthetic_split(2, 3, size=32, seed=8)
    assert np.array_equal(a.arrays, b.arrays)
    assert a.fingerprint() == b.fingerprint()
    assert not np.array_equal(a.arrays, c.arrays)


def test_splits_have_disjoint_prototypes() -> None:
    splits = synthetic_splits(
        seed=0, size=32, train_classes=4, val_classes=3, test_classes=2, per_class=2
    )
    assert set(splits) == {"train", "val", "test"}
    names = [set(s.class_names) for s in splits.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert [s.num_classes for s in splits.values()] == [4, 3, 2]
    # Val class 0 is global class 4: the same pixels as class 4 of one big split, and unlike
    # train class 0 (a split does not restart the prototypes at class 0).
    big = make_synthetic_split(9, 2, size=32, seed=0)
    assert np.array_equal(splits["val"].arrays[:2], big.arrays[8:10])
    assert not np.array_equal(splits["val"].arrays[:2], splits["train"].arrays[:2])
    assert splits["test"].name == "synthetic/test"


def test_zero_class_split_is_left_out() -> None:
    splits = synthetic_splits(size=16, train_classes=2, val_classes=0, test_classes=0, per_class=1)
    assert list(splits) == ["train"]


def test_classes_distinct_but_samples_vary() -> None:
    split = make_synthetic_split(6, 8, size=32, seed=2)
    x = split.arrays.reshape(len(split), -1).astype(np.float64)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    same = split.labels[:, None] == split.labels[None]
    off_diag = ~np.eye(len(split), dtype=bool)
    intra = d[same & off_diag]
    inter = d[~same]
    assert intra.min() > 0  # no two samples of a class are identical
    assert intra.std() > 0.1 * intra.mean()
    assert intra.mean() < inter.mean()
    # Leave-one-out nearest class mean: each sample is closest to its own class far more often
    # than chance (1/6).
    hits = 0
    for i in range(len(split)):
        keep = np.arange(len(split)) != i
        means = np.stack([x[keep & (split.labels == c)].mean(axis=0) for c in range(6)])
        hits += int(((means - x[i]) ** 2).sum(-1).argmin() == split.labels[i])
    assert hits / len(split) > 1.5 / 6


def test_learnable_on_held_out_classes() -> None:
    """Nearest class mean (raw pixels and a random projection) clearly beats 5-way chance."""
    test = synthetic_splits(
        seed=3, size=32, train_classes=0, val_classes=0, test_classes=10, per_class=20
    )["test"]
    x = test.arrays.reshape(len(test), -1).astype(np.float32) / 255
    projection = np.random.default_rng(1).standard_normal((x.shape[1], 128)).astype(np.float32)
    raw = _ncm_accuracy(x, test.labels, episodes=100, seed=0)
    projected = _ncm_accuracy(x @ projection, test.labels, episodes=100, seed=0)
    assert raw > 0.28, raw
    assert projected > 0.28, projected


def test_write_class_folders_round_trip(tmp_path: Path) -> None:
    split = make_synthetic_split(2, 3, size=16, seed=0)
    root = write_class_folders(split, tmp_path / "enroll")
    assert sorted(p.name for p in root.iterdir()) == ["synth0000", "synth0001"]
    files = sorted((root / "synth0001").iterdir())
    assert [f.name for f in files] == ["0000.png", "0001.png", "0002.png"]
    assert np.array_equal(np.asarray(Image.open(files[2])), split.arrays[5])
    with pytest.raises(MtlEdgeError, match="already exists"):
        write_class_folders(split, root)
    write_class_folders(make_synthetic_split(1, 1, size=16), root, force=True)
    assert sorted(p.name for p in root.iterdir()) == ["synth0000"]


def test_write_grayscale_folders(tmp_path: Path) -> None:
    split = make_synthetic_split(1, 2, size=16, color_mode="L")
    root = write_class_folders(split, tmp_path / "gray")
    img = Image.open(root / "synth0000" / "0001.png")
    assert img.mode == "L"
    assert np.array_equal(np.asarray(img), split.arrays[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0, "per_class": 1}, "num_classes=0"),
        ({"num_classes": 1, "per_class": 0}, "per_class=0"),
        ({"num_classes": 1, "per_class": 1, "size": 4}, "size=4"),
        ({"num_classes": 1, "per_class": 1, "color_mode": "CMYK"}, "color_mode"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        make_synthetic_split(**kwargs)


def test_negative_split_size() -> None:
    with pytest.raises(DatasetError, match="val_classes=-1"):
        synthetic_splits(val_classes=-1)


def test_single_split_matches_all_splits() -> None:
    kwargs = {"seed": 4, "size": 16, "train_classes": 3, "val_classes": 2, "test_classes": 2}
    every = synthetic_splits(per_class=2, **kwargs)
    for name in ("train", "val", "test"):
        one = synthetic_split(name, per_class=2, **kwargs)
        assert one.class_names == every[name].class_names
        assert np.array_equal(one.arrays, every[name].arrays)
    with pytest.raises(DatasetError, match="split='dev'"):
        synthetic_split("dev")
    with pytest.raises(DatasetError, match="val_classes=0"):
        synthetic_split("val", val_classes=0)
