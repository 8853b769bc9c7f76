"""Omniglot (Lake et al. 2015): characters as classes, split by whole alphabets.

`open_omniglot(root, split)`: "train" is the background set minus `val_alphabets` whole
alphabets, "val" those alphabets, "test" the evaluation set; each rotation of a character can be
a class of its own (the MAML protocol).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl_edge.data.folders import IMAGE_EXTENSIONS, check_on_error, images_in, list_class_dirs
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError

log = logging.getLogger(__name__)

OMNIGLOT_SETS = ("images_background", "images_evaluation")


def omniglot_set_dir(root: str | Path, which: str = "images_background") -> Path:
    """The folder of one Omniglot set: `<root>/<which>`, or `root` itself if it is that set."""
    root = Path(root)
    if which not in OMNIGLOT_SETS:
        raise DatasetError(f"omniglot set {which!r}: use one of {', '.join(OMNIGLOT_SETS)}")
    for folder in (root / which, root):
        if folder.name == which and folder.is_dir():
            return folder
    raise DatasetError(
        f"{root}: has no {which}/ folder; pass the folder that holds the Omniglot sets "
        "(<alphabet>/<character>/<png> below them)"
    )


def omniglot_alphabets(set_dir: Path) -> list[str]:
    alphabets = [p.name for p in list_class_dirs(set_dir)]
    if not alphabets:
        raise DatasetError(f"{set_dir}: no alphabet folders; expected <alphabet>/<character>/<png>")
    return alphabets


def split_alphabets(
    alphabets: Sequence[str], held_out: int | Sequence[str], seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split alphabets into (kept, held out), by name or `held_out` seeded random picks.

    Returns:
        two sorted lists of alphabet names.
    """
    alphabets = sorted(alphabets)
    if isinstance(held_out, int):
        if not 0 <= held_out < len(alphabets):
            raise DatasetError(
                f"omniglot val_alphabets={held_out}: need 0 <= N < {len(alphabets)} alphabets"
            )
        rng = np.random.default_rng(seed)
        picked = {alphabets[i] for i in rng.choice(len(alphabets), held_out, replace=False)}
    else:
        picked = set(held_out)
        unknown = sorted(picked - set(alphabets))
        if unknown:
            raise DatasetError(
                f"omniglot val_alphabets: unknown {unknown}; known: {', '.join(alphabets)}"
            )
    return [a for a in alphabets if a not in picked], sorted(picked)


def _rotation_list(rotations: bool | Sequence[int]) -> list[int]:
    if rotations is True:
        return [0, 90, 180, 270]
    if rotations is False:
        return [0]
    out = sorted({int(r) % 360 for r in rotations})  # type: ignore[union-attr]
    if not out or any(r % 90 for r in out):
        raise DatasetError(f"omniglot rotations={list(rotations)}: use multiples of 90 degrees")
    return out


def read_omniglot(
    root: str | Path,
    which: str = "images_background",
    alphabets: Sequence[str] | None = None,
    rotations: bool | Sequence[int] = False,
    color_mode: str = "L",
    on_error: str = "raise",
    name: str | None = None,
) -> ImageSplit:
    """Omniglot characters as classes: `<set>/<alphabet>/<character>/<png>`.

    Args:
        root: folder holding `images_background/` (and optionally `images_evaluation/`), or
            one of those folders itself.
        which: "images_background" or "images_evaluation".
        alphabets: read only these alphabets (default all).
        rotations: True for 0/90/180/270, or a list of degrees; each rotation of a character
            is a class of its own ("<alphabet>/<character>@90"), as in the MAML protocol.
        color_mode: "L" (the images are 1-bit) or "RGB".

    Returns:
        ImageSplit with `rotations` set when more than one rotation (or a non-zero one) is used.
    """
    check_on_error(on_error)
    set_dir = omniglot_set_dir(root, which)
    known = omniglot_alphabets(set_dir)
    chosen = list(known) if alphabets is None else sorted(alphabets)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise DatasetError(f"{set_dir}: no alphabet {unknown[0]!r}; known: {', '.join(known)}")
    characters: list[tuple[str, list[Path]]] = []
    for alphabet in chosen:
        for char_dir in list_class_dirs(set_dir / alphabet):
            files = images_in(char_dir, IMAGE_EXTENSIONS, on_error)
            if not files:
                msg = f"{char_dir}: character folder has no images; restore it or remove it"
                if on_error == "raise":
                    raise DatasetError(msg)
                log.warning("%s (skipped)", msg)
                continue
            characters.append((f"{alphabet}/{char_dir.name}", files))
    if not characters:
        raise DatasetError(f"{set_dir}: no character folders with images in {chosen}")
    degrees = _rotation_list(rotations)
    class_names: list[str] = []
    paths: list[Path] = []
    labels: list[int] = []
    rots: list[int] = []
    for deg in degrees:
        for char, files in characters:
            labels += [len(class_names)] * len(files)
            class_names.append(char if deg == 0 else f"{char}@{deg}")
            paths += files
            rots += [deg] * len(files)
    return ImageSplit(
        name=name or f"omniglot/{which.removeprefix('images_')}",
        class_names=class_names,
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        rotations=np.asarray(rots, dtype=np.int64) if degrees != [0] else None,
        color_mode=color_mode,
    )


def open_omniglot(
    root: str | Path,
    split: str,
    val_alphabets: int | Sequence[str] = 5,
    seed: int = 0,
    rotations: bool | Sequence[int] = False,
    color_mode: str = "L",
    on_error: str = "raise",
    exclude_alphabets: Sequence[str] = (),
) -> ImageSplit:
    """Omniglot by split name.

    "train" is the background set minus `val_alphabets` whole alphabets (a number picked with
    `seed`, or names); "val" is those held-out alphabets; "test" is `images_evaluation`;
    "background" and "evaluation" are the whole sets. `exclude_alphabets` (names) are left out
    of "train" and "val" before the split: an internal validation split that never touches a
    recipe's held-out test alphabets.
    """
    if split in ("background", "evaluation"):
        return read_omniglot(root, f"images_{split}", None, rotations, color_mode, on_error)
    if split == "test":
        try:
            omniglot_set_dir(root, "images_evaluation")
        except DatasetError:
            raise DatasetError(
                f"{root}: has no images_evaluation/ for split 'test'; add it, or evaluate on "
                "held-out background alphabets (split 'val')"
            ) from None
        return read_omniglot(
            root, "images_evaluation", None, rotations, color_mode, on_error, "omniglot/test"
        )
    if split not in ("train", "val"):
        raise DatasetError(
            f"omniglot split {split!r}: use train, val, test, background or evaluation"
        )
    set_dir = omniglot_set_dir(root, "images_background")
    known = omniglot_alphabets(set_dir)
    unknown = sorted(set(exclude_alphabets) - set(known))
    if unknown:
        raise DatasetError(
            f"omniglot exclude_alphabets: unknown {unknown}; known: {', '.join(known)}"
        )
    pool = [a for a in known if a not in set(exclude_alphabets)]
    kept, held = split_alphabets(pool, val_alphabets, seed)
    return read_omniglot(
        root,
        "images_background",
        kept if split == "train" else held,
        rotations,
        color_mode,
        on_error,
        f"omniglot/{split}",
    )
