"""tieredImageNet in Ren et al.'s pickles (the folder layout is read by `folders`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtl_edge.data.pickles import as_text, load_data_pickle, pickle_entry
from mtl_edge.data.split import ImageSplit, check_standard_split
from mtl_edge.errors import DatasetError


def read_tiered_pickle(root: str | Path, split: str, color_mode: str = "RGB") -> ImageSplit:
    """tieredImageNet in Ren et al.'s pickles: `<split>_images_png.pkl` (a list of PNG files,
    each a uint8 array of its bytes) and `<split>_labels.pkl` (`label_specific`: class id per
    image, `label_specific_str`: the class wnids, plus the general labels, unused here).

    Returns:
        ImageSplit holding the PNG bytes as `blobs` (decoded on use, never re-encoded).
    """
    check_standard_split(split, "tiered-pickle")
    root = Path(root)
    images_path = root / f"{split}_images_png.pkl"
    labels_path = root / f"{split}_labels.pkl"
    for p in (images_path, labels_path):
        if not p.is_file():
            raise DatasetError(f"{p}: no such file; expected Ren et al.'s tieredImageNet pickles")
    raw = load_data_pickle(images_path)
    if not isinstance(raw, list | tuple):
        raise DatasetError(
            f"{images_path}: expected a list of PNG images, got {type(raw).__name__}"
        )
    blobs = []
    for i, item in enumerate(raw):
        if isinstance(item, np.ndarray) and item.dtype == np.uint8:
            blobs.append(item.tobytes())
        elif isinstance(item, bytes):
            blobs.append(item)
        else:
            raise DatasetError(f"{images_path}: item {i} is {type(item).__name__}, not PNG bytes")
    meta = load_data_pickle(labels_path)
    labels = np.asarray(pickle_entry(meta, "label_specific", labels_path), dtype=np.int64)
    names = [as_text(n) for n in pickle_entry(meta, "label_specific_str", labels_path)]
    if len(labels) != len(blobs):
        raise DatasetError(
            f"{labels_path}: {len(labels)} labels for {len(blobs)} images in {images_path.name}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DatasetError(f"{labels_path}: label_specific outside 0..{len(names) - 1}")
    return ImageSplit(
        name=f"{root.name}/{split}",
        class_names=names,
        labels=labels,
        blobs=blobs,
        color_mode=color_mode,
    )
