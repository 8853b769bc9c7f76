"""A built-in synthetic few-shot dataset: procedurally drawn classes, no download.

Each class is a random *prototype* drawn from its own seed: a background colour and one to three
parts (filled polygons, ellipses, stars or thick strokes), each with a colour and a fill texture
(solid, stripes, checks or dots). Each *sample* redraws the prototype under a random distortion:
the whole object is shifted, scaled and rotated, every vertex wobbles, colours are perturbed,
the background gets a gradient and clutter (small random shapes and lines), and pixel noise is
added. Classes are therefore distinct while their samples vary, as in a real few-shot split.

Everything is a pure function of (seed, class id, sample index): the same call gives the same
pixels on every machine. numpy + Pillow only, so the device side and the demo can use it.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mtl_edge.atomicio import staged_dir
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError

#: Default number of classes per split, as in miniImageNet (64 / 16 / 20).
DEFAULT_CLASSES = {"train": 64, "val": 16, "test": 20}

_KINDS = ("polygon", "ellipse", "star", "stroke")
_TEXTURES = ("solid", "stripes", "checks", "dots")


@dataclass(frozen=True)
class _Part:
    """One part of a class prototype, in object coordinates (the unit square is [-1, 1]^2)."""

    kind: str
    points: np.ndarray  # float64 of shape (P, 2): outline (or polyline for strokes)
    width: float  # stroke width as a fraction of the image size (strokes only)
    color: np.ndarray  # float64 of shape (3,)
    color2: np.ndarray  # float64 of shape (3,): second texture colour
    texture: str
    freq: float  # texture periods across the object
    angle: float  # texture orientation, radians


@dataclass(frozen=True)
class _Prototype:
    background: np.ndarray  # float64 of shape (3,)
    parts: tuple[_Part, ...]


def _outline(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A closed outline of shape (P, 2) centred at the origin, radius about 1."""
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        ax, ay = rng.uniform(0.5, 1.0, size=2)
        return np.stack([ax * np.cos(t), ay * np.sin(t)], axis=1)
    if kind == "star":
        n = int(rng.integers(4, 8))
        t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.3, 0.6))
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    n = int(rng.integers(3, 7))
    t = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    r = rng.uniform(0.6, 1.0, size=n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _prototype(rng: np.random.Generator) -> _Prototype:
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(_KINDS))
        center = rng.uniform(-0.45, 0.45, size=2)
        if kind == "stroke":
            steps = rng.normal(0, 0.45, size=(int(rng.integers(3, 6)), 2))
            points = np.cumsum(steps, axis=0)
            points = points - points.mean(axis=0) + center
        else:
            points = _outline(kind, rng) * rng.uniform(0.25, 0.55) + center
        parts.append(
            _Part(
                kind=kind,
                points=points,
                width=float(rng.uniform(0.05, 0.12)),
                color=rng.uniform(0, 255, size=3),
                color2=rng.uniform(0, 255, size=3),
                texture=str(rng.choice(_TEXTURES)),
                freq=float(rng.uniform(2.0, 6.0)),
                angle=float(rng.uniform(0, np.pi)),
            )
        )
    return _Prototype(background=rng.uniform(0, 255, size=3), parts=tuple(parts))


