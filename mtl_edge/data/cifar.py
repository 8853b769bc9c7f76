"""CIFAR-100 few-shot splits: FC100 (Oreshkin et al. 2018, by super-class) and CIFAR-FS
(Bertinetto et al. 2019). The published class lists are data files (`classlists/*.json`)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from mtl_edge.data.pickles import as_text, load_data_pickle, pickle_entry
from mtl_edge.data.split import ImageSplit, check_standard_split
from mtl_edge.errors import DatasetError


@cache
def class_list(name: str) -> dict[str, tuple[str, ...]]:
    """The published split of `name` ("fc100": super-class names, "cifar-fs": class names):
    {"train": (...), "val": (...), "test": (...)}."""
    text = resources.files("mtl_edge.data").joinpath(f"classlists/{name}.json").read_text()
    return {split: tuple(names) for split, names in json.loads(text)["splits"].items()}


def _cifar_dir(root: Path) -> Path:
    for folder in (root / "cifar-100-python", root):
        if (folder / "meta").is_file():
            return folder
    raise DatasetError(
        f"{root}: no CIFAR-100 python files (expected cifar-100-python/{{train,test,meta}}); "
        "unpack cifar-100-python.tar.gz there"
    )


def load_cifar100(
    root: str | Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """All 60,000 CIFAR-100 images (train then test) from the python pickles.

    Returns:
        images: uint8 array of shape (N, 32, 32, 3); fine: int64 (N,); coarse: int64 (N,);
        fine_names (100); coarse_names (20).
    """
    folder = _cifar_dir(Path(root))
    meta = load_data_pickle(folder / "meta")
    fine_names = [as_text(n) for n in pickle_entry(meta, "fine_label_names", folder / "meta")]
    coarse_names = [as_text(n) for n in pickle_entry(meta, "coarse_label_names", folder / "meta")]
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        path = folder / part
        d = load_data_pickle(path)
        data = np.asarray(pickle_entry(d, "data", path))
        f = np.asarray(pickle_entry(d, "fine_labels", path), dtype=np.int64)
        c = np.asarray(pickle_entry(d, "coarse_labels", path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{path}: 'data' is {data.dtype} {data.shape}, not uint8 (N, 3072)")
        if not len(data) == len(f) == len(c):
            raise DatasetError(f"{path}: {len(data)} images but {len(f)}/{len(c)} labels")
        if len(f) and (
            f.max() >= len(fine_names) or c.max() >= len(coarse_names) or min(f.min(), c.min()) < 0
        ):
            raise DatasetError(f"{path}: labels outside the classes named in {folder / 'meta'}")
        # Rows hold the red, green and blue 32x32 planes one after another.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        fine.append(f)
        coarse.append(c)
    return (
        np.ascontiguousarray(np.concatenate(images)),
        np.concatenate(fine),
        np.concatenate(coarse),
        fine_names,
        coarse_names,
    )


def _cifar_split(
    images: np.ndarray,
    fine: np.ndarray,
    class_ids: list[int],
    fine_names: list[str],
    name: str,
    color_mode: str,
) -> ImageSplit:
    class_ids = sorted(class_ids)
    remap = np.full(len(fine_names), -1, dtype=np.int64)
    remap[class_ids] = np.arange(len(class_ids))
    keep = np.flatnonzero(remap[fine] >= 0)
    return ImageSplit(
        name=name,
        class_names=[fine_names[c] for c in class_ids],
        labels=remap[fine[keep]],
        arrays=images[keep],
        color_mode=color_mode,
    )


def read_fc100(root: str | Path, split: str, color_mode: str = "RGB") -> ImageSplit:
    """FC100: the CIFAR-100 classes of the split's super-classes (60/20/20), 600 images each."""
    check_standard_split(split, "fc100")
    images, fine, coarse, fine_names, coarse_names = load_cifar100(root)
    wanted = class_list("fc100")[split]
    missing = sorted(set(wanted) - set(coarse_names))
    if missing:
        raise DatasetError(f"{root}: CIFAR-100 meta lacks the super-classes {missing}")
    coarse_ids = {coarse_names.index(s) for s in wanted}
    class_ids = sorted({int(f) for f, c in zip(fine, coarse, strict=True) if c in coarse_ids})
    return _cifar_split(images, fine, class_ids, fine_names, f"fc100/{split}", color_mode)


def read_cifar_fs(root: str | Path, split: str, color_mode: str = "RGB") -> ImageSplit:
    """CIFAR-FS: Bertinetto et al.'s 64/16/20 CIFAR-100 classes, 600 images each."""
    check_standard_split(split, "cifar-fs")
    images, fine, _, fine_names, _ = load_cifar100(root)
    missing = sorted(set(class_list("cifar-fs")[split]) - set(fine_names))
    if missing:
        raise DatasetError(f"{root}: CIFAR-100 meta lacks the classes {missing}")
    class_ids = [fine_names.index(n) for n in class_list("cifar-fs")[split]]
    return _cifar_split(images, fine, class_ids, fine_names, f"cifar-fs/{split}", color_mode)
