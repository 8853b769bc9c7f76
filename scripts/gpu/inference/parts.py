"""Payloads carried in parts: split on the development machine, received and joined on the GPU
machine, each part and each joined payload checked against its sha256. Standard library only:
the GPU machine runs it with its own python3, before anything is installed.

    python3 parts.py receive STORE DIR        copy the parts carried in DIR (and its
                                              MANIFEST.json) into STORE/parts; check them
    python3 parts.py join STORE NAME          join payload NAME's parts into STORE/<its file>;
                                              print that path
    python3 parts.py unpack TAR DEST          extract a joined tar payload (the bundle) into DEST

MANIFEST.json (the same in every call folder):
    {"payloads": [{"name", "file", "bytes", "sha256",
                   "parts": [{"file": "<name>.partNN", "bytes", "sha256"}, ...]}, ...]}
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"
BLOCK = 1 << 20


class PartError(Exception):
    """A part or payload that is missing or does not match MANIFEST.json."""


def part_sizes(total: int, part_bytes: int) -> list[int]:
    """Sizes of the parts of a `total`-byte payload cut every `part_bytes` bytes."""
    full, rest = divmod(total, part_bytes)
    return [part_bytes] * full + ([rest] if rest else [])


def _sha_range(path: Path, start: int, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = size
        while left:
            block = f.read(min(BLOCK, left))
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def describe(name: str, path: Path, part_bytes: int) -> dict[str, Any]:
    """The manifest entry of payload `name` (file `path`) cut into parts of `part_bytes`."""
    size = path.stat().st_size
    parts, start = [], 0
    for i, n in enumerate(part_sizes(size, part_bytes), 1):
        parts.append(
            {"file": f"{name}.part{i:02d}", "bytes": n, "sha256": _sha_range(path, start, n)}
        )
        start += n
    return {
        "name": name,
        "file": path.name,
        "bytes": size,
        "sha256": _sha_range(path, 0, size),
        "parts": parts,
    }


def write_part(path: Path, entry: dict[str, Any], index: int, folder: Path) -> Path:
    """Write part `index` (1-based) of payload file `path`, as `entry` describes it, into
    `folder` under its own name; its path."""
    part = entry["parts"][index - 1]
    start = sum(p["bytes"] for p in entry["parts"][: index - 1])
    out, left = folder / part["file"], part["bytes"]
    with path.open("rb") as src, out.open("wb") as dst:
        src.seek(start)
        while left:
            block = src.read(min(BLOCK, left))
            dst.write(block)
            left -= len(block)
    return out


def sha256_file(path: Path) -> str:
    return _sha_range(path, 0, path.stat().st_size)


def receive(store: Path, carried: Path) -> str:
    """Copy `carried`'s MANIFEST.json and parts into `store` (atomically), check the carried
    parts' sha256 (a bad one is removed); a line saying which parts are here."""
    if not (carried / MANIFEST).is_file():
        raise PartError(f"{carried / MANIFEST}: missing; carry the folder prepare.py wrote")
    (store / "parts").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(carried / MANIFEST, store / MANIFEST)
    manifest = json.loads((store / MANIFEST).read_text())
    have = []
    for payload in manifest["payloads"]:
        got = []
        for i, part in enumerate(payload["parts"], 1):
            src, dst = carried / part["file"], store / "parts" / part["file"]
            if src.is_file():
                tmp = dst.with_name(f".{dst.name}.tmp")
                shutil.copyfile(src, tmp)
                if sha256_file(tmp) != part["sha256"]:
                    tmp.unlink()  # never joined; the next call can bring it again
                    raise PartError(
                        f"{part['file']}: sha256 differs from {MANIFEST}; send it again"
                    )
                tmp.replace(dst)
            if dst.is_file():
                got.append(str(i))
        have.append(f"{payload['name']} {','.join(got) or 'none'} of {len(payload['parts'])}")
    return f"parts here: {'; '.join(have)}; sha256 ok"


def join(store: Path, name: str) -> Path:
    """Join payload `name`'s parts from `store/parts` into `store/<file>`, check its sha256."""
    manifest = json.loads((store / MANIFEST).read_text())
    entry = next((p for p in manifest["payloads"] if p["name"] == name), None)
    if entry is None:
        raise PartError(f"{store / MANIFEST}: no payload {name!r}")
    missing = [p["file"] for p in entry["parts"] if not (store / "parts" / p["file"]).is_file()]
    if missing:
        raise PartError(
            f"missing {', '.join(missing)} (a fresh machine?): run the chain of calls again "
            "from call 1"
        )
    out, h = store / entry["file"], hashlib.sha256()
    with out.open("wb") as dst:
        for p in entry["parts"]:
            with (store / "parts" / p["file"]).open("rb") as src:
                while block := src.read(BLOCK):
                    h.update(block)
                    dst.write(block)
    if h.hexdigest() != entry["sha256"] or out.stat().st_size != entry["bytes"]:
        out.unlink()
        raise PartError(f"{entry['file']}: joined sha256 {h.hexdigest()} is not {entry['sha256']}")
    return out


def pack(folder: Path, out: Path) -> Path:
    """A tar of `folder`'s files (sorted, fixed owner and times): the same bytes for the same
    files, so its sha256 names the content."""

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), filter=plain)
    return out


def unpack(tar_path: Path, dest: Path) -> Path:
    """Extract a packed folder into `dest` (replaced); nothing outside it, no links out."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest, filter="data")
    except tarfile.TarError as e:
        raise PartError(f"{tar_path}: {e}") from e
    return dest


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["receive"] and len(argv) == 3:
            print(f"device: {receive(Path(argv[1]), Path(argv[2]))}")
        elif argv[:1] == ["join"] and len(argv) == 3:
            out = join(Path(argv[1]), argv[2])
            print(out)
            print(f"device: {out.name}: {out.stat().st_size} bytes, sha256 ok", file=sys.stderr)
        elif argv[:1] == ["unpack"] and len(argv) == 3:
            print(f"device: unpacked into {unpack(Path(argv[1]), Path(argv[2]))}")
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except PartError as e:
        print(f"device: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