def _texture(part: _Part, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean array of shape (H, W): where the texture takes the second colour.

    `u`, `v` are the object coordinates of every pixel, so the pattern moves with the object.
    """
    c, s = np.cos(part.angle), np.sin(part.angle)
    a = (u * c + v * s) * part.freq
    b = (-u * s + v * c) * part.freq
    if part.texture == "stripes":
        return (np.floor(a) % 2) == 1
    if part.texture == "checks":
        return ((np.floor(a) + np.floor(b)) % 2) == 1
    if part.texture == "dots":
        return ((a - np.floor(a) - 0.5) ** 2 + (b - np.floor(b) - 0.5) ** 2) < 0.09
    raise ValueError(f"unknown texture {part.texture!r}")


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates, two arrays of shape (size, size) in (-1, 1)."""
    grid = (np.arange(size) + 0.5) / size * 2 - 1
    gx, gy = np.meshgrid(grid, grid)
    return gx, gy


def _render(proto: _Prototype, size: int, rng: np.random.Generator) -> np.ndarray:
    """One distorted sample of a prototype: uint8 array of shape (size, size, 3)."""
    # The sample's pose: object coordinates -> normalised image coordinates in [-1, 1].
    angle = rng.normal(0, np.deg2rad(20))
    scale = rng.uniform(0.8, 1.2)
    shift = rng.normal(0, 0.08, size=2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale

    def to_pixels(points: np.ndarray) -> list[tuple[float, float]]:
        xy = points @ rot.T + shift
        return [tuple(p) for p in ((xy + 1) * 0.5 * size).tolist()]

    gx, gy = _grid(size)
    # The background is mostly per-sample: a class must be recognised by its object, not by a
    # flat colour that a pixel average would pick up.
    background = 0.3 * proto.background + 0.7 * rng.uniform(0, 255, size=3)
    slope = rng.normal(0, 25, size=3)
    ramp = gx * np.cos(angle * 3) + gy * np.sin(angle * 3)
    canvas = (background + ramp[:, :, None] * slope).astype(np.float32)

    # Clutter and parts are each drawn into one index layer (value k + 1 for shape k), so a
    # later shape covers an earlier one exactly as painting them in turn would.
    clutter_colors = rng.uniform(0, 255, size=(int(rng.integers(2, 6)), 3))
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    for k in range(len(clutter_colors)):
        x0, y0 = rng.uniform(0, size, size=2)
        r = rng.uniform(0.03, 0.1) * size
        if rng.random() < 0.5:
            d.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=k + 1)
        else:
            x1, y1 = rng.uniform(0, size, size=2)
            d.line([x0, y0, x1, y1], fill=k + 1, width=max(1, round(size / 60)))
    index = np.asarray(layer)
    painted = index > 0
    canvas[painted] = clutter_colors[index[painted] - 1]

    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    colors = []
    for k, part in enumerate(proto.parts):
        jitter = rng.normal(0, 0.04, size=part.points.shape)
        pts = to_pixels(part.points + jitter)
        if part.kind == "stroke":
            d.line(pts, fill=k + 1, width=max(1, round(part.width * size * scale)), joint="curve")
        else:
            d.polygon(pts, fill=k + 1)
        colors.append(
            (
                np.clip(part.color + rng.normal(0, 12, size=3), 0, 255),
                np.clip(part.color2 + rng.normal(0, 12, size=3), 0, 255),
            )
        )
    index = np.asarray(layer)
    uv = None
    for k, (part, (color, color2)) in enumerate(zip(proto.parts, colors, strict=True)):
        mask = index == k + 1
        if part.texture == "solid":
            canvas[mask] = color
            continue
        if uv is None:
            # Inverse pose, so textures are sampled in object coordinates.
            inv = np.linalg.inv(rot)
            ox, oy = gx - shift[0], gy - shift[1]
            uv = (inv[0, 0] * ox + inv[0, 1] * oy, inv[1, 0] * ox + inv[1, 1] * oy)
        second = _texture(part, *uv)
        canvas[mask & ~second] = color
        canvas[mask & second] = color2

    canvas += rng.standard_normal(size=canvas.shape, dtype=np.float32) * np.float32(6)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def make_synthetic_split(
    num_classes: int,
    per_class: int,
    size: int = 84,
    seed: int = 0,
    color_mode: str = "RGB",
    name: str = "synthetic",
    first_class: int = 0,
) -> ImageSplit:
    """Generate a labelled split of procedurally drawn classes.

    Args:
        num_classes: number of classes.
        per_class: images per class.
        size: image height and width in pixels (at least 8).
        seed: dataset seed; class `c` is the prototype of (seed, first_class + c).
        color_mode: "RGB" or "L" (luminance of the RGB rendering).
        name: split name used in messages and fingerprints.
        first_class: global id of the first class. Splits of one dataset use disjoint ranges,
            so their prototypes never coincide (see `synthetic_splits`).

    Returns:
        ImageSplit with `arrays` of shape (num_classes * per_class, size, size, 3) for RGB or
        (num_classes * per_class, size, size) for L, uint8, class-major, and class names
        "synth0000", "synth0001", ... after the global class id.
    """
    if num_classes < 1 or per_class < 1:
        raise DatasetError(
            f"synthetic: num_classes={num_classes}, per_class={per_class}: both must be >= 1"
        )
    if size < 8:
        raise DatasetError(f"synthetic: size={size} is too small; use 8 or more pixels")
    if color_mode not in ("RGB", "L"):
        raise DatasetError(f"synthetic: color_mode={color_mode!r}; use 'RGB' or 'L'")
    shape = (size, size, 3) if color_mode == "RGB" else (size, size)
    arrays = np.empty((num_classes * per_class, *shape), dtype=np.uint8)
    for c in range(num_classes):
        gid = first_class + c
        proto = _prototype(np.random.default_rng([seed, gid, 0]))
        for i in range(per_class):
            rgb = _render(proto, size, np.random.default_rng([seed, gid, 1, i]))
            if color_mode == "L":
                # ITU-R 601-2 luma, as Pillow's convert("L").
                rgb = np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
            arrays[c * per_class + i] = rgb
    return ImageSplit(
        name=name,
        class_names=[f"synth{first_class + c:04d}" for c in range(num_classes)],
        labels=np.repeat(np.arange(num_classes), per_class),
        arrays=arrays,
        color_mode=color_mode,
    )


def synthetic_split(
    split: str,
    seed: int = 0,
    size: int = 84,
    train_classes: int = DEFAULT_CLASSES["train"],
    val_classes: int = DEFAULT_CLASSES["val"],
    test_classes: int = DEFAULT_CLASSES["test"],
    per_class: int = 60,
    color_mode: str = "RGB",
) -> ImageSplit:
    """One split of `synthetic_splits` (same pixels), without generating the other two."""
    sizes = {"train": train_classes, "val": val_classes, "test": test_classes}
    if split not in sizes:
        raise DatasetError(f"synthetic: split={split!r}; use train, val or test")
    for name, n in sizes.items():
        if n < 0:
            raise DatasetError(f"synthetic: {name}_classes={n} must be >= 0")
    if sizes[split] == 0:
        raise DatasetError(f"synthetic: {split}_classes=0; ask for at least one {split} class")
    names = list(sizes)
    first = sum(sizes[n] for n in names[: names.index(split)])
    return make_synthetic_split(
        sizes[split], per_class, size, seed, color_mode, f"synthetic/{split}", first_class=first
    )


def synthetic_splits(
    seed: int = 0,
    size: int = 84,
    train_classes: int = DEFAULT_CLASSES["train"],
    val_classes: int = DEFAULT_CLASSES["val"],
    test_classes: int = DEFAULT_CLASSES["test"],
    per_class: int = 60,
    color_mode: str = "RGB",
) -> dict[str, ImageSplit]:
    """Train / val / test splits with disjoint class prototypes.

    Returns:
        {"train": ..., "val": ..., "test": ...}, named "synthetic/<split>"; a split with 0
        classes is left out.
    """
    sizes = {"train": train_classes, "val": val_classes, "test": test_classes}
    for split, n in sizes.items():
        if n < 0:
            raise DatasetError(f"synthetic: {split}_classes={n} must be >= 0")
    out: dict[str, ImageSplit] = {}
    first = 0
    for split, n in sizes.items():
        if n:
            out[split] = make_synthetic_split(
                n, per_class, size, seed, color_mode, f"synthetic/{split}", first_class=first
            )
        first += n
    return out


def write_class_folders(split: ImageSplit, root: str | Path, force: bool = False) -> Path:
    """Write an in-memory split as PNGs in the class-folder layout `<root>/<class>/<i>.png`.

    The folder is built under a temporary name and renamed into place, so a crash never leaves
    half a dataset. Refuses an existing `root` unless `force`.

    Returns:
        `root`.
    """
    if split.arrays is None:
        raise DatasetError(f"{split.name}: write_class_folders needs an in-memory (arrays) split")
    root = Path(root)
    with staged_dir(root, force=force) as stage:
        for c, indices in enumerate(split.indices_by_class()):
            folder = stage / split.class_names[c]
            folder.mkdir()
            for k, i in enumerate(indices):
                buf = io.BytesIO()
                Image.fromarray(split.arrays[i]).save(buf, format="PNG")
                (folder / f"{k:04d}.png").write_bytes(buf.getvalue())
        os.chmod(stage, 0o755)  # the staging folder is created private (0700)
    return root
