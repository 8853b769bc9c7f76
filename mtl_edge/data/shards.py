"""A split packed into tar shards (WebDataset-style), and read back with checksums.

Layout of a shard folder:

    index.json            schema, split name, colour mode, class names, and per shard its
                          file name, sample count, byte size and sha256
    <prefix>-00000.tar    per sample: `<key>.<ext>` (the original image file's bytes, never
    <prefix>-00001.tar    re-encoded), `<key>.cls` (the class index, ASCII decimal) and, for
    ...                   rotated Omniglot classes, `<key>.rot` (degrees)

Each shard stays under a size limit (60 MiB by default: what one command may send to the GPU
machine), so shards can travel one at a time. Keys are the sample's index in the split, zero
padded, so the order in the shards is the split's order. Packing builds the folder under a
temporary name and renames it into place; reading checks every shard's sha256 first and names
the shard that does not match.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mtl_edge.atomicio import atomic_write_json, sha256_file, staged_dir
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError
from mtl_edge.jsonfile import read_json_document

SHARDS_SCHEMA = "mtl-edge.shards"
SHARDS_VERSION = 1
INDEX = "index.json"
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads every archive to a multiple of this


def _encoded(split: ImageSplit, i: int) -> tuple[bytes, str]:
    """The sample's file bytes and extension: the original file, or a lossless PNG of an array."""
    if split.paths is not None:
        path = split.paths[i]
        try:
            return path.read_bytes(), (path.suffix.lower().lstrip(".") or "img")
        except OSError as e:
            raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    if split.blobs is not None:
        blob = split.blobs[i]
        return blob, ("png" if blob[:8] == b"\x89PNG\r\n\x1a\n" else "jpg")
    buf = io.BytesIO()
    Image.fromarray(split.arrays[i]).save(buf, format="PNG")  # type: ignore[index]
    return buf.getvalue(), "png"


