"""Issue 20's plan, the development-machine side: fetch, split and stage what the calls carry.

    python3 scripts/gpu/inference/prepare.py wheel  [--dest DIR]   download onnxruntime-gpu,
                                                                   check its sha256
    python3 scripts/gpu/inference/prepare.py bundle (--make | --from BUNDLE) [--dest DIR]
                                                                   stage the FP32 bundle, tar it
    python3 scripts/gpu/inference/prepare.py stage  [--dest DIR]   cut both into parts, one
                                                                   folder per call
    python3 scripts/gpu/inference/prepare.py check  [--dest DIR]   sizes of every call
    python3 scripts/gpu/inference/prepare.py collect COMPUTE_FILES  results -> bench/results/

DIR defaults to plan.json's carry_dir (.device/ort-gpu, ignored by git) in the repository root;
run it in the checkout the device calls are made from (the device tool sends that checkout).
Call n carries DIR/call<n>/: the parts plan.py's layout gives it (`plan.py calls`) and a
MANIFEST.json with every payload's and part's sha256 (parts.py). Nothing here is committed:
wheels and bundles stay out of git.

The wheel is fetched with pip's ordinary client, for CPython 3.12 on manylinux_2_28 x86_64
(the GPU machine's Python), without its dependencies: flatbuffers, numpy, packaging and
protobuf are already on the GPU machine's image (KINDS.md), and the CUDA / cuDNN libraries
come from its PyTorch (`mtl_edge.backends.cuda_libs`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import parts  # noqa: E402
from plan import MIB, layout, load_plan, part_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def download(plan: dict[str, Any], into: Path) -> Path:
    """pip download the plan's wheel into `into` (kept: a second run reuses it); sha-checked."""
    wheel = plan["wheel"]
    path = into / wheel["file"]
    if not path.is_file():
        into.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", *wheel["pip_download"], "-d", str(into)]
        subprocess.run([*cmd, wheel["requirement"]], check=True)
    got = parts.sha256_file(path)
    if got != wheel["sha256"]:
        raise SystemExit(f"prepare: {path}: sha256 {got} is not the plan's {wheel['sha256']}")
    return path


def stage(plan: dict[str, Any], payloads: dict[str, Path], dest: Path) -> dict[str, Any]:
    """Cut `payloads` ({"wheel": file, "bundle": tar}) into parts and write each into the
    dest/call<n>/ the layout of their real sizes gives it, with MANIFEST.json; the manifest.

    Raises:
        SystemExit: the real sizes lay the parts out in other calls than plan.json's sizes
            (the documented commands would be wrong): the figure to put in plan.json.
    """
    sizes = {name: path.stat().st_size for name, path in payloads.items()}
    calls = layout(plan, sizes)
    planned = [[p[:2] for p in c["parts"]] for c in layout(plan)]
    if [[p[:2] for p in c["parts"]] for c in calls] != planned:
        raise SystemExit(
            f"prepare: the staged sizes {sizes} give other calls than plan.json's: set "
            "wheel.bytes / bundle.tar_bytes there to them and update docs/gpu-inference.md"
        )
    cap = part_bytes(plan)
    manifest = {"payloads": [parts.describe(n, p, cap) for n, p in payloads.items()]}
    entries = {e["name"]: e for e in manifest["payloads"]}
    for old in dest.glob("call*"):
        shutil.rmtree(old)
    for call in calls:
        folder = dest / Path(call["carry"][0]).name
        folder.mkdir(parents=True)
        for name, index, _ in call["parts"]:
            parts.write_part(payloads[name], entries[name], index, folder)
        (folder / parts.MANIFEST).write_text(json.dumps(manifest, indent=1))
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
    into dest/bundle/, check that the copy loads, and pack it into dest/bundle.tar."""
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
    return parts.pack(out, dest / "bundle.tar")


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
    """One line per staged call: what it sends now and with the tree at its budget, and
    problems (a call over call_mib, a tree over repo_mib_max)."""
    lease, tree = plan["lease"], repo_bytes()
    budget = lease["repo_mib_max"] * MIB
    lines = [f"tree: {tree / MIB:.1f} MiB of its {lease['repo_mib_max']} MiB budget"]
    if tree > budget:
        lines[0] += "  OVER: the calls below would not fit"
    for call in layout(plan):
        carried = sum(folder_bytes(dest / Path(c).name) for c in call["carry"])
        worst = max(tree, budget) + carried
        flag = "" if worst <= lease["call_mib"] * MIB else f"  OVER {lease['call_mib']} MiB"
        lines.append(
            f"call {call['n']}: {(tree + carried) / MIB:.1f} MiB now, {worst / MIB:.1f} MiB "
            f"with the tree at its budget ({', '.join(call['carry'])}){flag}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    plan = load_plan()
    ap = argparse.ArgumentParser(description="Stage issue 20's GPU plan (see the docstring).")
    ap.add_argument("what", choices=("wheel", "bundle", "stage", "check", "collect"))
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--dest", type=Path, default=REPO / plan["carry_dir"])
    ap.add_argument("--make", action="store_true", help="export the plan's random bundle")
    ap.add_argument("--from", dest="src", type=Path, help="an existing bundle to stage")
    args = ap.parse_args(argv)
    if args.what == "wheel":
        wheel = download(plan, args.dest / "wheel")
        print(f"prepare: {wheel.name}: {wheel.stat().st_size} bytes, sha256 ok")
    elif args.what == "bundle":
        if not (args.make or args.src):
            ap.error("bundle needs --make or --from BUNDLE")
        src = args.src or make_bundle(plan, args.dest / "work")
        tar = stage_bundle(src, args.dest)
        print(f"prepare: staged {tar} ({tar.stat().st_size} bytes)")
    elif args.what == "stage":
        payloads = {"wheel": args.dest / "wheel" / plan["wheel"]["file"]}
        payloads["bundle"] = args.dest / "bundle.tar"
        for name, path in payloads.items():
            if not path.is_file():
                ap.error(f"{path}: missing; run `prepare.py {name}` first")
        manifest = stage(plan, payloads, args.dest)
        for entry in manifest["payloads"]:
            print(f"prepare: {entry['file']}: {entry['bytes']} bytes, sha256 {entry['sha256']}, "
                  f"{len(entry['parts'])} parts")  # fmt: skip
        print("\n".join(check(plan, args.dest)))
    elif args.what == "check":
        print("\n".join(check(plan, args.dest)))
    else:
        from collect import collect

        print(f"prepare: results in {collect(plan, *args.paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
