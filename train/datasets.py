"""Readers for the few-shot benchmarks, each returning an `ImageSplit`, and one entry point.

`open_split(kind, root, split, **options)` reads any supported layout:

| kind | layout |
|---|---|
| folders | `<root>/<split>/<class>/<image>` (miniImageNet as the MTL code reads it) |
| csv | `<root>/splits/<split>.csv` (`filename,label`; Ravi & Larochelle) + the images |
| omniglot | `<root>/images_background/<alphabet>/<character>/<png>`, split by whole alphabets |
| fc100 | CIFAR-100 python pickles, 60/20/20 classes by super-class (Oreshkin et al. 2018) |
| cifar-fs | CIFAR-100 python pickles, 64/16/20 classes (Bertinetto et al. 2019) |
| tiered | tieredImageNet unpacked to `<root>/<split>/<class>/<image>` |
| tiered-pickle | Ren et al.'s `<split>_images_png.pkl` + `<split>_labels.pkl` |
| shards | tar shards written by `mtl-edge data pack` (`index.json` + `*.tar`) |
| synthetic | the built-in procedural dataset (no files; `root` is ignored) |

`decode_split(split, size)` decodes a whole split once into one uint8 array, in a process pool.

numpy + Pillow only (no torch), so the device side may use it too. Pickles are read with a
restricted unpickler that only rebuilds numpy arrays and plain containers: a dataset file can
never run code.
"""

from __future__ import annotations

import inspect
import logging
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.data.folders import (
    IMAGE_EXTENSIONS,
    check_on_error,
    images_in,
    list_class_dirs,
    locate_csv_images,
    read_class_folders,
    read_split_csv,
)
from mtl_edge.data.split import ImageSplit
from mtl_edge.data.synthetic import synthetic_split
from mtl_edge.errors import DatasetError
from mtl_edge.preprocess import DEFAULT_MAX_PIXELS, Preprocess, decode_image, resize_and_crop

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# ---------------------------------------------------------------------------------------------
# Published class lists
# ---------------------------------------------------------------------------------------------

#: FC100 (Oreshkin et al., "TADAM", NeurIPS 2018): the 20 CIFAR-100 super-classes split 12/4/4,
#: i.e. 60/20/20 fine classes. Names as in CIFAR-100's `meta` file (`coarse_label_names`).
FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish",
        "flowers",
        "food_containers",
        "fruit_and_vegetables",
        "household_electrical_devices",
        "household_furniture",
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "reptiles",
        "trees",
        "vehicles_1",
        "vehicles_2",
    ),
    "val": (
        "large_carnivores",
        "large_omnivores_and_herbivores",
        "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}

#: CIFAR-FS (Bertinetto et al., "Meta-learning with differentiable closed-form solvers",
#: ICLR 2019): 64/16/20 CIFAR-100 fine classes, names as in `fine_label_names`.
CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "apple",
        "aquarium_fish",
        "bear",
        "bee",
        "bottle",
        "bowl",
        "boy",
        "bridge",
        "bus",
        "can",
        "castle",
        "caterpillar",
        "chair",
        "clock",
        "cloud",
        "cockroach",
        "couch",
        "cup",
        "dinosaur",
        "dolphin",
        "elephant",
        "forest",
        "girl",
        "hamster",
        "house",
        "kangaroo",
        "keyboard",
        "lawn_mower",
        "lion",
        "lizard",
        "lobster",
        "mountain",
        "mouse",
        "mushroom",
        "oak_tree",
        "orange",
        "orchid",
        "palm_tree",
        "pear",
        "pine_tree",
        "plate",
        "porcupine",
        "possum",
        "rabbit",
        "raccoon",
        "ray",
        "road",
        "seal",
        "shrew",
        "skunk",
        "skyscraper",
        "snake",
        "spider",
        "squirrel",
        "streetcar",
        "sunflower",
        "tank",
        "tiger",
        "train",
        "trout",
        "tulip",
        "turtle",
        "willow_tree",
        "wolf",
    ),
    "val": (
        "beaver",
        "otter",
        "flatfish",
        "shark",
        "lamp",
        "television",
        "beetle",
        "butterfly",
        "sea",
        "camel",
        "cattle",
        "crab",
        "crocodile",
        "maple_tree",
        "motorcycle",
        "tractor",
    ),
    "test": (
        "whale",
        "poppy",
        "rose",
        "sweet_pepper",
        "telephone",
        "bed",
        "table",
        "wardrobe",
        "leopard",
        "plain",
        "chimpanzee",
        "fox",
        "snail",
        "worm",
        "baby",
        "man",
        "woman",
        "bicycle",
        "pickup_truck",
        "rocket",
    ),
}

# ---------------------------------------------------------------------------------------------
# Safe pickles
# ---------------------------------------------------------------------------------------------

