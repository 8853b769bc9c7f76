"""Read a folder of class folders: `<root>/<split>/<class>/<image>` or a user's `<dir>/<class>/`,
and find the images a `filename,label` split file lists.

This is the layout of the official MTL code (miniImageNet `train/`, `val/`, `test/`), of
tieredImageNet unpacked to folders, and of the photos a user enrolls on the device. Classes and
files are sorted by name, so labels are stable across machines. Hidden files and folders (a
leading "."), and the junk files operating systems drop into folders, are ignored.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError, ImageError
from mtl_edge.preprocess import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

#: File name endings read as images (compared in lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)

#: Files that operating systems and tools leave in folders; never images, never reported.
JUNK_FILES = frozenset({"thumbs.db", "desktop.ini", "sha256sums", "md5sums", "readme.md"})

ON_ERROR = ("raise", "skip")


def check_on_error(on_error: str) -> None:
    """Raise DatasetError unless `on_error` is "raise" or "skip"."""
    if on_error not in ON_ERROR:
        raise DatasetError(f"on_error={on_error!r}: use 'raise' or 'skip'")


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def _visible_entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)


def list_class_dirs(folder: Path) -> list[Path]:
    """Sorted visible sub-folders of `folder` (each one a class)."""
    return [Path(e.path) for e in _visible_entries(folder) if e.is_dir()]


def _problem(on_error: str, message: str) -> None:
    """Raise `message` as a DatasetError, or log it as a warning when skipping."""
    if on_error == "raise":
        raise DatasetError(message)
    log.warning("%s (skipped)", message)


def _require_folder(folder: Path, what: str) -> None:
    if not folder.exists():
        raise DatasetError(f"{folder}: no such folder; check the {what} path")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: is a file, not a folder; pass the {what} folder")


def validate_images(
    split: ImageSplit,
    on_error: str = "raise",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageSplit:
    """Decode every image of `split`; raise on the first bad one, or drop the bad ones.

    Returns:
        `split` itself when all images decode, else (with on_error="skip") the split without the
        samples that failed, each logged as a warning naming the file.
    """
    check_on_error(on_error)
    bad: list[int] = []
    for i in range(len(split)):
        try:
            split.image(i, max_pixels=max_pixels)
        except ImageError as e:
            if on_error == "raise":
                raise DatasetError(f"{e}; fix or remove it, or pass on_error='skip'") from None
            log.warning("%s (skipped)", e)
            bad.append(i)
    if not bad:
        return split
    return split.take(np.setdiff1d(np.arange(len(split)), bad))


def drop_empty_classes(split: ImageSplit, on_error: str = "raise") -> ImageSplit:
    """Raise DatasetError naming the first class with no images, or drop such classes."""
    counts = split.class_counts()
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return split
    for c in empty:
        _problem(
            on_error,
            f"{split.name}: class {split.class_names[c]!r} has no readable images; "
            "add images or remove the class",
        )
    return split.subset(np.flatnonzero(counts > 0))


def images_in(
    folder: Path,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    on_error: str = "raise",
) -> list[Path]:
    """Sorted image files directly inside `folder`.

    Files with another extension raise DatasetError naming them (on_error="raise") or are
    skipped with a warning; sub-folders inside a class folder are skipped with a warning.
    """
    exts = tuple(e.lower() for e in extensions)
    images: list[Path] = []
    for entry in _visible_entries(folder):
        path = Path(entry.path)
        if entry.is_dir():
            log.warning("%s: a folder inside a class folder is not read (skipped)", path)
        elif entry.name.lower().endswith(exts):
            images.append(path)
        elif entry.name.lower() not in JUNK_FILES:
            _problem(
                on_error,
                f"{path}: not an image by its extension (expected one of {', '.join(exts)}); "
                "remove it or pass on_error='skip'",
            )
    return images


def _read_classes(
    class_dirs: Iterable[tuple[str, Path]],
    name: str,
    color_mode: str,
    extensions: Sequence[str],
    on_error: str,
) -> ImageSplit:
    class_names: list[str] = []
    paths: list[Path] = []
    labels: list[int] = []
    for class_name, folder in class_dirs:
        files = images_in(folder, extensions, on_error)
        if not files:
            _problem(on_error, f"{folder}: class folder has no images; add images or remove it")
            continue
        labels += [len(class_names)] * len(files)
        class_names.append(class_name)
        paths += files
    return ImageSplit(
        name=name,
        class_names=class_names,
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        color_mode=color_mode,
    )


def read_class_folders(
    root: str | Path,
    split: str | None = None,
    color_mode: str = "RGB",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    on_error: str = "raise",
    validate: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageSplit:
    """Read `<root>/<split>/<class>/<image>` (or `<root>/<class>/<image>` when split is None).

    Args:
        root: dataset folder.
        split: sub-folder such as "train", or None when `root` holds the class folders.
        color_mode: "RGB" or "L", the mode images decode to.
        extensions: file endings read as images (case-insensitive).
        on_error: "raise" stops at the first problem (a non-image file, an empty class, with
            `validate` an undecodable image) with one line naming it; "skip" leaves it out
            with a warning.
        validate: decode every image now (slow on big splits; `mtl-edge data verify` does it
            in parallel) instead of when it is first used.
        max_pixels: with `validate`, refuse images with more pixels (decompression bombs).

    Returns:
        ImageSplit named "<root name>/<split>" with sorted classes and files.
    """
    check_on_error(on_error)
    root = Path(root)
    _require_folder(root, "dataset")
    folder = root / split if split else root
    if split and not folder.is_dir():
        found = [p.name for p in list_class_dirs(root)]
        raise DatasetError(
            f"{folder}: no such split folder (found: {', '.join(found) or 'nothing'}); "
            "pass an existing split or the folder that holds the class folders"
        )
    class_dirs = list_class_dirs(folder)
    if not class_dirs:
        loose = images_in(folder, extensions, on_error="skip")
        hint = (
            f"it holds {len(loose)} images directly: put them in one sub-folder per class"
            if loose
            else "expected one sub-folder per class"
        )
        raise DatasetError(f"{folder}: no class folders ({hint})")
    name = f"{root.name}/{split}" if split else root.name
    out = _read_classes(((d.name, d) for d in class_dirs), name, color_mode, extensions, on_error)
    if out.num_classes == 0:
        raise DatasetError(f"{folder}: no class folder holds any images")
    if validate:
        out = drop_empty_classes(validate_images(out, on_error, max_pixels), on_error)
    return out


def read_user_folder(
    folder: str | Path,
    color_mode: str = "RGB",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    on_error: str = "raise",
    validate: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageSplit:
    """A user's folder of class folders (`<folder>/<class>/<image>`), for enrollment.

    Unlike a benchmark split it is small, so every image is decoded up front by default: a bad
    photo is reported before any work is done, not halfway through enrollment.
    """
    return read_class_folders(
        folder,
        None,
        color_mode=color_mode,
        extensions=extensions,
        on_error=on_error,
        validate=validate,
        max_pixels=max_pixels,
    )


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """Rows of a `filename,label` split file (Ravi & Larochelle), header checked.

    Raises:
        DatasetError: naming the file (and line) for a wrong header, a malformed row, no rows.
    """
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read split file ({e})") from None
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        raise DatasetError(f"{path}: first line must be the header 'filename,label'")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{path}:{line}: expected 'filename,label', got {','.join(row)!r}")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DatasetError(f"{path}: lists no images")
    return out


def locate_csv_images(
    root: Path,
    split: str,
    rows: Sequence[tuple[str, str]],
    csv_path: Path,
    images: Path | None = None,
) -> list[Path]:
    """Where the files of a split CSV are: `images/` if given, else the first of
    `<root>/images/<file>` (flat), `<root>/<split>/<label>/<file>`, `<root>/<label>/<file>`
    that holds the first row's file. Returned paths may not exist (missing files).
    """
    layouts: list[Callable[[str, str], Path]] = (
        [lambda f, _label: images / f]  # type: ignore[operator]
        if images is not None
        else [
            lambda f, _label: root / "images" / f,
            lambda f, label: root / split / label / f,
            lambda f, label: root / label / f,
        ]
    )
    first_file, first_label = rows[0]
    locate = next((lay for lay in layouts if lay(first_file, first_label).is_file()), None)
    if locate is None:
        tried = ", ".join(str(lay(first_file, first_label)) for lay in layouts)
        raise DatasetError(
            f"{csv_path}: cannot find its first image {first_file!r} (tried {tried}); "
            "pass the folder that holds the files"
        )
    return [locate(f, label) for f, label in rows]
