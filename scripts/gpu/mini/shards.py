"""Compact train shards for the GPU machine: image files' bytes concatenated, with an index.

A tar costs a 512-byte header and up to 511 bytes of padding per file (and one more member per
label): for miniImageNet's 38,400 small JPEGs that is about 30 MB on 154 MiB, one extra call.
Here a shard is two files:

    train-NN.bin    the original files' bytes, back to back (never re-encoded)
    train-NN.npy    one row per file: (offset, length, name) with name "<class>/<file>"

and MANIFEST.json lists every shard with its sha256, files and bytes. Shards are filled in the
split's sorted order up to `cap` bytes (.bin + .npy together), so the last one is the smallest:
the plan sends it in the compute call. On the GPU machine `receive` copies a call's shards into
a store and checks their sha256; `unpack` writes the class folders back (the "folders" reader
reads them as it reads the original).

    python3 shards.py pack SRC_SPLIT_DIR DEST_DIR CAP_BYTES
    python3 shards.py receive STORE CARRIED_DIR
    python3 shards.py unpack STORE DEST_SPLIT_DIR

This file is also imported by prepare.py and the tests; it needs numpy only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "MANIFEST.json"
SCHEMA = "mtl-edge.mini-shards"
NAME_BYTES = 64
ROW = np.dtype([("offset", "<i8"), ("length", "<i4"), ("name", f"S{NAME_BYTES}")])
NPY_HEADER = 256  # at most: numpy's .npy header of this 1-d structured array (192 bytes)


class ShardError(Exception):
    """A shard that is missing, damaged or does not match MANIFEST.json."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def split_files(src: Path) -> list[tuple[str, Path]]:
    """("<class>/<file>", path) of every file of a class-folder split, sorted."""
    files = sorted(
        (f"{c.name}/{f.name}", f)
        for c in src.iterdir()
        if c.is_dir()
        for f in c.iterdir()
        if f.is_file() and not f.name.startswith(".")
    )
    if not files:
        raise ShardError(f"{src}: no class folders with files")
    too_long = [n for n, _ in files if len(n.encode()) > NAME_BYTES]
    if too_long:
        raise ShardError(f"{too_long[0]}: name longer than {NAME_BYTES} bytes")
    return files


def shard_sizes(sizes: list[int], cap: int) -> list[int]:
    """How many files go in each shard: filled in order while .bin + .npy stay within `cap`."""
    counts, n, used = [], 0, NPY_HEADER
    for size in sizes:
        if size + ROW.itemsize + NPY_HEADER > cap:
            raise ShardError(f"a file of {size} bytes does not fit a shard of {cap} bytes")
        if used + size + ROW.itemsize > cap:
            counts.append(n)
            n, used = 0, NPY_HEADER
        n, used = n + 1, used + size + ROW.itemsize
    return [*counts, n]


def pack(src: Path, dest: Path, cap: int, prefix: str = "train") -> dict[str, Any]:
    """Pack the class folders of `src` into shards of at most `cap` bytes in `dest` (made
    afresh); the manifest."""
    files = split_files(src)
    counts = shard_sizes([p.stat().st_size for _, p in files], cap)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, start = [], 0
    for k, count in enumerate(counts):
        rows = np.zeros(count, ROW)
        bin_path, npy_path = tmp / f"{prefix}-{k:02d}.bin", tmp / f"{prefix}-{k:02d}.npy"
        offset = 0
        with bin_path.open("wb") as out:
            for i, (name, path) in enumerate(files[start : start + count]):
                data = path.read_bytes()
                out.write(data)
                rows[i] = (offset, len(data), name.encode())
                offset += len(data)
        np.save(npy_path, rows)
        shards.append(
            {
                "bin": bin_path.name,
                "npy": npy_path.name,
                "files": count,
                "bytes": bin_path.stat().st_size + npy_path.stat().st_size,
                "sha256": {p.name: sha256_file(p) for p in (bin_path, npy_path)},
            }
        )
        start += count
    manifest = {
        "schema": SCHEMA,
        "split": src.name,
        "files": len(files),
        "classes": len({n.split("/")[0] for n, _ in files}),
        "cap": cap,
        "shards": shards,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return manifest


def receive(store: Path, carried: Path) -> str:
    """Copy `carried`'s MANIFEST.json and shard files into `store`, each checked against its
    sha256 (a bad one is not kept); a line saying which shards are here."""
    if not (carried / MANIFEST).is_file():
        raise ShardError(f"{carried / MANIFEST}: missing; carry the folder prepare.py wrote")
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(carried / MANIFEST, store / MANIFEST)
    manifest = json.loads((store / MANIFEST).read_text())
    for shard in manifest["shards"]:
        for name, digest in shard["sha256"].items():
            if not (carried / name).is_file():
                continue
            tmp = store / f".{name}.tmp"
            shutil.copyfile(carried / name, tmp)
            if sha256_file(tmp) != digest:
                tmp.unlink()
                raise ShardError(f"{name}: sha256 differs from {MANIFEST}; send it again")
            os.replace(tmp, store / name)
    here = [i for i, s in enumerate(manifest["shards"]) if _present(store, s)]
    return f"shards here: {len(here)} of {len(manifest['shards'])} ({here}); sha256 ok"


def _present(store: Path, shard: dict[str, Any]) -> bool:
    return all((store / name).is_file() for name in shard["sha256"])


def unpack(store: Path, dest: Path) -> int:
    """Write every shard's files into `dest`/<class>/<file> (made afresh); the file count."""
    manifest = json.loads((store / MANIFEST).read_text())
    missing = [s["bin"] for s in manifest["shards"] if not _present(store, s)]
    if missing:
        raise ShardError(
            f"missing {', '.join(missing)} (a fresh machine?): run the calls again from call 1"
        )
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    for shard in manifest["shards"]:
        rows = np.load(store / shard["npy"])
        data = (store / shard["bin"]).read_bytes()
        for offset, length, name in rows:
            path = tmp / name.decode()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[offset : offset + length])
            n += 1
    if n != manifest["files"]:
        raise ShardError(f"unpacked {n} files, {MANIFEST} says {manifest['files']}")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return n


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["pack"] and len(argv) == 4:
            m = pack(Path(argv[1]), Path(argv[2]), int(argv[3]))
            print(f"shards: {m['files']} files in {len(m['shards'])} shards -> {argv[2]}")
        elif argv[:1] == ["receive"] and len(argv) == 3:
            print(f"device: {receive(Path(argv[1]), Path(argv[2]))}")
        elif argv[:1] == ["unpack"] and len(argv) == 3:
            print(f"device: unpacked {unpack(Path(argv[1]), Path(argv[2]))} files into {argv[2]}")
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (ShardError, OSError) as e:
        print(f"shards: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
