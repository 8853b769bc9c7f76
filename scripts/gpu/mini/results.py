"""The compute command's results through $OUT: a run folder packed whole into parts < 16 MiB,
and restored here with every file as it was (bundles keep their .npy files; checkpoints load).

Packing (on the GPU machine, at the end of the compute command or when its deadline comes):

- every checkpoint (*.pt) of the run is read and its tensors go into one store, each distinct
  tensor once (by content): meta-transfer freezes the conv weights and BN statistics, so the
  pre-training checkpoint and every meta snapshot share them and only the SS parameters and
  the FC initialisation differ. "Weights only": the optimizer state (for resuming) is dropped.
  Tensors stay FP32 unless the parts would not fit `max_parts`; then floating tensors are
  stored as bf16 (RESULTS.json "dtype" says which);
- the store (weights.pt) and every other file of the run (JSON, logs, metrics, PNG, .npy of
  a bundle...) go into one deterministic tar, cut into parts of `part_mib`;
- RESULTS.json lists the parts with their sha256, the tar's sha256 and the checkpoints.

Restoring (here): join and check the parts, extract, and write each checkpoint back from the
store (`mtl_edge.train.checkpoint.save_checkpoint`), so `load_checkpoint` reads it.

    python3 results.py pack RUN OUT [--part-mib 15] [--max-parts 6]
    python3 results.py restore FILES_AT DEST
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch

RESULTS = "RESULTS.json"
STORE = "weights.pt"
DROPPED = ("optimizer", "scheduler")  # resume-only state: not needed after the lease
MIB = 1 << 20


class ResultsError(Exception):
    """Parts that are missing or do not match RESULTS.json."""


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _strip(value: Any, tensors: dict[str, torch.Tensor], bf16: bool) -> Any:
    """`value` with every tensor replaced by {"$tensor": digest} (stored once in `tensors`)."""
    if torch.is_tensor(value):
        t = value.detach().cpu()
        key = _digest(t)
        if key not in tensors:
            tensors[key] = t.to(torch.bfloat16) if bf16 and t.is_floating_point() else t
        return {"$tensor": key, "dtype": str(t.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {k: _strip(v, tensors, bf16) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_strip(v, tensors, bf16) for v in value)
    return value


def _fill(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "$tensor" in value:
        return tensors[value["$tensor"]].to(getattr(torch, value["dtype"]))
    if isinstance(value, dict):
        return {k: _fill(v, tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_fill(v, tensors) for v in value)
    return value


def weight_store(run: Path, bf16: bool) -> bytes:
    """torch.save bytes of {"tensors": {digest: tensor}, "checkpoints": {relpath: stripped}}."""
    tensors: dict[str, torch.Tensor] = {}
    ckpts = {}
    for path in sorted(run.rglob("*.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        ckpt = {k: v for k, v in ckpt.items() if k not in DROPPED}
        ckpts[path.relative_to(run).as_posix()] = _strip(ckpt, tensors, bf16)
    buf = io.BytesIO()
    torch.save({"tensors": tensors, "checkpoints": ckpts}, buf)
    return buf.getvalue()


def _tar(run: Path, store: bytes) -> bytes:
    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = plain(tarfile.TarInfo(STORE))
        info.size = len(store)
        tar.addfile(info, io.BytesIO(store))
        for path in sorted(p for p in run.rglob("*") if p.is_file() and p.suffix != ".pt"):
            tar.add(path, arcname=f"run/{path.relative_to(run).as_posix()}", filter=plain)
    return buf.getvalue()


def pack(run: Path, out: Path, part_mib: float = 15, max_parts: int = 6) -> dict[str, Any]:
    """Pack `run` into `out`/results.tar.partNN + RESULTS.json; the RESULTS.json content."""
    part = int(part_mib * MIB)
    data, dtype = b"", "fp32"
    for dtype in ("fp32", "bf16"):
        data = _tar(run, weight_store(run, bf16=dtype == "bf16"))
        if -(-len(data) // part) <= max_parts:
            break
    n = -(-len(data) // part)
    if n > max_parts:
        raise ResultsError(
            f"{n} parts of {part_mib} MiB even in bf16: over the {max_parts} allowed"
        )
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(n):
        chunk = data[i * part : (i + 1) * part]
        name = f"results.tar.part{i + 1:02d}"
        (out / name).write_bytes(chunk)
        parts.append(
            {"file": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()}
        )
    record = {
        "schema": "mtl-edge.mini-results",
        "dtype": dtype,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "parts": parts,
        "checkpoints": sorted(p.relative_to(run).as_posix() for p in run.rglob("*.pt")),
    }
    (out / RESULTS).write_text(json.dumps(record, indent=1))
    return record


def restore(files_at: Path, dest: Path) -> dict[str, Any]:
    """Join the parts in `files_at`, check them, and rebuild the run folder in `dest`/run
    (checkpoints written back from the store); RESULTS.json's content."""
    from mtl_edge.train.checkpoint import save_checkpoint

    if not (files_at / RESULTS).is_file():
        raise ResultsError(
            f"{files_at / RESULTS}: missing; pass the folder the device call returned"
        )
    record = json.loads((files_at / RESULTS).read_text())
    chunks = []
    for p in record["parts"]:
        path = files_at / p["file"]
        if not path.is_file():
            raise ResultsError(f"{path}: missing part; fetch the call's files again")
        chunk = path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != p["sha256"]:
            raise ResultsError(f"{path}: sha256 differs from {RESULTS}")
        chunks.append(chunk)
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ResultsError(f"{files_at}: joined parts' sha256 differs from {RESULTS}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    store = torch.load(dest / STORE, map_location="cpu", weights_only=False)
    for rel, ckpt in store["checkpoints"].items():
        save_checkpoint(dest / "run" / rel, _fill(ckpt, store["tensors"]))
    (dest / STORE).unlink()
    shutil.copyfile(files_at / RESULTS, dest / RESULTS)
    return record


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--part-mib", type=float, default=15)
    p.add_argument("--max-parts", type=int, default=6)
    r = sub.add_parser("restore")
    r.add_argument("files_at", type=Path)
    r.add_argument("dest", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            rec = pack(args.run, args.out, args.part_mib, args.max_parts)
            size = f"{rec['bytes'] / MIB:.1f} MiB"
            print(f"results: {len(rec['parts'])} part(s), {size}, {rec['dtype']}")
        else:
            rec = restore(args.files_at, args.dest)
            print(f"restored {len(rec['checkpoints'])} checkpoint(s) into {args.dest / 'run'}")
    except (ResultsError, OSError, tarfile.TarError) as e:
        print(f"results: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
