"""Check a dataset folder: layout, counts, SHA256SUMS, every image decodes, duplicates.

`verify_dataset(root)` detects the layout (split folders of class folders, one folder of class
folders, Omniglot sets, CSV split files, or packed tar shards), reads every image once in a
process pool (hashing and fully decoding it), and returns a `VerifyReport`. Problems that make
the data unusable or untrustworthy (a missing or corrupt image, a checksum mismatch, an empty
class) are *errors*; byte-identical duplicates and stray non-image files are *warnings*.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl_edge.atomicio import sha256_file
from mtl_edge.data.checks import (
    SplitCounts,
    VerifyReport,
    check_bytes,
    check_file,
    find_sums,
    read_sums,
)
from mtl_edge.data.folders import (
    IMAGE_EXTENSIONS,
    JUNK_FILES,
    is_hidden,
    list_class_dirs,
    locate_csv_images,
    read_split_csv,
)
from mtl_edge.data.jobs import map_jobs, usable_cores
from mtl_edge.data.shards import INDEX, check_shard, read_index, read_tar_members
from mtl_edge.errors import DatasetError
from mtl_edge.preprocess import DEFAULT_MAX_PIXELS

SPLIT_NAMES = ("train", "val", "test")
OMNIGLOT_SETS = ("images_background", "images_evaluation")


@dataclass(frozen=True)
class _Entry:
    split: str
    cls: str
    path: Path


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def _walk_class(folder: Path, warnings: list[str]) -> list[Path]:
    """Image files of one class folder; other visible files become warnings."""
    out = []
    with os.scandir(folder) as it:
        for e in sorted(it, key=lambda e: e.name):
            if is_hidden(e.name) or e.name.lower() in JUNK_FILES:
                continue
            if e.is_dir():
                warnings.append(f"{e.path}: folder inside a class folder, not read")
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(e.path))
            else:
                warnings.append(f"{e.path}: not an image by its extension, not read")
    return out


def _class_folder_entries(
    split: str, folder: Path, errors: list[str], warnings: list[str], depth: int = 1
) -> list[_Entry]:
    """Entries below `folder`, whose classes are `depth` folder levels deep."""
    entries = []
    class_dirs = [(d.name, d) for d in list_class_dirs(folder)]
    for _ in range(depth - 1):
        class_dirs = [(f"{n}/{d.name}", d) for n, p in class_dirs for d in list_class_dirs(p)]
    if not class_dirs:
        errors.append(f"{folder}: no class folders")
    for name, d in class_dirs:
        files = _walk_class(d, warnings)
        if not files:
            errors.append(f"{d}: class folder has no images")
        entries += [_Entry(split, name, p) for p in files]
    return entries


def detect_layout(root: Path) -> tuple[str, list[tuple[str, Path, int]]]:
    """Which layout `root` holds.

    Returns:
        (layout name, [(split name, folder or CSV file, class depth), ...]) where layout is
        "splits" (`<root>/<split>/<class>/`), "omniglot" (`<set>/<alphabet>/<character>/`),
        "csv" (`<root>/splits/<split>.csv` or `<root>/<split>.csv` listing the images; depth 0)
        or "classes" (`<root>/<class>/`).
    """
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; pass the dataset folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file; pass the dataset folder")
    if root.name in OMNIGLOT_SETS:
        return "omniglot", [(root.name, root, 2)]
    sets = [(s, root / s, 2) for s in OMNIGLOT_SETS if (root / s).is_dir()]
    if sets:
        return "omniglot", sets
    splits = [(s, root / s, 1) for s in SPLIT_NAMES if (root / s).is_dir()]
    if splits:
        return "splits", splits
    csvs = split_csvs(root)
    if csvs:
        return "csv", [(name, path, 0) for name, path in csvs.items()]
    if list_class_dirs(root):
        return "classes", [(root.name, root, 1)]
    raise DatasetError(
        f"{root}: no train/val/test, images_background or class folders; "
        "expected <root>/<split>/<class>/<image> or <root>/<class>/<image>"
    )


def split_csvs(root: Path) -> dict[str, Path]:
    """Split files `<root>/splits/<split>.csv` (else `<root>/<split>.csv`) by split name."""
    for folder in (root / "splits", root):
        found = {s: folder / f"{s}.csv" for s in SPLIT_NAMES if (folder / f"{s}.csv").is_file()}
        if found:
            return found
    return {}


def _csv_entries(root: Path, split: str, csv_path: Path, errors: list[str]) -> list[_Entry]:
    """Entries listed in a split CSV; listed files that do not exist become errors."""
    try:
        rows = read_split_csv(csv_path)
        located = locate_csv_images(root, split, rows, csv_path)
    except DatasetError as e:
        errors.append(str(e))
        return []
    entries = []
    missing = []
    for (_, label), path in zip(rows, located, strict=True):
        if path.is_file():
            entries.append(_Entry(split, label, path))
        else:
            missing.append(path)
    if missing:
        errors.append(f"{missing[0]}: listed in {csv_path} but missing ({len(missing)} in all)")
    return entries


def _cross_check_csv(
    root: Path, split: str, entries: list[_Entry], warnings: list[str]
) -> dict[str, Any] | None:
    """Compare a split folder with its CSV file, if there is one (miniImageNet ships both)."""
    csv_path = split_csvs(root).get(split)
    if csv_path is None:
        return None
    errors: list[str] = []
    listed = {(e.cls, e.path) for e in _csv_entries(root, split, csv_path, errors)}
    found = {(e.cls, e.path) for e in entries if e.split == split}
    result = {
        "file": str(csv_path),
        "listed": len(listed),
        "not_in_folders": len(listed - found),
        "not_in_csv": len(found - listed),
    }
    for problem in errors:
        warnings.append(f"split file does not match the folders: {problem}")
    if found != listed and not errors:
        warnings.append(
            f"{csv_path}: lists {len(listed)} images, the {split} folders hold {len(found)} "
            f"({result['not_in_csv']} not listed, {result['not_in_folders']} listed elsewhere)"
        )
    return result


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------


def _duplicates(entries: list[_Entry], digests: dict[Path, str]) -> list[dict[str, Any]]:
    groups: dict[str, list[_Entry]] = defaultdict(list)
    for e in entries:
        if digests.get(e.path):
            groups[digests[e.path]].append(e)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        splits = sorted({m.split for m in members})
        classes = sorted({f"{m.split}/{m.cls}" for m in members})
        kind = (
            "across splits"
            if len(splits) > 1
            else ("across classes" if len(classes) > 1 else "within a class")
        )
        out.append(
            {
                "kind": kind,
                "splits": splits,
                "classes": classes,
                "files": sorted(str(m.path) for m in members),
            }
        )
    return sorted(out, key=lambda d: d["files"])


def verify_dataset(
    root: str | Path,
    check_hash: bool = True,
    workers: int | None = None,
    progress: bool | None = None,
    color_mode: str = "RGB",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VerifyReport:
    """Verify every image under `root`.

    Args:
        root: dataset folder (see `detect_layout`), or a folder of packed shards.
        check_hash: compare files against the nearest SHA256SUMS (in `root` or a parent).
        workers: decoding processes (default: the usable cores).
        progress: show a progress bar (default: when stderr is a terminal).
        color_mode: the mode images are decoded to, as training would.
        max_pixels: images with more pixels are reported (possible decompression bombs).
    """
    root = Path(os.path.normpath(Path(root).absolute()))
    if (root / "index.json").is_file():
        return verify_shards(root, color_mode, max_pixels)
    layout, parts = detect_layout(root)
    errors: list[str] = []
    warnings: list[str] = []
    entries: list[_Entry] = []
    for split, folder, depth in parts:
        if depth == 0:
            entries += _csv_entries(root, split, folder, errors)
        else:
            entries += _class_folder_entries(split, folder, errors, warnings, depth)
    if not entries:
        raise DatasetError(f"{root}: no images found" + (f" ({errors[0]})" if errors else ""))
    split_files = {}
    if layout == "splits":
        for split, _, _ in parts:
            check = _cross_check_csv(root, split, entries, warnings)
            if check is not None:
                split_files[split] = check

    sums_path = find_sums(root) if check_hash else None
    sums = read_sums(sums_path) if sums_path else {}
    workers = workers or usable_cores()
    show = sys.stderr.isatty() if progress is None else progress
    jobs = [(str(e.path), color_mode, bool(sums), max_pixels) for e in entries]

    digests: dict[Path, str] = {}
    corrupt: list[dict[str, str]] = []
    sizes: dict[str, Counter[str]] = defaultdict(Counter)
    modes: dict[str, Counter[str]] = defaultdict(Counter)
    split_of = {e.path: e.split for e in entries}
    for path_s, digest, error, size, mode in map_jobs(check_file, jobs, workers, show):
        path = Path(path_s)
        digests[path] = digest
        if error:
            corrupt.append({"path": path_s, "error": error})
        else:
            sizes[split_of[path]][size] += 1
            modes[split_of[path]][mode] += 1
    for c in corrupt:
        errors.append(c["error"])

    checksums: dict[str, Any] = {"file": str(sums_path) if sums_path else None}
    if sums:
        # Listed files under root that are not images (split CSVs, READMEs) are checked too.
        under_root = [p for p in sums if p.is_relative_to(root)]
        for p in under_root:
            if p not in digests and p.is_file():
                digests[p] = sha256_file(p)
        mismatched = sorted(str(p) for p, d in digests.items() if p in sums and d and sums[p] != d)
        missing = sorted(str(p) for p in under_root if not p.exists())
        unlisted = sorted(str(p) for p in digests if p not in sums)
        checksums.update(
            checked=sum(1 for p in digests if p in sums),
            mismatched=mismatched,
            missing=missing,
            unlisted=len(unlisted),
        )
        errors += [f"{p}: sha256 differs from {sums_path}" for p in mismatched]
        errors += [f"{p}: listed in {sums_path} but missing" for p in missing]
        if unlisted:
            warnings.append(f"{len(unlisted)} images not listed in {sums_path}, e.g. {unlisted[0]}")

    duplicates = _duplicates(entries, digests)
    for d in duplicates:
        warnings.append(f"byte-identical images ({d['kind']}): {', '.join(d['files'])}")

    counts: dict[str, SplitCounts] = {}
    for split, _, _ in parts:
        per_class = Counter(e.cls for e in entries if e.split == split)
        counts[split] = SplitCounts(
            classes=len(per_class),
            images=sum(per_class.values()),
            min_per_class=min(per_class.values(), default=0),
            max_per_class=max(per_class.values(), default=0),
            sizes=dict(sizes[split].most_common()),
            modes=dict(modes[split].most_common()),
        )
    return VerifyReport(
        root=str(root),
        layout=layout,
        splits=counts,
        errors=errors,
        warnings=warnings,
        corrupt=corrupt,
        checksums=checksums,
        duplicates=duplicates,
        split_files=split_files,
    )


def verify_shards(
    folder: str | Path, color_mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Any:
    """`mtl-edge data verify` for a shard folder: checksums, counts and every image decodes.

    Returns:
        a `mtl_edge.data.verify.VerifyReport` with layout "shards".
    """
    folder = Path(folder)
    index = read_index(folder)
    errors: list[str] = []
    mismatched: list[str] = []
    good = []
    for entry in index["shards"]:
        try:
            good.append(check_shard(folder, entry))
        except DatasetError as e:
            errors.append(str(e))
            mismatched.append(str(folder / entry["file"]))
    corrupt: list[dict[str, str]] = []
    per_class: dict[int, int] = {}
    sizes: dict[str, int] = {}
    modes: dict[str, int] = {}
    digests: dict[str, list[str]] = {}
    for path in good:
        for key, data, label, _ in read_tar_members(path, len(index["class_names"])):
            name = f"{path.name}:{key}"
            per_class[label] = per_class.get(label, 0) + 1
            digests.setdefault(hashlib.blake2b(data, digest_size=16).hexdigest(), []).append(name)
            err, size, mode = check_bytes(data, name, color_mode, max_pixels)
            if err:
                corrupt.append({"path": name, "error": err})
                errors.append(err)
                continue
            sizes[size] = sizes.get(size, 0) + 1
            modes[mode] = modes.get(mode, 0) + 1
    name = str(index.get("name", folder.name))
    counts = SplitCounts(
        classes=len(per_class),
        images=sum(per_class.values()),
        min_per_class=min(per_class.values(), default=0),
        max_per_class=max(per_class.values(), default=0),
        sizes=dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        modes=modes,
    )
    duplicates = [
        {"kind": "in shards", "splits": [name], "classes": [], "files": files}
        for files in digests.values()
        if len(files) > 1
    ]
    return VerifyReport(
        root=str(folder),
        layout="shards",
        splits={name: counts},
        errors=errors,
        warnings=[f"byte-identical images: {', '.join(d['files'])}" for d in duplicates],
        corrupt=corrupt,
        checksums={
            "file": str(folder / INDEX),
            "checked": len(index["shards"]),
            "mismatched": mismatched,
            "missing": [],
        },
        duplicates=duplicates,
    )
