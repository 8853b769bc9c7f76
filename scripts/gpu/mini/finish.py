"""Issue 18's CPU side: everything after the lease, from the files the compute call returned.

    python3 scripts/gpu/mini/finish.py FILES_AT [--data ROOT] [--calls CALLS.json]
        [--out bench/results/<date>-h200-mini] [--work runs/h200-mini] [--recipe R]
        [--set K=V ...]

1. restore: join and check the returned parts, rebuild the run's checkpoints (results.py);
2. choose: every meta-transfer checkpoint that came back (the snapshots and the final one) is
   scored on `--val-episodes` seeded 5-way 1-shot validation episodes with the MTL head; the
   best becomes the model (validation.json says why);
3. the pipeline's metatest, export and bench stages on it (`mtl_edge.workflows.pipeline`, the
   recipe's [eval]: 2000 seeded episodes, 1- and 5-shot, every head on the same episodes; the
   bundle with its INT8 variant; FP32 vs INT8 through the device path, paired);
4. 5 test classes x 5 photos enrolled with `mtl-edge enroll`, their other photos predicted with
   `mtl-edge predict`;
5. OUT: the resolved recipe, the device calls as run (--calls: the JSON the session kept of
   its `run` calls), stage timings and rates (device stages.json, budget.json, steps.json,
   smoke.json), learning curves (PNG), accuracy table (JSON, Markdown), the INT8 comparison,
   the bundle's manifest.json, validation.json, enroll_predict.json.

ROOT is the dataset root holding miniimagenet/ (default $MTL_EDGE_DATA, else ../shared/data).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
import plan as plan_mod  # noqa: E402
import results  # noqa: E402


def choose(recipe: Any, run: Path, episodes: int) -> dict[str, Any]:
    """Score the meta checkpoints of `run` on validation episodes; {"chosen", "scores"}."""
    from dataclasses import replace

    from mtl_edge.train.checkpoint import load_checkpoint
    from mtl_edge.train.metatest import meta_test
    from mtl_edge.train.torchdata import open_recipe_split

    candidates = sorted((run / "meta").glob("snapshot-*.pt")) + [run / "meta" / "best.pt"]
    protocol = replace(recipe.eval, shots=(1,), heads=("mtl",), episodes=episodes)
    scores, split = {}, None
    for path in candidates:
        loaded = load_checkpoint(path)
        split = split or open_recipe_split(
            recipe.data, recipe.data.val_split, loaded.preprocess.color_mode
        )
        got = meta_test(loaded, split, protocol)
        scores[path.name] = got["results"]["1"]["mtl"]
    chosen = max(scores, key=lambda k: scores[k]["mean"])
    assert split is not None
    return {"split": split.name, "episodes": episodes, "chosen": chosen, "scores": scores}


def cpu_stages(recipe: Any, source: str, work: Path, pretrain: Path, meta: Path) -> dict:
    """metatest, export and bench on `meta` (pre-training `pretrain`) in the run folder `work`."""
    from mtl_edge.workflows.pipeline import STAGE_FNS, run_pipeline
    from mtl_edge.workflows.stages import StageResult

    def given(path: Path):
        def stage(ctx):
            dest = ctx.dir / "best.pt"
            shutil.copyfile(path, dest)
            return StageResult({"checkpoint": ctx.rel(dest)}, 0)

        return stage

    fns = dict(STAGE_FNS, pretrain=given(pretrain), meta=given(meta))
    return run_pipeline(recipe, source, work, None, resume=True, stage_fns=fns)


def enroll_predict(bundle: Path, test: Path, work: Path, classes: int = 5, shots: int = 5) -> dict:
    """`mtl-edge enroll` `shots` photos of the first `classes` test classes, `mtl-edge predict`
    their other photos (at most 10 each); {"classes", "enrolled", "predicted", "accuracy"}."""
    cli = [sys.executable, "-m", "mtl_edge.cli"]
    gallery = work / "gallery.mtlg"
    gallery.unlink(missing_ok=True)
    names = sorted(p.name for p in test.iterdir() if p.is_dir())[:classes]
    truth, queries = [], []
    for name in names:
        photos = sorted((test / name).iterdir())
        run = [*cli, "enroll", "-b", str(bundle), "-g", str(gallery), "-c", name]
        subprocess.run([*run, *map(str, photos[:shots])], check=True, capture_output=True)
        for p in photos[shots : shots + 10]:
            truth.append(name)
            queries.append(str(p))
    out = subprocess.run(
        [*cli, "predict", "-b", str(bundle), "-g", str(gallery), "--json", "--threshold", "0",
         *queries], check=True, capture_output=True, text=True,
    )  # fmt: skip
    rows = json.loads(out.stdout)
    correct = sum(r["label"] == t for r, t in zip(rows, truth, strict=True))
    return {
        "classes": names,
        "enrolled_per_class": shots,
        "predicted": len(queries),
        "accuracy": 100.0 * correct / max(1, len(queries)),
        "rows": rows,
    }


def _copy(src: Path, dest: Path) -> None:
    if src.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def finish(args: argparse.Namespace) -> Path:
    from mtl_edge.bench.curves import plot_curves
    from mtl_edge.train.config import load_recipe, recipe_source

    plan = plan_mod.load_plan()
    root = Path(args.data or os.environ.get("MTL_EDGE_DATA") or REPO.parent / "shared" / "data")
    data_root = root / "miniimagenet"
    overrides = [f"data.root={data_root}", *args.overrides]
    recipe_name = args.recipe or plan["recipe"]
    recipe = load_recipe(recipe_name, overrides)
    work = Path(args.work)
    device = work / "device"
    results.restore(Path(args.files_at), device)
    run = device / "run"
    picked = choose(recipe, run, args.val_episodes)
    source = recipe_source(recipe_name, overrides)
    cpu = work / "cpu"
    cpu_stages(recipe, source, cpu, run / "pretrain" / "best.pt", run / "meta" / picked["chosen"])
    bundle = cpu / "export" / "bundle"
    people = enroll_predict(bundle, data_root / recipe.data.test_split, work)

    out = Path(args.out or REPO / "bench" / "results" / f"{dt.date.today():%Y-%m-%d}-h200-mini")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("recipe.resolved.json", "stages.json"):
        _copy(run / name, out / f"device-{name}")
    for stage in ("pretrain", "meta"):
        _copy(run / stage / "budget.json", out / f"{stage}-budget.json")
    for name in ("steps.json", "smoke.json", "versions.txt", "exit.json"):
        _copy(run / "device" / name, out / f"device-{name}")
    _copy(Path(args.files_at) / "compute.log", out / "device-compute.log")
    if args.calls:
        _copy(Path(args.calls), out / "device-calls.json")
    plot_curves(
        [run / "pretrain", run / "meta"], out / "curves.png", "H200: pre-training, meta-transfer"
    )
    for name in ("accuracy.json", "accuracy.md", "stages.md"):
        _copy(cpu / "report" / name, out / name)
    _copy(cpu / "bench" / "bench.json", out / "int8-vs-fp32.json")
    _copy(bundle / "manifest.json", out / "manifest.json")
    (out / "validation.json").write_text(json.dumps(picked, indent=1))
    (out / "enroll_predict.json").write_text(json.dumps(people, indent=1))
    (out / "plan-estimate.json").write_text(json.dumps(plan_mod.estimate(plan), indent=1))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files_at", help="The folder the compute call's files came back to.")
    ap.add_argument("--data", help="Dataset root holding miniimagenet/.")
    ap.add_argument("--calls", help="JSON record of the device calls as run.")
    ap.add_argument("--out", help="Results folder (default bench/results/<date>-h200-mini).")
    ap.add_argument("--work", default="runs/h200-mini", help="Work folder (restored run, CPU run).")
    ap.add_argument("--recipe", help="Recipe (default plan.json's).")
    ap.add_argument("--val-episodes", type=int, default=600)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        out = finish(args)
    except results.ResultsError as e:
        print(f"finish: error: {e}", file=sys.stderr)
        return 1
    print(f"finish: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
