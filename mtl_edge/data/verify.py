"""Check a dataset folder: layout, counts, SHA256SUMS, every image decodes, duplicates.

`verify_dataset(root)` detects the layout (split folders of class folders, one folder of class
folders, Omniglot sets, CSV split files, or packed tar shards), reads every image once in a
process pool (hashing and fully decoding it), and returns a `VerifyReport`. Problems that make
the data unusable or untrustworthy (a missing or corrupt image, a checksum mismatch, an empty
class) are *errors*; byte-identical duplicates and stray non-image files are *warnings*.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

from PIL import Image

from mtl_edge.atomicio import sha256_file
from mtl_edge.data.folders import (
    IMAGE_EXTENSIONS,
    JUNK_FILES,
    is_hidden,
    list_class_dirs,
    locate_csv_images,
    read_split_csv,
)
from mtl_edge.errors import DatasetError, ImageError
from mtl_edge.preprocess import DEFAULT_MAX_PIXELS, decode_image

SPLIT_NAMES = ("train", "val", "test")
OMNIGLOT_SETS = ("images_background", "images_evaluation")
SUMS_FILE = "SHA256SUMS"


@dataclass
class SplitCounts:
    """Counts for one split: classes, images, images per class, image sizes and modes."""

    classes: int = 0
    images: int = 0
    min_per_class: int = 0
    max_per_class: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)


@dataclass
class VerifyReport:
    """What `verify_dataset` found. `ok` is False when there is any error."""

    root: str
    layout: str
    splits: dict[str, SplitCounts]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    corrupt: list[dict[str, str]] = field(default_factory=list)
    checksums: dict[str, Any] = field(default_factory=dict)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    split_files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


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
# SHA256SUMS
# ---------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def find_sums(root: Path) -> Path | None:
    """The nearest SHA256SUMS in `root` or one of its parent folders."""
    for folder in (root, *root.parents):
        candidate = folder / SUMS_FILE
        if candidate.is_file():
            return candidate
    return None


def read_sums(path: Path) -> dict[Path, str]:
    """Entries of a SHA256SUMS file (`<hex>  <path>` or `<hex> *<path>`), as absolute paths."""
    out: dict[Path, str] = {}
    base = Path(os.path.normpath(path.absolute())).parent
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"{path}: cannot read checksum file ({e}); fix it or pass --no-hash"
        ) from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name[1:] if name.startswith(("*", " ")) else name
        if len(digest) != 64 or not name:
            raise DatasetError(f"{path}:{n}: expected '<sha256>  <file>', got {line[:80]!r}")
        out[Path(os.path.normpath(base / name))] = digest.lower()
    return out


# ---------------------------------------------------------------------------------------------
# Per-file work (runs in worker processes)
# ---------------------------------------------------------------------------------------------


def check_file(args: tuple[str, str, bool, int]) -> tuple[str, str, str | None, str, str]:
    """Read, hash and fully decode one image.

    Args:
        args: (path, color_mode, sha256 wanted, max_pixels).

    Returns:
        (path, hex digest: sha256 or a faster blake2b, error or None, "WxH", original mode).
    """
    path, color_mode, want_sha, max_pixels = args
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return path, "", f"{path}: cannot read ({e.strerror})", "", ""
    digest = (
        hashlib.sha256(data).hexdigest()
        if want_sha
        else hashlib.blake2b(data, digest_size=16).hexdigest()
    )
    error, size, mode = check_bytes(data, path, color_mode, max_pixels)
    return path, digest, error, size, mode


def check_bytes(
    data: bytes, name: str, color_mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[str | None, str, str]:
    """Fully decode an encoded image as training would.

    Returns:
        (error message naming `name`, or None; "WxH"; the file's own Pillow mode).
    """
    try:
        decode_image(data, color_mode, max_pixels, name=name)
        with Image.open(io.BytesIO(data)) as img:
            return None, f"{img.width}x{img.height}", img.mode
    except ImageError as e:
        return str(e), "", ""


def map_jobs(
    fn: Callable[[Any], Any],
    items: list[Any],
    workers: int,
    progress: bool,
    description: str = "verifying",
) -> Iterable[Any]:
    """`map(fn, items)` in order, over `workers` processes when there is enough work.

    `fn` must be a module-level function; results stream back in input order.
    """
    chunk = max(1, min(256, len(items) // (workers * 8) or 1))
    if workers <= 1 or len(items) < 64:
        results: Iterable[Any] = map(fn, items)
        pool = None
    else:
        # fork: "spawn" would re-run an unguarded __main__ script in every worker. All workers
        # start inside pool.map, before the progress bar starts its refresh thread.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method))
        results = pool.map(fn, items, chunksize=chunk)
    try:
        if progress:
            from rich.progress import track

            results = track(results, total=len(items), description=description, transient=True)
        yield from results
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


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
        from mtl_edge.data.shards import verify_shards

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


def format_report(report: VerifyReport, max_lines: int = 20) -> str:
    """Human-readable summary: a line per split, then errors and warnings (capped)."""
    lines = [f"{report.root}: layout {report.layout}"]
    for name, c in report.splits.items():
        sizes = ", ".join(f"{s} ({n})" for s, n in list(c.sizes.items())[:3])
        modes = ", ".join(f"{m} ({n})" for m, n in c.modes.items())
        per = (
            f"{c.min_per_class}"
            if c.min_per_class == c.max_per_class
            else f"{c.min_per_class}-{c.max_per_class}"
        )
        lines.append(
            f"  {name}: {c.classes} classes, {c.images} images ({per} per class); "
            f"sizes {sizes or '-'}; modes {modes or '-'}"
        )
    cs = report.checksums
    if cs.get("file"):
        lines.append(
            f"  checksums: {cs.get('checked', 0)} files checked against {cs['file']}: "
            f"{len(cs.get('mismatched', []))} mismatched, {len(cs.get('missing', []))} missing"
        )
    else:
        lines.append("  checksums: no SHA256SUMS found (or --no-hash)")
    for split, sf in report.split_files.items():
        same = not sf["not_in_folders"] and not sf["not_in_csv"]
        lines.append(
            f"  {split} split file {sf['file']}: {sf['listed']} images listed, "
            + ("the same as the folders" if same else "differs from the folders (see warnings)")
        )
    for title, items in (("error", report.errors), ("warning", report.warnings)):
        for item in items[:max_lines]:
            lines.append(f"{title}: {item}")
        if len(items) > max_lines:
            lines.append(f"{title}: ... and {len(items) - max_lines} more (see --json)")
    lines.append("OK" if report.ok else f"FAILED: {len(report.errors)} error(s), see above")
    return "\n".join(lines)
