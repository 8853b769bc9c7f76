"""Splits listed in `filename,label` CSV files (Ravi & Larochelle's miniImageNet split files)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mtl_edge.data.folders import check_on_error, locate_csv_images, read_split_csv
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError

log = logging.getLogger(__name__)


def _find_csv(root: Path, split: str, csv_file: Path | None) -> Path:
    candidates = (
        [csv_file] if csv_file else [root / "splits" / f"{split}.csv", root / f"{split}.csv"]
    )
    for c in candidates:
        if c is not None and c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"{split}: no split file (tried {tried}); pass csv_file= or fix the root")


def read_csv_split(
    root: str | Path,
    split: str,
    csv_file: str | Path | None = None,
    images: str | Path | None = None,
    color_mode: str = "RGB",
    on_error: str = "raise",
) -> ImageSplit:
    """A split listed in a `filename,label` CSV file.

    Images are looked up, per file, in `images` if given, else in `<root>/images/` (all files
    flat, the original layout), else `<root>/<split>/<label>/` (class folders, the MTL layout),
    else `<root>/<label>/`. The layout is chosen from the first row and used for all.

    Args:
        root: dataset folder.
        split: "train", "val" or "test": reads `<root>/splits/<split>.csv` or `<root>/<split>.csv`.
        csv_file: an explicit CSV file instead.
        images: an explicit folder holding all images flat.
        on_error: "raise" on a listed file that is missing; "skip" leaves it out with a warning.

    Returns:
        ImageSplit with classes sorted by label, files in CSV order.
    """
    check_on_error(on_error)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; check the dataset root")
    path = _find_csv(root, split, Path(csv_file) if csv_file else None)
    rows = read_split_csv(path)
    located = locate_csv_images(root, split, rows, path, Path(images) if images else None)
    class_names = sorted({label for _, label in rows})
    ids = {name: i for i, name in enumerate(class_names)}
    paths, labels, missing = [], [], []
    for (_, label), p in zip(rows, located, strict=True):
        if p.is_file():
            paths.append(p)
            labels.append(ids[label])
        else:
            missing.append(p)
    if missing:
        msg = f"{missing[0]}: listed in {path} but missing ({len(missing)} files missing in all)"
        if on_error == "raise":
            raise DatasetError(msg + "; restore them or pass on_error='skip'")
        log.warning("%s (skipped)", msg)
    split_obj = ImageSplit(
        name=f"{root.name}/{split}",
        class_names=class_names,
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        color_mode=color_mode,
    )
    empty = [class_names[c] for c in np.flatnonzero(split_obj.class_counts() == 0)]
    if empty:
        raise DatasetError(f"{path}: class {empty[0]!r} has no image on disk; restore its files")
    return split_obj
