"""Benchmark readers of mtl_edge/data/ on tiny fixtures in each real on-disk format."""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl_edge.data.cifar import class_list
from mtl_edge.data.csvsplit import read_csv_split
from mtl_edge.data.decode import decode_split
from mtl_edge.data.omniglot import split_alphabets
from mtl_edge.data.pickles import load_data_pickle
from mtl_edge.data.registry import KINDS, open_split, reader_options
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError, ImageError
from mtl_edge.preprocess import Preprocess, resize_and_crop

CIFAR_FS_CLASSES = class_list("cifar-fs")
FC100_SUPERCLASSES = class_list("fc100")

# CIFAR-100's taxonomy, as in its `meta` file, for building fixtures in the real format.
CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
FINE = sorted(n for names in CIFAR100.values() for n in names)
COARSE = list(CIFAR100)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------


def _csv_dataset(root: Path, flat: bool) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for label in ("n02", "n01"):
        for i in range(3):
            name = f"{label}{i:08d}.jpg"
            folder = root / "images" if flat else root / "train" / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
            rows.append((name, label))
    (root / "splits").mkdir(parents=True, exist_ok=True)
    with open(root / "splits" / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows(rows)


@pytest.mark.parametrize("flat", [True, False])
def test_csv_split_layouts(tmp_path: Path, flat: bool) -> None:
    _csv_dataset(tmp_path, flat)
    split = open_split("csv", tmp_path, "train")
    assert split.class_names == ["n01", "n02"]
    assert split.labels.tolist() == [1, 1, 1, 0, 0, 0]  # CSV order kept, classes sorted
    assert split.paths[0].name == "n0200000000.jpg"
    assert split.paths[0].is_file()
    assert split.image(4).size == (8, 8)


def test_csv_explicit_files(tmp_path: Path) -> None:
    _csv_dataset(tmp_path, flat=True)
    moved = tmp_path / "elsewhere"
    os.rename(tmp_path / "images", moved)
    with pytest.raises(DatasetError, match="cannot find its first image"):
        read_csv_split(tmp_path, "train")
    split = read_csv_split(
        tmp_path, "anything", csv_file=tmp_path / "splits" / "train.csv", images=moved
    )
    assert len(split) == 6


def test_csv_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _csv_dataset(tmp_path, flat=True)
    with pytest.raises(DatasetError, match="no split file"):
        read_csv_split(tmp_path, "val")
    (tmp_path / "images" / "n0100000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"n0100000001\.jpg: listed in .* but missing \(1 "):
        read_csv_split(tmp_path, "train")
    with caplog.at_level(logging.WARNING):
        assert len(read_csv_split(tmp_path, "train", on_error="skip")) == 5
    assert "n0100000001.jpg" in caplog.text
    bad = tmp_path / "splits" / "bad.csv"
    bad.write_text("file,class\na.jpg,x\n")
    with pytest.raises(DatasetError, match="header 'filename,label'"):
        read_csv_split(tmp_path, "bad")
    bad.write_text("filename,label\na.jpg\n")
    with pytest.raises(DatasetError, match=r"bad\.csv:2: expected"):
        read_csv_split(tmp_path, "bad")
    bad.write_text("filename,label\n")
    with pytest.raises(DatasetError, match="lists no images"):
        read_csv_split(tmp_path, "bad")
    with pytest.raises(DatasetError, match="no such folder"):
        read_csv_split(tmp_path / "nope", "train")


@pytest.mark.shared_data
def test_real_miniimagenet_csv_matches_folders(shared_data: Path) -> None:
    root = shared_data / "miniimagenet"
    if not (root / "splits" / "val.csv").is_file():
        pytest.skip("miniimagenet CSV splits not in shared data")
    from_csv = open_split("csv", root, "val")
    from_folders = open_split("folders", root, "val")
    assert from_csv.class_names == from_folders.class_names
    assert from_csv.num_classes == 16 and len(from_csv) == 9600
    assert sorted(from_csv.paths) == sorted(from_folders.paths)


# ---------------------------------------------------------------------------------------------
# Omniglot
# ---------------------------------------------------------------------------------------------


def _omniglot(root: Path, sets: tuple[str, ...] = ("images_background",)) -> Path:
    rng = np.random.default_rng(0)
    for s in sets:
        for a in ("Alpha", "Beta", "Gamma", "Delta"):
            for c in (1, 2):
                folder = root / s / f"{a}_{s[-4:]}" / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(3):
                    bits = rng.random((10, 10)) > 0.3
                    Image.fromarray(bits).convert("1").save(folder / f"{c:04d}_{d:02d}.png")
    return root


def test_omniglot_alphabet_split(tmp_path: Path) -> None:
    root = _omniglot(tmp_path)
    train = open_split("omniglot", root, "train", val_alphabets=1, seed=3)
    val = open_split("omniglot", root, "val", val_alphabets=1, seed=3)
    train_alpha = {n.split("/")[0] for n in train.class_names}
    val_alpha = {n.split("/")[0] for n in val.class_names}
    assert len(train_alpha) == 3 and len(val_alpha) == 1 and not train_alpha & val_alpha
    assert train.num_classes == 6 and len(train) == 18 and val.num_classes == 2
    assert train.color_mode == "L" and train.rotations is None
    img = train.image(0)
    assert img.mode == "L" and img.size == (10, 10)
    again = open_split("omniglot", root, "val", val_alphabets=1, seed=3)
    assert again.class_names == val.class_names
    named = open_split("omniglot", root / "images_background", "val", val_alphabets=["Beta_ound"])
    assert {n.split("/")[0] for n in named.class_names} == {"Beta_ound"}
    whole = open_split("omniglot", root, "background")
    assert whole.num_classes == 8


def test_omniglot_internal_validation_excludes_the_test_alphabets(tmp_path: Path) -> None:
    root = _omniglot(tmp_path)
    test = {
        n.split("/")[0] for n in open_split("omniglot", root, "val", val_alphabets=1).class_names
    }
    opts = {"val_alphabets": 1, "seed": 1, "exclude_alphabets": sorted(test)}
    train = {n.split("/")[0] for n in open_split("omniglot", root, "train", **opts).class_names}
    val = {n.split("/")[0] for n in open_split("omniglot", root, "val", **opts).class_names}
    assert len(train) == 2 and len(val) == 1 and not (train | val) & test and not train & val
    with pytest.raises(DatasetError, match="exclude_alphabets: unknown"):
        open_split("omniglot", root, "train", exclude_alphabets=["Klingon"])


def test_omniglot_rotations_are_new_classes(tmp_path: Path) -> None:
    root = _omniglot(tmp_path)
    split = open_split("omniglot", root, "background", rotations=True)
    assert split.num_classes == 32 and len(split) == 96
    assert split.rotations is not None
    assert sorted(set(split.rotations.tolist())) == [0, 90, 180, 270]
    i = split.class_names.index("Alpha_ound/character01@90")
    j = split.class_names.index("Alpha_ound/character01")
    a = split.indices_by_class()[i][0]
    b = split.indices_by_class()[j][0]
    assert split.paths[a] == split.paths[b]
    assert np.array_equal(np.asarray(split.image(a)), np.rot90(np.asarray(split.image(b))))
    only = open_split("omniglot", root, "background", rotations=[180])
    assert only.class_names[0].endswith("@180") and only.num_classes == 8


def test_omniglot_errors(tmp_path: Path) -> None:
    root = _omniglot(tmp_path)
    with pytest.raises(DatasetError, match="no images_evaluation"):
        open_split("omniglot", root, "test")
    with pytest.raises(DatasetError, match="unknown"):
        open_split("omniglot", root, "val", val_alphabets=["Klingon"])
    with pytest.raises(DatasetError, match="val_alphabets=4"):
        open_split("omniglot", root, "val", val_alphabets=4)
    with pytest.raises(DatasetError, match="multiples of 90"):
        open_split("omniglot", root, "background", rotations=[45])
    with pytest.raises(DatasetError, match="omniglot split 'dev'"):
        open_split("omniglot", root, "dev")
    with pytest.raises(DatasetError, match="has no images_background"):
        open_split("omniglot", tmp_path / "images_background" / "Alpha_ound", "train")
    empty = root / "images_background" / "Alpha_ound" / "character03"
    empty.mkdir()
    with pytest.raises(DatasetError, match="character03: character folder has no images"):
        open_split("omniglot", root, "background")
    assert open_split("omniglot", root, "background", on_error="skip").num_classes == 8


def test_omniglot_evaluation_is_test(tmp_path: Path) -> None:
    root = _omniglot(tmp_path, ("images_background", "images_evaluation"))
    test = open_split("omniglot", root, "test")
    assert test.name == "omniglot/test"
    assert all(n.split("/")[0].endswith("tion") for n in test.class_names)


def test_split_alphabets_deterministic() -> None:
    names = [f"A{i}" for i in range(30)]
    kept, held = split_alphabets(names, 5, seed=0)
    assert len(held) == 5 and len(kept) == 25 and not set(kept) & set(held)
    assert split_alphabets(names, 5, seed=0) == (kept, held)
    assert split_alphabets(names, 5, seed=1)[1] != held


@pytest.mark.shared_data
def test_real_omniglot_background(shared_data: Path) -> None:
    root = shared_data / "omniglot"
    if not root.is_dir():
        pytest.skip("omniglot not in shared data")
    whole = open_split("omniglot", root, "background")
    assert whole.num_classes == 964 and len(whole) == 964 * 20
    train = open_split("omniglot", root, "train", val_alphabets=5, seed=0)
    val = open_split("omniglot", root, "val", val_alphabets=5, seed=0)
    assert train.num_classes + val.num_classes == 964
    img = whole.image(0)
    assert img.mode == "L" and img.size == (105, 105)


# ---------------------------------------------------------------------------------------------
# CIFAR-100: FC100 and CIFAR-FS
# ---------------------------------------------------------------------------------------------


def _cifar100(root: Path, per_class: tuple[int, int] = (2, 1), bytes_keys: bool = False) -> Path:
    """cifar-100-python/{train,test,meta} in the real format (pickled dicts, planar rows)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_of = {n: i for i, n in enumerate(FINE)}

    def key(k: str) -> str | bytes:
        return k.encode() if bytes_keys else k

    rng = np.random.default_rng(0)
    for part, n in zip(("train", "test"), per_class, strict=True):
        fine, coarse = [], []
        for c, (sup, names) in enumerate(CIFAR100.items()):
            del sup
            for name in names:
                fine += [fine_of[name]] * n
                coarse += [c] * n
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        # Pixel (0, 0) of every image encodes its fine label in red and 7 in blue.
        data[:, 0] = fine
        data[:, 2048] = 7
        d = {
            key("filenames"): [f"{i}.png" for i in range(len(fine))],
            key("batch_label"): f"{part} batch",
            key("fine_labels"): fine,
            key("coarse_labels"): coarse,
            key("data"): data,
        }
        (folder / part).write_bytes(pickle.dumps(d, protocol=2))
    meta = {key("fine_label_names"): FINE, key("coarse_label_names"): COARSE}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def test_published_class_lists_partition_cifar100() -> None:
    fs = [n for s in ("train", "val", "test") for n in CIFAR_FS_CLASSES[s]]
    assert [len(CIFAR_FS_CLASSES[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert sorted(fs) == FINE
    sup = [n for s in ("train", "val", "test") for n in FC100_SUPERCLASSES[s]]
    assert [len(FC100_SUPERCLASSES[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(sup) == sorted(COARSE)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_fc100(tmp_path: Path, bytes_keys: bool) -> None:
    root = _cifar100(tmp_path, bytes_keys=bytes_keys)
    splits = {s: open_split("fc100", root, s) for s in ("train", "val", "test")}
    assert [splits[s].num_classes for s in ("train", "val", "test")] == [60, 20, 20]
    assert set(splits["test"].class_names) == {
        n for sup in FC100_SUPERCLASSES["test"] for n in CIFAR100[sup]
    }
    test = splits["test"]
    assert test.arrays.shape == (60, 32, 32, 3) and test.class_counts().tolist() == [3] * 20
    # The planar rows became HWC images: pixel (0, 0) carries the fine label and blue 7.
    for i in range(len(test)):
        assert FINE[test.arrays[i, 0, 0, 0]] == test.class_names[test.labels[i]]
        assert test.arrays[i, 0, 0, 2] == 7
    assert test.name == "fc100/test"


def test_cifar_fs(tmp_path: Path) -> None:
    root = _cifar100(tmp_path) / "cifar-100-python"  # the pickle folder itself works too
    splits = {s: open_split("cifar-fs", root, s) for s in ("train", "val", "test")}
    assert [splits[s].num_classes for s in ("train", "val", "test")] == [64, 16, 20]
    assert set(splits["val"].class_names) == set(CIFAR_FS_CLASSES["val"])
    assert len(splits["train"]) == 64 * 3
    val = splits["val"]
    assert all(
        FINE[val.arrays[i, 0, 0, 0]] == val.class_names[val.labels[i]] for i in range(len(val))
    )


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no CIFAR-100 python files"):
        open_split("fc100", tmp_path, "train")
    root = _cifar100(tmp_path)
    with pytest.raises(DatasetError, match="fc100 split 'dev'"):
        open_split("fc100", root, "dev")
    (root / "cifar-100-python" / "test").write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    with pytest.raises(DatasetError, match="test: not a readable data pickle"):
        open_split("cifar-fs", root, "val")


def test_pickles_cannot_run_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_data_pickle(path)


# ---------------------------------------------------------------------------------------------
# tieredImageNet
# ---------------------------------------------------------------------------------------------


def _tiered_pickles(root: Path, split: str = "val", bytes_keys: bool = True) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(6)]
    # Ren et al.'s list holds each PNG file as a uint8 array of its bytes (cv2.imencode output).
    pngs = [np.frombuffer(_png_bytes(a), dtype=np.uint8) for a in arrays]
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_images_png.pkl").write_bytes(pickle.dumps(pngs, protocol=2))

    def key(k: str) -> str | bytes:
        return k.encode() if bytes_keys else k

    labels = {
        key("label_specific"): np.array([1, 1, 0, 0, 2, 2]),
        key("label_general"): np.array([0, 0, 0, 0, 1, 1]),
        key("label_specific_str"): [b"n01", b"n02", b"n03"]
        if bytes_keys
        else ["n01", "n02", "n03"],
        key("label_general_str"): ["g0", "g1"],
    }
    (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=2))
    return arrays


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_tiered_pickle(tmp_path: Path, bytes_keys: bool) -> None:
    arrays = _tiered_pickles(tmp_path / "tiered", bytes_keys=bytes_keys)
    split = open_split("tiered-pickle", tmp_path / "tiered", "val")
    assert split.class_names == ["n01", "n02", "n03"]
    assert split.labels.tolist() == [1, 1, 0, 0, 2, 2]
    assert split.blobs is not None and split.blobs[0][:4] == b"\x89PNG"
    for i, arr in enumerate(arrays):
        assert np.array_equal(np.asarray(split.image(i)), arr)
    assert (
        split.fingerprint() == open_split("tiered-pickle", tmp_path / "tiered", "val").fingerprint()
    )
    sub = split.subset([2])
    assert len(sub) == 2 and np.array_equal(np.asarray(sub.image(1)), arrays[5])


def test_tiered_pickle_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="val_images_png.pkl: no such file"):
        open_split("tiered-pickle", tmp_path, "val")
    _tiered_pickles(tmp_path)
    labels = tmp_path / "val_labels.pkl"
    labels.write_bytes(pickle.dumps({"label_specific": np.zeros(3), "label_specific_str": ["a"]}))
    with pytest.raises(DatasetError, match="3 labels for 6 images"):
        open_split("tiered-pickle", tmp_path, "val")
    labels.write_bytes(pickle.dumps({"label_general": np.zeros(6)}))
    with pytest.raises(DatasetError, match="has no 'label_specific' entry"):
        open_split("tiered-pickle", tmp_path, "val")


def test_tiered_folders(class_folders: Path) -> None:
    split = open_split("tiered", class_folders, "train")
    assert split.num_classes == 4 and len(split) == 24


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def test_open_split_kinds_and_options(tmp_path: Path) -> None:
    assert set(KINDS) >= {
        "folders",
        "csv",
        "omniglot",
        "fc100",
        "cifar-fs",
        "tiered",
        "tiered-pickle",
        "synthetic",
    }
    with pytest.raises(DatasetError, match="dataset kind 'imagenet': use one of folders, csv"):
        open_split("imagenet", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"unknown option\(s\) \['colour'\]"):
        open_split("folders", tmp_path, "train", colour="L")
    with pytest.raises(DatasetError, match="needs a root folder"):
        open_split("folders", None, "train")
    assert "val_alphabets" in reader_options("omniglot")


def test_open_synthetic() -> None:
    split = open_split(
        "synthetic",
        None,
        "val",
        size=16,
        per_class=3,
        train_classes=2,
        val_classes=2,
        test_classes=1,
        seed=1,
    )
    assert isinstance(split, ImageSplit)
    assert split.class_names == ["synth0002", "synth0003"] and len(split) == 6


def test_datasets_module_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, mtl_edge.data.registry, mtl_edge.data.decode; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Whole-split decoding
# ---------------------------------------------------------------------------------------------


def test_decode_split_matches_per_image_decoding(class_folders: Path, tmp_path: Path) -> None:
    split = open_split("folders", class_folders, "train")
    arrays = decode_split(split, workers=1)
    assert arrays.shape == (24, 20, 24, 3) and arrays.dtype == np.uint8
    for i in (0, 13, 23):
        assert np.array_equal(arrays[i], np.asarray(split.image(i)))
    resized = decode_split(split, size=16, workers=1)
    assert resized.shape == (24, 16, 16, 3)
    expected = resize_and_crop(split.image(3), Preprocess(size=16))  # as the device resizes
    assert np.array_equal(resized[3], np.asarray(expected))


def test_decode_split_blobs_rotations_and_errors(tmp_path: Path) -> None:
    root = _omniglot(tmp_path)
    split = open_split("omniglot", root, "background", rotations=True)
    arrays = decode_split(split, workers=1)
    assert arrays.shape == (96, 10, 10)
    # 96 images: enough to go through the process pool, with the same result.
    assert np.array_equal(decode_split(split, workers=2, progress=False), arrays)
    a = split.class_names.index("Alpha_ound/character01@90")
    first = split.indices_by_class()[a][0]
    assert np.array_equal(arrays[first], np.asarray(split.image(first)))
    _tiered_pickles(tmp_path / "tiered")
    tiered = open_split("tiered-pickle", tmp_path / "tiered", "val")
    assert np.array_equal(decode_split(tiered, workers=1)[4], np.asarray(tiered.image(4)))
    bad = split.paths[5]
    bad.write_bytes(b"broken")
    with pytest.raises(ImageError, match=bad.name):
        decode_split(split, workers=1)


def test_decode_split_mixed_sizes(tmp_path: Path) -> None:
    for i, size in enumerate([(8, 8), (9, 7)]):
        folder = tmp_path / "d" / f"c{i}"
        folder.mkdir(parents=True)
        Image.new("RGB", size).save(folder / "x.png")
    split = open_split("folders", tmp_path, "d")
    with pytest.raises(DatasetError, match="different sizes"):
        decode_split(split, workers=1)
    assert decode_split(split, size=6, workers=1).shape == (2, 6, 6, 3)
