"""Issue 19's lease, the development-machine side: stage what the device calls carry.

    python3 scripts/gpu/joint/prepare.py data [--shards DIR] [--dest DEST]
        pack miniimagenet/train into tar shards (`mtl-edge data pack`, 60 MiB each: 4 shards),
        or take the shard folder DIR; tar them, compress with xz, cut into parts of at most
        plan.py's part limit (call_mib - repo_mib_max - margin_mib of scripts/gpu/lease.json:
        39 MiB) and write part n (+ MANIFEST.json) into DEST/call<n>/
    python3 scripts/gpu/joint/prepare.py check [--dest DEST]     what each call carries

DEST defaults to plan.json's carry_dir (.device/joint, ignored by git) in the repository root;
run it in the checkout the device calls are sent from. The shards travel compressed because
the tar format spends 1 KiB of headers and padding on every image's class entry: xz takes the
4 shards (217.4 MiB) to 118.7 MiB, 4 parts (3 x 39 MiB and 1.7 MiB) instead of 6. The device
checks every part's sha256 as it arrives, joins the parts, checks the sha256 of the whole and
of every shard (index.json), and unpacks.
Nothing here is committed: data stays out of git.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from plan import MIB, layout, load_plan, part_limit  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
PAYLOAD = "joint-data.tar.xz"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_shards(plan: dict[str, Any], work: Path, data_root: Path | None = None) -> Path:
    """`mtl-edge data pack` of the plan's split into work/<split> (kept: a rerun reuses it)."""
    split = plan["data"]["split"]
    out = work / split
    if (out / "index.json").is_file():
        return out
    root = data_root or _data_root() / plan["data"]["source"]
    cmd = [sys.executable, "-m", "mtl_edge.cli", "data", "pack", str(root), "--split", split,
           "--out", str(out), "--max-mib", str(plan["data"]["shard_max_mib"])]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out


def _data_root() -> Path:
    from mtl_edge.data.registry import data_root

    return data_root()


def payload(shards: Path, preset: int) -> bytes:
    """The shard folder (index.json and the shards it lists) as one xz-compressed tar whose
    members sit under the split's name."""
    index = json.loads((shards / "index.json").read_text())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ["index.json", *(s["file"] for s in index["shards"])]:
            tar.add(shards / name, arcname=f"{shards.name}/{name}")
    return lzma.compress(buf.getvalue(), preset=preset)


def stage(
    plan: dict[str, Any], shards: Path, dest: Path, part_bytes: int | None = None
) -> dict[str, Any]:
    """Compress the shards, cut the payload into parts of `part_bytes` (default: the plan's
    part limit; the dry run passes less) and write part n with the manifest into
    dest/call<n>/ (`plan.layout`: one part per call); the manifest."""
    data = payload(shards, plan["data"]["xz_preset"])
    limit = part_limit(plan)
    if part_bytes is not None and part_bytes > limit:
        raise SystemExit(f"prepare: parts of {part_bytes / MIB:.1f} MiB pass {limit / MIB} MiB")
    calls = layout(plan, len(data), part_bytes)
    if part_bytes is None and len(calls) != len(layout(plan)):
        raise SystemExit(
            f"prepare: {len(data)} bytes of data make {len(calls)} parts, plan.json's "
            f"data.payload_bytes {len(layout(plan))}: set it to {len(data)} (the calls and the "
            "compute deadline follow from it)"
        )
    starts = [sum(c["parts"][0][1] for c in calls[:i]) for i in range(len(calls))]
    parts = [data[a : a + c["parts"][0][1]] for a, c in zip(starts, calls, strict=True)]
    index = json.loads((shards / "index.json").read_text())
    manifest = {
        "payload": PAYLOAD,
        "split": shards.name,
        "bytes": len(data),
        "sha256": sha256_bytes(data),
        "shards": len(index["shards"]),
        "images": index["num_samples"],
        "parts": [
            {"file": f"joint-data.part{i:02d}", "bytes": len(p), "sha256": sha256_bytes(p)}
            for i, p in enumerate(parts, 1)
        ],
    }
    for old in dest.glob("call*/joint-data.part*"):  # a former layout's parts
        old.unlink()
    for call, part in zip(calls, parts, strict=True):
        folder = dest / f"call{call['n']}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"joint-data.part{call['n']:02d}").write_bytes(part)
        (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def repo_bytes(repo: Path = REPO) -> int:
    """Bytes of the files git tracks or sees untracked and not ignored (what a call sends)."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [repo / f.decode() for f in listed if f]
    return sum(p.stat().st_size for p in paths if p.is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def check(plan: dict[str, Any], dest: Path) -> list[str]:
    """One line per call: what it sends (the working tree now, and at the budget the plan
    counts, + its carried folder), and OVER when the budgeted size passes the call limit."""
    repo, lease = repo_bytes(), plan["lease"]
    budget, limit = lease["repo_mib_max"] * MIB, lease["call_mib"] * MIB
    lines = [f"working tree: {repo / MIB:.2f} MiB now (every plan budgets {budget / MIB:.0f} MiB)"]
    for call in layout(plan):
        carried = sum(folder_bytes(dest / Path(c).name) for c in call["carry"])
        size = max(repo, budget) + carried
        flag = "" if size <= limit else f"  OVER {lease['call_mib']} MiB"
        lines.append(
            f"call {call['n']}: {carried / MIB:.1f} MiB carried, {size / MIB:.1f} MiB with the "
            f"tree ({', '.join(call['carry'])}){flag}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    plan = load_plan()
    ap = argparse.ArgumentParser(description="Stage issue 19's lease (see the docstring).")
    ap.add_argument("what", choices=("data", "check"))
    ap.add_argument("--shards", type=Path, help="an existing shard folder (else packed)")
    ap.add_argument("--data", type=Path, help="the miniImageNet folder (else the data root's)")
    ap.add_argument("--dest", type=Path, default=REPO / plan["carry_dir"])
    args = ap.parse_args(argv)
    if args.what == "data":
        shards = args.shards or pack_shards(plan, args.dest / "work", args.data)
        m = stage(plan, shards, args.dest)
        print(f"prepare: {m['shards']} shards of {m['images']} images -> {m['bytes'] / MIB:.1f} "
              f"MiB xz in {len(m['parts'])} parts, sha256 {m['sha256'][:16]}...")  # fmt: skip
    print("\n".join(check(plan, args.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
