"""Prepare issue 18's device calls on the development machine (docs/gpu-pipeline.md).

    python3 scripts/gpu/mini/prepare.py [--data ROOT] [--dest .device/mini]

Packs ROOT/miniimagenet/train (ROOT: --data, else $MTL_EDGE_DATA, else ../shared/data beside
the repo) into compact shards (shards.py) sized for one call each, and writes one folder per
call, DEST/callN/ (MANIFEST.json + that call's shard), which the call carries. Prints the calls
(plan.py layout with the real shard sizes) as JSON: `carry` and `command` are the `run` tool's
arguments. .device/ is ignored by git.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import plan as plan_mod  # noqa: E402
import shards  # noqa: E402

REPO = HERE.parents[2]


def data_root(option: str | None) -> Path:
    return Path(option or os.environ.get("MTL_EDGE_DATA") or REPO.parent / "shared" / "data")


def prepare(root: Path, dest: Path, cap: int | None = None) -> list[dict]:
    """Shards in dest/shards, call folders dest/callN; the calls with real sizes. `cap`: the
    shard size (default: the plan's part size; smaller in the dry run, for several calls)."""
    plan = plan_mod.load_plan()
    src = root / plan["data"]["split"]
    if not src.is_dir():
        raise shards.ShardError(f"{src}: no such folder; pass --data ROOT or set MTL_EDGE_DATA")
    manifest = shards.pack(src, dest / "shards", cap or plan_mod.part_bytes(plan))
    calls = plan_mod.layout(plan, [s["bytes"] for s in manifest["shards"]])
    for call, shard in zip(calls, manifest["shards"], strict=True):
        folder = (dest / f"call{call['n']}").resolve()
        call["carry"] = [os.path.relpath(folder, REPO)]
        verb = "compute" if call["compute"] else "receive"
        call["command"] = f"{plan_mod.DEVICE_SH} {verb} {call['carry'][0]}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copyfile(dest / "shards" / shards.MANIFEST, folder / shards.MANIFEST)
        for name in (shard["bin"], shard["npy"]):
            os.link(dest / "shards" / name, folder / name)
    return calls


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="Dataset root holding miniimagenet/train.")
    ap.add_argument("--dest", type=Path, default=Path(".device/mini"))
    ap.add_argument("--cap-bytes", type=int, help="Shard size (default: the plan's part size).")
    args = ap.parse_args(argv)
    try:
        calls = prepare(data_root(args.data), args.dest, args.cap_bytes)
    except (shards.ShardError, OSError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(calls, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
