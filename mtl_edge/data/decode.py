"""Whole splits decoded once into uint8 arrays, with one on-disk cache.

`decode_split(split, size)` decodes every image in a process pool, rotates and resizes it
(shorter side, then a center crop, exactly as `mtl_edge.preprocess.resize_and_crop`) into one
array. `decoded_images(split, size, cache_dir)` is the same through a `.npy` file in `cache_dir`
keyed by the split's fingerprint, size and colour mode, so later processes (the stages of a
pipeline, the models of a grid) read it back instead of decoding again. Every training and
evaluation path that holds a split in memory goes through `decoded_images`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.atomicio import atomic_write
from mtl_edge.data.jobs import map_jobs, usable_cores
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError
from mtl_edge.preprocess import DEFAULT_MAX_PIXELS, Preprocess, decode_image, resize_and_crop

log = logging.getLogger(__name__)

#: Environment variable naming a folder for decoded splits shared between processes.
CACHE_ENV = "MTL_EDGE_CACHE"


def _decode_one(args: tuple[Any, str, int, int | None, int, str]) -> np.ndarray:
    """Worker: decode one source, rotate, resize + center-crop; uint8 (H, W[, C])."""
    source, color_mode, rotation, size, max_pixels, name = args
    img = decode_image(source, color_mode, max_pixels, name=name)
    if rotation % 360:
        img = img.rotate(rotation, expand=True)
    if size is not None:
        # Only size, resize and interpolation matter to resize_and_crop; mean/std are unused.
        channels = 3 if color_mode == "RGB" else 1
        cfg = Preprocess(size, None, color_mode, (0.0,) * channels, (1.0,) * channels)
        img = resize_and_crop(img, cfg)
    return np.asarray(img, dtype=np.uint8)


def decode_split(
    split: ImageSplit,
    size: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode every image of `split` once, in a process pool, into one uint8 array.

    For training from memory (Omniglot on the CPU, or a split uploaded to GPU memory once and
    augmented there). Rotations are applied; with `size`, each image is resized (shorter side)
    and center-cropped exactly as `mtl_edge.preprocess.resize_and_crop` does.

    Returns:
        uint8 array of shape (N, size, size, 3) for RGB or (N, size, size) for L (without
        `size`, all images must already share one size).

    Raises:
        ImageError: naming the first image that does not decode.
        DatasetError: images of different sizes and no `size` given.
    """
    rotations = split.rotations if split.rotations is not None else np.zeros(len(split), int)
    jobs = []
    for i in range(len(split)):
        if split.paths is not None:
            source: Any = str(split.paths[i])
        elif split.blobs is not None:
            source = split.blobs[i]
        else:
            source = split.arrays[i]  # type: ignore[index]
        jobs.append(
            (source, split.color_mode, int(rotations[i]), size, max_pixels, split.describe(i))
        )
    show = sys.stderr.isatty() if progress is None else progress
    images = list(map_jobs(_decode_one, jobs, workers or usable_cores(), show, "decoding"))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DatasetError(
            f"{split.name}: images have {len(shapes)} different sizes (e.g. "
            f"{', '.join(str(s) for s in list(shapes)[:2])}); pass size= to resize them"
        )
    if not images:
        raise DatasetError(f"{split.name}: has no images to decode")
    return np.stack(images)


def default_cache_dir() -> Path | None:
    """$MTL_EDGE_CACHE/decoded when the variable is set (the GPU scripts set it), else None."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "decoded" if root else None


def decoded_images(
    split: ImageSplit,
    size: int | None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """`decode_split(split, size)`, read from / written to a `.npy` file in `cache_dir` (or
    `default_cache_dir()` when None). An unreadable cache file is decoded again."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    if folder is None:
        return decode_split(split, size=size, workers=workers, progress=progress)
    path = folder / f"{split.fingerprint()[:16]}-{size}-{split.color_mode}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable decode cache (%s); decoding again", path, e)
    array = decode_split(split, size=size, workers=workers, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return array
