"""Every dataset layout behind one entry point, and split specs.

`open_split(kind, root, split, **options)` reads any supported layout:

| kind | layout | module |
|---|---|---|
| folders | `<root>/<split>/<class>/<image>` (miniImageNet as the MTL code reads it) | folders |
| csv | `<root>/splits/<split>.csv` (`filename,label`; Ravi & Larochelle) + the images | csvsplit |
| omniglot | `<root>/images_background/<alphabet>/<character>/<png>` by alphabet | omniglot |
| fc100 | CIFAR-100 python pickles, 60/20/20 classes by super-class (Oreshkin et al.) | cifar |
| cifar-fs | CIFAR-100 python pickles, 64/16/20 classes (Bertinetto et al.) | cifar |
| tiered | tieredImageNet unpacked to `<root>/<split>/<class>/<image>` | folders |
| tiered-pickle | Ren et al.'s `<split>_images_png.pkl` + `<split>_labels.pkl` | tiered |
| shards | tar shards written by `mtl-edge data pack` (`index.json` + `*.tar`) | shards |
| synthetic | the built-in procedural dataset (no files; `root` is ignored) | synthetic |

`open_split_spec(kind, root, spec)` also reads class ranges and joins ("train[:44]",
"test+train[44:]", "val+test"). `data_root()` is where real data is looked for by default.
numpy + Pillow only: the device side uses these readers too.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.data.cifar import read_cifar_fs, read_fc100
from mtl_edge.data.csvsplit import read_csv_split
from mtl_edge.data.folders import read_class_folders
from mtl_edge.data.omniglot import open_omniglot
from mtl_edge.data.shards import open_shards
from mtl_edge.data.split import ImageSplit
from mtl_edge.data.synthetic import synthetic_split
from mtl_edge.data.tiered import read_tiered_pickle
from mtl_edge.errors import DatasetError

#: Environment variable naming the folder that holds the datasets (miniimagenet/, omniglot/).
DATA_ENV = "MTL_EDGE_DATA"


def data_root() -> Path:
    """Where datasets are found by default: $MTL_EDGE_DATA, else `../shared/data` beside the
    source checkout this package runs from (an editable install), else beside the current
    folder (the repository root when a command runs there)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout.parent / "shared" / "data").is_dir():
        return checkout.parent / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


def _open_folders(
    root: Path, split: str, color_mode: str = "RGB", on_error: str = "raise", validate: bool = False
) -> ImageSplit:
    return read_class_folders(
        root, split, color_mode=color_mode, on_error=on_error, validate=validate
    )


def _open_synthetic(
    root: Path | None,
    split: str,
    seed: int = 0,
    size: int = 84,
    per_class: int = 60,
    train_classes: int = 64,
    val_classes: int = 16,
    test_classes: int = 20,
    color_mode: str = "RGB",
) -> ImageSplit:
    return synthetic_split(
        split, seed, size, train_classes, val_classes, test_classes, per_class, color_mode
    )


def _open_shards(
    root: Path, split: str, verify: bool = True, color_mode: str = "RGB"
) -> ImageSplit:
    return open_shards(root, split, verify=verify, color_mode=color_mode)


_READERS: dict[str, Callable[..., ImageSplit]] = {
    "folders": _open_folders,
    "csv": read_csv_split,
    "omniglot": open_omniglot,
    "fc100": read_fc100,
    "cifar-fs": read_cifar_fs,
    "tiered": _open_folders,
    "tiered-pickle": read_tiered_pickle,
    "shards": _open_shards,
    "synthetic": _open_synthetic,
}

#: Dataset kinds `open_split` reads.
KINDS: tuple[str, ...] = tuple(_READERS)


def reader_options(kind: str) -> list[str]:
    """The keyword options `open_split(kind, ...)` accepts."""
    reader = _reader(kind)
    return list(inspect.signature(reader).parameters)[2:]


def _reader(kind: str) -> Callable[..., ImageSplit]:
    if kind not in _READERS:
        raise DatasetError(f"dataset kind {kind!r}: use one of {', '.join(KINDS)}")
    return _READERS[kind]


def open_split(kind: str, root: str | Path | None, split: str, **options: Any) -> ImageSplit:
    """Read split `split` of a dataset of layout `kind` under `root`.

    Args:
        kind: one of `KINDS` (see the module docstring).
        root: the dataset folder (ignored for "synthetic").
        split: "train", "val" or "test" (Omniglot also "background" / "evaluation").
        **options: reader options, e.g. `color_mode`, `on_error`, Omniglot's `val_alphabets`,
            `seed`, `rotations`; see `reader_options(kind)`.

    Raises:
        DatasetError: unknown kind or option, wrong layout (one line naming the file).
    """
    reader = _reader(kind)
    allowed = reader_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DatasetError(
            f"dataset kind {kind!r}: unknown option(s) {unknown}; known: {', '.join(allowed)}"
        )
    if kind != "synthetic":
        if root is None:
            raise DatasetError(f"dataset kind {kind!r} needs a root folder")
        root = Path(root)
    return reader(root, split, **options)


def first_per_class(split: ImageSplit, count: int) -> ImageSplit:
    """The first `count` samples of every class, all classes kept (the split itself when
    count is 0 or every class has at most `count`)."""
    if count <= 0:
        return split
    keep = np.concatenate([ix[:count] for ix in split.indices_by_class()])
    return split.take(np.sort(keep)) if len(keep) < len(split) else split


_PART = re.compile(r"^([A-Za-z0-9_-]+)(?:\[(\d*):(\d*)\])?$")


def open_split_spec(kind: str, root: str | Path | None, spec: str, **options: Any) -> ImageSplit:
    """A split named by `spec`: "train", a class range of one ("train[:44]", "train[44:]",
    classes in the split's order), or several joined with "+" ("test+train[44:]").

    Raises:
        DatasetError: a malformed spec, an empty class range, or a missing split.
    """
    parts = []
    for part in spec.split("+"):
        m = _PART.match(part.strip())
        if not m:
            raise DatasetError(
                f"split {spec!r}: write NAME, NAME[a:b] or A+B, e.g. test+train[44:]"
            )
        split = open_split(kind, root, m.group(1), **options)
        if m.group(2) is not None or m.group(3) is not None:
            lo = int(m.group(2) or 0)
            hi = int(m.group(3) or split.num_classes)
            ids = list(range(lo, min(hi, split.num_classes)))
            if not ids:
                raise DatasetError(
                    f"split {spec!r}: {part} selects no class of {split.num_classes}"
                )
            split = split.subset(ids, name=f"{split.name}[{lo}:{hi}]")
        parts.append(split)
    return parts[0] if len(parts) == 1 else concat_splits(parts, f"{kind}/{spec}")


def concat_splits(splits: list[ImageSplit], name: str) -> ImageSplit:
    """The classes of several splits (all file-based or all in-memory) as one split, labels
    renumbered."""
    labels: list[np.ndarray] = []
    names: list[str] = []
    for s in splits:
        labels.append(np.asarray(s.labels) + len(names))
        names += list(s.class_names)
    mode = splits[0].color_mode
    if all(s.paths is not None for s in splits):
        paths = [p for s in splits for p in s.paths or []]
        return ImageSplit(name, names, np.concatenate(labels), paths=paths, color_mode=mode)
    if all(s.arrays is not None for s in splits):
        arrays = np.concatenate([s.arrays for s in splits if s.arrays is not None])
        return ImageSplit(name, names, np.concatenate(labels), arrays=arrays, color_mode=mode)
    raise DatasetError(f"{name}: its parts are stored differently and cannot be joined")
