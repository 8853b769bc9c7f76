"""What `mtl-edge data verify` checks per file, the SHA256SUMS file, and the report it returns.

`check_file` / `check_bytes` read, hash and fully decode one image (in worker processes);
`read_sums` parses a checksum file; `VerifyReport` holds the result of a whole dataset and
`format_report` prints it.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mtl_edge.errors import DatasetError, ImageError
from mtl_edge.preprocess import DEFAULT_MAX_PIXELS, decode_image

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
