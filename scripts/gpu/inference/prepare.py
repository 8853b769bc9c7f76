"""Issue 20's plan, the development-machine side: fetch, split and stage what the calls carry.

    python3 scripts/gpu/inference/prepare.py wheel  [--dest DIR]   download onnxruntime-gpu,
                                                                   check its sha256, split it
    python3 scripts/gpu/inference/prepare.py bundle (--make | --from BUNDLE) [--dest DIR]
                                                                   stage the FP32 bundle
    python3 scripts/gpu/inference/prepare.py check  [--dest DIR]   sizes of every call
    python3 scripts/gpu/inference/prepare.py collect COMPUTE_FILES  results -> bench/results/

DIR defaults to plan.json's carry_dir (.device/ort-gpu, ignored by git) in the repository root;
run it in the checkout the device calls are made from (the device tool sends that checkout).
Call n carries DIR/call<n>/: the wheel's part n, a MANIFEST.json with the wheel's and every
part's sha256, and in the last call the bundle. Nothing here is committed: wheels and bundles
stay out of git.

The wheel is fetched with pip's ordinary client, for CPython 3.12 on manylinux_2_28 x86_64
(the GPU machine's Python), without its dependencies: flatbuffers, numpy, packaging and
protobuf are already on the GPU machine's image (KINDS.md), and the CUDA / cuDNN libraries
come from its PyTorch (`mtl_edge.backends.cuda_libs`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from plan import MIB, load_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(plan: dict[str, Any], into: Path) -> Path:
    """pip download the plan's wheel into `into` (kept: a second run reuses it); sha-checked."""
    wheel = plan["wheel"]
    path = into / wheel["file"]
    if not path.is_file():
        into.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", *wheel["pip_download"], "-d", str(into)]
        subprocess.run([*cmd, wheel["requirement"]], check=True)
    got = sha256(path)
    if got != wheel["sha256"]:
        raise SystemExit(f"prepare: {path}: sha256 {got} is not the plan's {wheel['sha256']}")
    return path


def split(wheel_path: Path, dest: Path, part_mib: int, calls: list[dict[str, Any]]) -> dict:
    """Write part n of the wheel into dest/call<n>/ (the calls that name parts) with a
    MANIFEST.json of the wheel and all parts; the manifest."""
    data = wheel_path.read_bytes()
    size = part_mib * MIB
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    owners = {p: c["n"] for c in calls for p in c.get("parts", [])}
    if sorted(owners) != list(range(1, len(parts) + 1)):
        raise SystemExit(f"prepare: {len(parts)} parts; the plan's calls carry {sorted(owners)}")
    manifest = {
        "wheel": wheel_path.name,
        "bytes": len(data),
        "sha256": _hex(data),
        "parts": [
            {"file": f"ort-gpu.part{i:02d}", "bytes": len(p), "sha256": _hex(p)}
            for i, p in enumerate(parts, 1)
        ],
    }
    for i, part in enumerate(parts, 1):
        folder = dest / f"call{owners[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("ort-gpu.part*"):
            old.unlink()
        (folder / f"ort-gpu.part{i:02d}").write_bytes(part)
        (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def make_bundle(plan: dict[str, Any], work: Path) -> Path:
    """Export the plan's random-weight backbone (FP32 only) with the project's exporter."""
    from mtl_edge.bench.random_model import write_random_checkpoint
    from mtl_edge.export.api import export_checkpoint
    from mtl_edge.preprocess import Preprocess

    spec = plan["bundle"]
    pre = Preprocess(size=spec["image_size"]).to_dict()
    ckpt = write_random_checkpoint(spec["backbone"], pre, spec["seed"], work / "random.pt")
    bundle, _ = export_checkpoint(ckpt, work / "bundle", force=True, seed=spec["seed"])
    return bundle.root


def stage_bundle(src: Path, dest: Path) -> Path:
    """Copy `src`'s manifest and FP32 file (other variants dropped from the copy's manifest)
    into dest/bundle/, and check that the copy loads."""
    from mtl_edge.bundle import MANIFEST, Bundle

    bundle = Bundle.load(src)
    out = dest / "bundle"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = json.loads((bundle.root / MANIFEST).read_text())
    for name, variant in list(manifest["variants"].items()):
        if name != "fp32":
            manifest["files"].pop(variant["file"], None)
            del manifest["variants"][name]
    for rel in manifest["files"]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.root / rel, out / rel)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    Bundle.load(out)
    return out


def repo_bytes() -> int:
    """Bytes of the files git tracks or sees untracked and not ignored (what a call sends)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [REPO / f.decode() for f in listed if f]
    return sum(p.stat().st_size for p in paths if p.is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def check(plan: dict[str, Any], dest: Path) -> list[str]:
    """One line per call (what it carries), and problems, for the staged folders."""
    repo = repo_bytes()
    lines, limit = [], plan["limits"]["call_mib"] * MIB
    for call in plan["calls"]:
        size = repo + sum(folder_bytes(dest / Path(c).name) for c in call["carry"])
        flag = "" if size <= limit else f"  OVER {plan['limits']['call_mib']} MiB"
        lines.append(f"call {call['n']}: {size / MIB:.1f} MiB ({', '.join(call['carry'])}){flag}")
    return lines


def main(argv: list[str] | None = None) -> int:
    plan = load_plan()
    ap = argparse.ArgumentParser(description="Stage issue 20's GPU plan (see the docstring).")
    ap.add_argument("what", choices=("wheel", "bundle", "check", "collect"))
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--dest", type=Path, default=REPO / plan["carry_dir"])
    ap.add_argument("--make", action="store_true", help="export the plan's random bundle")
    ap.add_argument("--from", dest="src", type=Path, help="an existing bundle to stage")
    args = ap.parse_args(argv)
    last = args.dest / f"call{plan['calls'][-1]['n']}"
    if args.what == "wheel":
        wheel = download(plan, args.dest / "wheel")
        manifest = split(wheel, args.dest, plan["wheel"]["part_mib"], plan["calls"])
        print(f"prepare: {wheel.name}: {manifest['bytes']} bytes, sha256 {manifest['sha256']}, "
              f"{len(manifest['parts'])} parts")  # fmt: skip
    elif args.what == "bundle":
        if not (args.make or args.src):
            ap.error("bundle needs --make or --from BUNDLE")
        src = args.src or make_bundle(plan, args.dest / "work")
        print(f"prepare: staged {stage_bundle(src, last)}")
    elif args.what == "check":
        print("\n".join(check(plan, args.dest)))
    else:
        from collect import collect

        print(f"prepare: results in {collect(plan, *args.paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