#: The only globals a dataset pickle may reference: what numpy needs to rebuild arrays
#: (including pickles written by Python 2 and numpy 1.x).
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("__builtin__", "object"),
    ("builtins", "object"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def load_data_pickle(path: Path) -> Any:
    """Unpickle a dataset file (Python 2 or 3) that may only hold data, never code.

    Raises:
        DatasetError: one line naming the file when it is missing, truncated or not data.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: no such file; check the dataset root")
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path}: not a readable data pickle ({e}); re-download it") from None


def _field(d: Any, key: str, path: Path) -> Any:
    """`d[key]`, accepting the bytes keys of Python 2 pickles."""
    if isinstance(d, dict):
        for k in (key, key.encode()):
            if k in d:
                return d[k]
    raise DatasetError(f"{path}: has no {key!r} entry; is this the right file?")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# CSV split files (Ravi & Larochelle)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Omniglot
# ---------------------------------------------------------------------------------------------

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
) -> ImageSplit:
    """Omniglot by split name.

    "train" is the background set minus `val_alphabets` whole alphabets (a number picked with
    `seed`, or names); "val" is those held-out alphabets; "test" is `images_evaluation`;
    "background" and "evaluation" are the whole sets.
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
    kept, held = split_alphabets(omniglot_alphabets(set_dir), val_alphabets, seed)
    return read_omniglot(
        root,
        "images_background",
        kept if split == "train" else held,
        rotations,
        color_mode,
        on_error,
        f"omniglot/{split}",
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-100: FC100 and CIFAR-FS
# ---------------------------------------------------------------------------------------------


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
    fine_names = [_text(n) for n in _field(meta, "fine_label_names", folder / "meta")]
    coarse_names = [_text(n) for n in _field(meta, "coarse_label_names", folder / "meta")]
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        path = folder / part
        d = load_data_pickle(path)
        data = np.asarray(_field(d, "data", path))
        f = np.asarray(_field(d, "fine_labels", path), dtype=np.int64)
        c = np.asarray(_field(d, "coarse_labels", path), dtype=np.int64)
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


def _check_split(split: str, dataset: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"{dataset} split {split!r}: use train, val or test")


def read_fc100(root: str | Path, split: str, color_mode: str = "RGB") -> ImageSplit:
    """FC100: the CIFAR-100 classes of the split's super-classes (60/20/20), 600 images each."""
    _check_split(split, "fc100")
    images, fine, coarse, fine_names, coarse_names = load_cifar100(root)
    wanted = FC100_SUPERCLASSES[split]
    missing = sorted(set(wanted) - set(coarse_names))
    if missing:
        raise DatasetError(f"{root}: CIFAR-100 meta lacks the super-classes {missing}")
    coarse_ids = {coarse_names.index(s) for s in wanted}
    class_ids = sorted({int(f) for f, c in zip(fine, coarse, strict=True) if c in coarse_ids})
    return _cifar_split(images, fine, class_ids, fine_names, f"fc100/{split}", color_mode)


def read_cifar_fs(root: str | Path, split: str, color_mode: str = "RGB") -> ImageSplit:
    """CIFAR-FS: Bertinetto et al.'s 64/16/20 CIFAR-100 classes, 600 images each."""
    _check_split(split, "cifar-fs")
    images, fine, _, fine_names, _ = load_cifar100(root)
    missing = sorted(set(CIFAR_FS_CLASSES[split]) - set(fine_names))
    if missing:
        raise DatasetError(f"{root}: CIFAR-100 meta lacks the classes {missing}")
    class_ids = [fine_names.index(n) for n in CIFAR_FS_CLASSES[split]]
    return _cifar_split(images, fine, class_ids, fine_names, f"cifar-fs/{split}", color_mode)


# ---------------------------------------------------------------------------------------------
# tieredImageNet
# ---------------------------------------------------------------------------------------------


def read_tiered_pickle(root: str | Path, split: str, color_mode: str = "RGB") -> ImageSplit:
    """tieredImageNet in Ren et al.'s pickles: `<split>_images_png.pkl` (a list of PNG files,
    each a uint8 array of its bytes) and `<split>_labels.pkl` (`label_specific`: class id per
    image, `label_specific_str`: the class wnids, plus the general labels, unused here).

    Returns:
        ImageSplit holding the PNG bytes as `blobs` (decoded on use, never re-encoded).
    """
    _check_split(split, "tiered-pickle")
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
    labels = np.asarray(_field(meta, "label_specific", labels_path), dtype=np.int64)
    names = [_text(n) for n in _field(meta, "label_specific_str", labels_path)]
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


# ---------------------------------------------------------------------------------------------
# Whole-split decoding
# ---------------------------------------------------------------------------------------------


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
    from mtl_edge.data.verify import map_jobs, usable_cores

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


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


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
    from mtl_edge.data.shards import open_shards

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
