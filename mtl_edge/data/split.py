"""A labelled split of images, whatever the on-disk layout it was read from.

Every dataset reader (class folders, CSV splits, Omniglot, CIFAR pickles, tieredImageNet,
the synthetic generator) returns an `ImageSplit`: the training stack, the episode sampler,
the benchmarks and the device all consume this one type.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mtl_edge.errors import DatasetError
from mtl_edge.preprocess import DEFAULT_MAX_PIXELS, decode_image


@dataclass
class ImageSplit:
    """Images with class labels. Exactly one of `paths`, `arrays` and `blobs` holds the pixels.

    Attributes:
        name: e.g. "miniimagenet/train"; used in messages and fingerprints.
        class_names: one name per class id.
        labels: int64 array of shape (N,), class id of every sample.
        paths: N image files, or None.
        arrays: uint8 array of shape (N, H, W) or (N, H, W, C), or None.
        blobs: N encoded image files (JPEG/PNG bytes) held in memory, or None. Used for
            tieredImageNet pickles and tar shards, whose images are never re-encoded.
        rotations: int array of shape (N,) of degrees (0, 90, 180, 270) applied after decoding,
            or None. Omniglot uses it to make rotated copies into new classes.
        color_mode: "RGB" or "L", the mode images are decoded to.
    """

    name: str
    class_names: list[str]
    labels: np.ndarray
    paths: list[Path] | None = None
    arrays: np.ndarray | None = None
    rotations: np.ndarray | None = None
    color_mode: str = "RGB"
    blobs: list[bytes] | None = None
    _by_class: list[np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        sources = [s for s in (self.paths, self.arrays, self.blobs) if s is not None]
        if len(sources) != 1:
            raise ValueError("ImageSplit needs exactly one of paths, arrays and blobs")
        n = len(sources[0])
        if len(self.labels) != n:
            raise ValueError(f"{self.name}: {n} images but {len(self.labels)} labels")
        if self.rotations is not None and len(self.rotations) != n:
            raise ValueError(f"{self.name}: {n} images but {len(self.rotations)} rotations")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"{self.name}: labels outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self, index: int) -> str:
        """How to name sample `index` in a message: its path, or "<split>[index]"."""
        if self.paths is not None:
            return str(self.paths[index])
        return f"{self.name}[{index}]"

    def image(self, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode sample `index` to an upright image in `color_mode` (rotation applied)."""
        source: Path | np.ndarray | bytes
        if self.paths is not None:
            source = self.paths[index]
        elif self.blobs is not None:
            source = self.blobs[index]
        else:
            source = self.arrays[index]  # type: ignore[index]
        img = decode_image(source, self.color_mode, max_pixels, name=self.describe(index))
        if self.rotations is not None and self.rotations[index] % 360:
            img = img.rotate(int(self.rotations[index]), expand=True)
        return img

    def indices_by_class(self) -> list[np.ndarray]:
        """Sample indices of each class, in class-id order (cached)."""
        if self._by_class is None:
            order = np.argsort(self.labels, kind="stable")
            counts = np.bincount(self.labels, minlength=self.num_classes)
            self._by_class = np.split(order, np.cumsum(counts)[:-1])
        return self._by_class

    def class_counts(self) -> np.ndarray:
        """int64 array of shape (num_classes,): images per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def take(self, indices: list[int] | np.ndarray, name: str | None = None) -> ImageSplit:
        """The samples at `indices`, in that order, keeping every class and its id."""
        keep = np.asarray(indices, dtype=np.int64)
        return ImageSplit(
            name=name or self.name,
            class_names=list(self.class_names),
            labels=self.labels[keep],
            paths=[self.paths[i] for i in keep] if self.paths is not None else None,
            arrays=self.arrays[keep] if self.arrays is not None else None,
            rotations=self.rotations[keep] if self.rotations is not None else None,
            color_mode=self.color_mode,
            blobs=[self.blobs[i] for i in keep] if self.blobs is not None else None,
        )

    def subset(self, class_ids: list[int] | np.ndarray, name: str | None = None) -> ImageSplit:
        """The samples of `class_ids`, relabelled 0..len(class_ids)-1 in the given order."""
        class_ids = [int(c) for c in class_ids]
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[class_ids] = np.arange(len(class_ids))
        keep = np.flatnonzero(remap[self.labels] >= 0)
        return ImageSplit(
            name=name or self.name,
            class_names=[self.class_names[c] for c in class_ids],
            labels=remap[self.labels[keep]],
            paths=[self.paths[i] for i in keep] if self.paths is not None else None,
            arrays=self.arrays[keep] if self.arrays is not None else None,
            rotations=self.rotations[keep] if self.rotations is not None else None,
            color_mode=self.color_mode,
            blobs=[self.blobs[i] for i in keep] if self.blobs is not None else None,
        )

    def fingerprint(self, root: Path | None = None) -> str:
        """sha256 over the class names and, per sample, its label and relative path (or its
        pixels for in-memory splits, or the sha256 of its encoded bytes for blobs). Identifies
        a split in run folders and bundles."""
        h = hashlib.sha256()
        h.update("\n".join(self.class_names).encode())
        h.update(self.labels.tobytes())
        if self.paths is not None:
            for p in self.paths:
                rel = p.relative_to(root) if root is not None and p.is_relative_to(root) else p
                h.update(str(rel).encode() + b"\0")
        elif self.blobs is not None:
            for blob in self.blobs:
                h.update(hashlib.sha256(blob).digest())
        else:
            h.update(np.ascontiguousarray(self.arrays).tobytes())
        if self.rotations is not None:
            h.update(np.asarray(self.rotations, dtype=np.int64).tobytes())
        return h.hexdigest()

    def require(self, ways: int, min_per_class: int) -> None:
        """Raise DatasetError unless the split can supply `ways` classes of `min_per_class`."""
        if self.num_classes < ways:
            raise DatasetError(
                f"{self.name}: has {self.num_classes} classes, fewer than the {ways} ways asked; "
                "lower --ways or use a larger split"
            )
        counts = self.class_counts()
        short = np.flatnonzero(counts < min_per_class)
        if len(short):
            c = int(short[0])
            raise DatasetError(
                f"{self.name}: class {self.class_names[c]!r} has {counts[c]} images, fewer than "
                f"the {min_per_class} (shots + queries) needed; lower shots/queries or add images"
                + (f" ({len(short) - 1} more classes are short)" if len(short) > 1 else "")
            )


#: The split names of the standard few-shot benchmarks.
STANDARD_SPLITS = ("train", "val", "test")


def check_standard_split(split: str, dataset: str) -> None:
    """Raise DatasetError unless `split` is train, val or test."""
    if split not in STANDARD_SPLITS:
        raise DatasetError(f"{dataset} split {split!r}: use train, val or test")