def _member_size(n_bytes: int) -> int:
    """Bytes a member of `n_bytes` takes in a tar: header block plus padded data."""
    return _BLOCK + -(-n_bytes // _BLOCK) * _BLOCK


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # byte-identical shards for identical inputs
    tar.addfile(info, io.BytesIO(data))


def pack_split(
    split: ImageSplit,
    out: str | Path,
    max_mib: float = 60.0,
    prefix: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write `split` as tar shards of at most `max_mib` MiB each, plus `index.json`.

    Args:
        split: any ImageSplit; files and blobs are stored byte for byte, arrays as PNG.
        out: the shard folder to create (refused if it exists, unless `force`).
        max_mib: size limit of one shard file in MiB (2**20 bytes).
        prefix: shard file name prefix (default: the split name's last part).

    Returns:
        The index that was written.
    """
    if max_mib <= 0:
        raise DatasetError(f"--max-mib={max_mib}: must be positive")
    if len(split) == 0:
        raise DatasetError(f"{split.name}: has no images to pack")
    limit = int(max_mib * 2**20)
    prefix = prefix or split.name.rstrip("/").split("/")[-1] or "shard"
    key_width = max(6, len(str(len(split) - 1)))
    shards: list[dict[str, Any]] = []
    with staged_dir(out, force=force) as stage:

        def write(batch: list[list[tuple[str, bytes]]]) -> None:
            """One shard of the samples in `batch` (each a list of (member name, bytes))."""
            path = stage / f"{prefix}-{len(shards):05d}.tar"
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for members in batch:
                    for name, data in members:
                        _add(tar, name, data)
            shards.append(
                {
                    "file": path.name,
                    "samples": len(batch),
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
            )

        batch: list[list[tuple[str, bytes]]] = []
        used = 0
        for i in range(len(split)):
            data, ext = _encoded(split, i)
            key = f"{i:0{key_width}d}"
            members = [(f"{key}.{ext}", data), (f"{key}.cls", str(int(split.labels[i])).encode())]
            if split.rotations is not None:
                members.append((f"{key}.rot", str(int(split.rotations[i])).encode()))
            need = sum(_member_size(len(d)) for _, d in members)
            # A tar ends with two zero blocks and is padded to a whole record.
            if need + 2 * _BLOCK > limit - _RECORD:
                raise DatasetError(
                    f"{split.describe(i)}: {len(data)} bytes does not fit in a "
                    f"{max_mib} MiB shard; raise --max-mib"
                )
            if batch and used + need + 2 * _BLOCK > limit - _RECORD:
                write(batch)
                batch, used = [], 0
            batch.append(members)
            used += need
        write(batch)
        index = {
            "schema": SHARDS_SCHEMA,
            "version": SHARDS_VERSION,
            "name": split.name,
            "color_mode": split.color_mode,
            "class_names": list(split.class_names),
            "num_samples": len(split),
            "rotations": split.rotations is not None,
            "shards": shards,
        }
        atomic_write_json(stage / INDEX, index)
        # The staging folder and temp files are private (0700 / 0600); a dataset is not.
        os.chmod(stage / INDEX, 0o644)
        os.chmod(stage, 0o755)
    return index


def read_index(folder: str | Path) -> dict[str, Any]:
    """Load and check `<folder>/index.json`."""
    path = Path(folder) / INDEX
    index = read_json_document(
        path,
        DatasetError,
        what="shard index",
        schema=SHARDS_SCHEMA,
        version=SHARDS_VERSION,
        missing="no such file; pass a folder written by `data pack`",
        fix="re-pack the split",
    )
    for key in ("class_names", "shards", "num_samples"):
        if key not in index:
            raise DatasetError(f"{path}: has no {key!r}; re-pack the split")
    return index


def check_shard(folder: Path, entry: dict[str, Any]) -> Path:
    """Raise DatasetError naming the shard unless it exists and its sha256 matches."""
    path = folder / entry["file"]
    if not path.is_file():
        raise DatasetError(f"{path}: shard listed in {INDEX} is missing; copy it again")
    if sha256_file(path) != entry["sha256"]:
        raise DatasetError(
            f"{path}: sha256 differs from {INDEX} (corrupt or incomplete copy); copy it again"
        )
    return path


def read_tar_members(path: Path, n_classes: int) -> list[tuple[int, bytes, int, int | None]]:
    """Samples of one shard as (key, image bytes, class, rotation or None), in key order."""
    samples: dict[int, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                stem, _, ext = m.name.partition(".")
                f = tar.extractfile(m)
                assert f is not None
                samples.setdefault(int(stem), {})[ext] = f.read()
    except (tarfile.TarError, ValueError, OSError) as e:
        raise DatasetError(f"{path}: not a readable shard ({e}); re-pack it") from None
    out: list[tuple[int, bytes, int, int | None]] = []
    for key in sorted(samples):
        parts = samples[key]
        images = [e for e in parts if e not in ("cls", "rot")]
        if "cls" not in parts or len(images) != 1:
            raise DatasetError(f"{path}: sample {key} lacks its image or .cls entry; re-pack it")
        label = int(parts["cls"])
        if not 0 <= label < n_classes:
            raise DatasetError(f"{path}: sample {key} has class {label}, not in 0..{n_classes - 1}")
        rot = int(parts["rot"]) if "rot" in parts else None
        out.append((key, parts[images[0]], label, rot))
    return out


def read_shards(
    folder: str | Path, verify: bool = True, color_mode: str | None = None
) -> ImageSplit:
    """Read a shard folder back into an ImageSplit holding the image bytes as `blobs`.

    Args:
        folder: a folder written by `pack_split`.
        verify: check each shard's sha256 against the index first (refuses a corrupt one).
        color_mode: override the colour mode recorded in the index.
    """
    folder = Path(folder)
    index = read_index(folder)
    class_names = [str(c) for c in index["class_names"]]
    blobs: list[bytes] = []
    labels: list[int] = []
    rots: list[int] = []
    for entry in index["shards"]:
        path = check_shard(folder, entry) if verify else folder / entry["file"]
        samples = read_tar_members(path, len(class_names))
        if len(samples) != entry.get("samples", len(samples)):
            raise DatasetError(
                f"{path}: holds {len(samples)} samples, {INDEX} says {entry['samples']}"
            )
        for _, data, label, rot in samples:
            blobs.append(data)
            labels.append(label)
            rots.append(rot or 0)
    if len(blobs) != index["num_samples"]:
        raise DatasetError(
            f"{folder}: shards hold {len(blobs)} samples, {INDEX} says {index['num_samples']}"
        )
    return ImageSplit(
        name=str(index.get("name", folder.name)),
        class_names=class_names,
        labels=np.asarray(labels, dtype=np.int64),
        blobs=blobs,
        rotations=np.asarray(rots, dtype=np.int64) if index.get("rotations") else None,
        color_mode=color_mode or str(index.get("color_mode", "RGB")),
    )


def open_shards(
    root: str | Path, split: str, verify: bool = True, color_mode: str | None = None
) -> ImageSplit:
    """`<root>/<split>/` if it holds an index, else `root` itself if its shards are of `split`."""
    root = Path(root)
    if (root / split / INDEX).is_file():
        return read_shards(root / split, verify=verify, color_mode=color_mode)
    packed = str(read_index(root).get("name", ""))
    if packed.rsplit("/", 1)[-1] != split:
        raise DatasetError(
            f"{root}: holds the shards of {packed!r}, not of split {split!r}; "
            f"pass the folder of the {split} shards"
        )
    return read_shards(root, verify=verify, color_mode=color_mode)
