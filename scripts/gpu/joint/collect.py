"""Issue 19 after the lease, on the development CPU: unpack what came back, evaluate, report.

    python3 scripts/gpu/joint/collect.py unpack FILES [--runs RUNS]
        FILES: the compute call's files_at folder (the three <model>.tar, lease.json,
        smoke.json, versions.txt, compute.log). The tars unpack into RUNS (runs/joint-gpu);
        the reports, plan.json, the recipe and commands.md (the calls with the measured steps)
        go to bench/results/<date>-h200-joint/ (RESULTS).
    python3 scripts/gpu/joint/collect.py grid [--runs RUNS] [--results RESULTS]
            [--episodes 600] [--split val+test] [--dataset folders --data ROOT]
        the grid (5/20/35-way x 1/5/100-shot, the same episodes for every model, paired
        differences Reptile + transfer minus each) -> RESULTS/grid.json, grid.md (with the
        paper's Table 1 beside), grid.png
    python3 scripts/gpu/joint/collect.py curve [--runs RUNS] [--results RESULTS]
            [--episodes 600] [...]
        the learning curve of the 1-shot gap: 5-way 1-shot, Reptile + transfer minus plain
        transfer (and minus plain Reptile) on the same episodes at every checkpoint the three
        runs share -> RESULTS/curve.json, curve.png

`grid` and `curve` run `mtl_edge.train.grid` (CPU by default: --device). Review RESULTS, then
git add it (no checkpoints: they stay in RUNS).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from plan import layout, load_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
KEEP = ("lease.json", "smoke.json", "versions.txt", "compute.log")
#: Eshratifar et al., Table 1 (miniImageNet, Conv-4/32, 84 px), the cells DESIGN.md lists.
PAPER = {
    ("reptile-transfer", 5, 1): 51.0,
    ("reptile-transfer", 5, 5): 69.6,
    ("reptile-transfer", 5, 100): 96.6,
    ("reptile-transfer", 35, 100): 68.1,
    ("transfer", 35, 100): 61.7,
}


def default_results() -> Path:
    return REPO / "bench" / "results" / f"{dt.date.today().isoformat()}-h200-joint"


def unpack(files: Path, runs: Path, results: Path, plan: dict[str, Any]) -> list[Path]:
    """The model tars into `runs`, the reports and the plan as run into `results`."""
    results.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    for m in plan["models"]:
        with tarfile.open(files / f"{m['name']}.tar") as tar:
            tar.extractall(runs, filter="data")
    for f in KEEP:
        if (files / f).is_file():
            shutil.copy2(files / f, results / f)
    (results / "plan.json").write_text(json.dumps(plan, indent=1))  # lease limits inlined
    shutil.copy2(REPO / plan["recipe"], results / Path(plan["recipe"]).name)
    lease_file = files / "lease.json"
    lease = json.loads(lease_file.read_text()) if lease_file.is_file() else {}
    lines = ["# Device calls (issue 19)", ""]
    for c in layout(plan):
        lines.append(f"{c['n']}. carry `{json.dumps(c['carry'])}`, timeout_s {c['timeout_s']}: "
                     f"`{c['command']}`")  # fmt: skip
    lines += ["", f"engine: {lease.get('engine')}; iterations planned: "
              f"{lease.get('iterations_planned')}; reached: "
              f"{ {k: v.get('iteration') for k, v in lease.get('models', {}).items()} }", "",
              "Measured steps of the compute call (s):", ""]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in lease.get("steps_s", {}).items()]
    (results / "commands.md").write_text("\n".join(lines) + "\n")
    return [runs / m["name"] / "last.pt" for m in plan["models"]]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _models(paths: list[Path], names: list[str]) -> list[Any]:
    from mtl_edge.train.checkpoint import load_checkpoint
    from mtl_edge.train.grid import grid_model

    out = []
    for path, name in zip(paths, names, strict=True):
        m = grid_model(load_checkpoint(path))
        m.name = name
        out.append(m)
    return out


def _split(args: argparse.Namespace) -> Any:
    from mtl_edge.data.registry import data_root, open_split_spec
    from mtl_edge.settings import parse_options

    root = None if args.dataset == "synthetic" else args.data or data_root() / "miniimagenet"
    options = parse_options(args.option, "-o")
    return open_split_spec(args.dataset, root, args.split, **options)


def grid(runs: Path, results: Path, plan: dict[str, Any], args: argparse.Namespace) -> Path:
    """The grid on the three final checkpoints (Reptile + transfer last: the subject of the
    paired differences) -> grid.json, grid.md, grid.png."""
    from mtl_edge.train.grid import evaluate_grid, format_table

    names = [m["name"] for m in plan["models"]][::-1]  # transfer, reptile, reptile-transfer
    models = _models([runs / n / "last.pt" for n in names], names)
    report = evaluate_grid(
        models, _split(args), _ints(args.ways), _ints(args.shots), args.episodes,
        seed=args.seed, device=args.device,
    )  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    (results / "grid.json").write_text(json.dumps(report, indent=1))
    lines = ["# The grid (issue 19)", "", "```", format_table(report), "```", "",
             "| setting | paper Reptile + transfer | paper transfer | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    cells = {(r["model"], r["ways"], r["shots"]): r for r in report["results"]}
    for ways, shots in sorted({(r["ways"], r["shots"]) for r in report["results"]}):
        paper = [PAPER.get((n, ways, shots)) for n in ("reptile-transfer", "transfer")]
        ours = [cells.get((n, ways, shots)) for n in names]
        lines.append(
            f"| {ways}-way {shots}-shot | "
            + " | ".join("-" if p is None else f"{p:.1f}" for p in paper) + " | "
            + " | ".join("-" if o is None else f"{o['mean']:.1f} +- {o['ci95']:.1f}" for o in ours)
            + " |"
        )  # fmt: skip
    (results / "grid.md").write_text("\n".join(lines) + "\n")
    _plot_grid(report, names, results / "grid.png")
    return results / "grid.json"


def _pyplot() -> Any:
    from mtl_edge.bench.plots import _pyplot as plt

    return plt()


def _plot_grid(report: dict[str, Any], names: list[str], path: Path) -> None:
    plt = _pyplot()
    settings = sorted({(r["ways"], r["shots"]) for r in report["results"]})
    cells = {(r["model"], r["ways"], r["shots"]): r for r in report["results"]}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + i * width for j in range(len(settings))]
        rows = [cells.get((n, w, k)) for w, k in settings]
        ax.bar(xs, [r["mean"] if r else 0 for r in rows], width,
               yerr=[r["ci95"] if r else 0 for r in rows], label=n)  # fmt: skip
    for j, (w, k) in enumerate(settings):
        if (p := PAPER.get(("reptile-transfer", w, k))) is not None:
            ax.plot([j - width / 2, j + 0.8 - width / 2], [p, p], "k--", lw=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
    ax.set_xticklabels([f"{w}w{k}s" for w, k in settings], fontsize=8)
    ax.set_ylabel("accuracy (%), 95% interval; dashed: paper's Reptile + transfer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from mtl_edge.bench.plots import save_figure

    save_figure(fig, path, dpi=120)
    plt.close(fig)


def curve(runs: Path, results: Path, plan: dict[str, Any], args: argparse.Namespace) -> Path:
    """5-way 1-shot paired differences at every checkpoint iteration the three runs share."""
    from mtl_edge.train.grid import evaluate_grid

    names = [m["name"] for m in plan["models"]][::-1]
    stems = set.intersection(*({p.stem for p in (runs / n).glob("it*.pt")} for n in names))
    split = _split(args)
    points = []
    for stem in sorted(stems)[args.every - 1 :: args.every] + ["last"]:
        models = _models([runs / n / f"{stem}.pt" for n in names], names)
        report = evaluate_grid(models, split, [5], [1], args.episodes, seed=args.seed,
                               device=args.device)  # fmt: skip
        iteration = models[-1].model.raw.get("metrics", {}).get("iteration")
        points.append({"checkpoint": stem, "iteration": iteration,
                       "accuracy": {r["model"]: r["mean"] for r in report["results"]},
                       "differences": report["differences"]})  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    (results / "curve.json").write_text(json.dumps({"episodes": args.episodes, "points": points}))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for versus in names[:-1]:
        d = [next(x for x in p["differences"] if x["versus"] == versus) for p in points]
        its = [p["iteration"] for p in points]
        ax.errorbar(its, [x["mean"] for x in d], yerr=[x["ci95"] for x in d], marker="o",
                    label=f"{names[-1]} minus {versus}", capsize=3)  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("5-way 1-shot accuracy difference (points), paired")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from mtl_edge.bench.plots import save_figure

    save_figure(fig, results / "curve.png", dpi=120)
    plt.close(fig)
    return results / "curve.json"


def main(argv: list[str] | None = None) -> int:
    plan = load_plan()
    ap = argparse.ArgumentParser(description="Issue 19 after the lease (see the docstring).")
    ap.add_argument("what", choices=("unpack", "grid", "curve"))
    ap.add_argument("files", nargs="?", type=Path)
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "joint-gpu")
    ap.add_argument("--results", type=Path, default=default_results())
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--split", default="val+test")
    ap.add_argument("--dataset", default="folders")
    ap.add_argument("--data", type=Path)
    ap.add_argument("-o", "--option", action="append", default=[], help="reader KEY=VALUE")
    ap.add_argument("--ways", default="5,20,35")
    ap.add_argument("--shots", default="1,5,100")
    ap.add_argument("--every", type=int, default=1, help="curve: every K-th checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.what == "unpack":
        if args.files is None:
            ap.error("unpack needs FILES (the compute call's files_at folder)")
        print("\n".join(map(str, unpack(args.files, args.runs, args.results, plan))))
    elif args.what == "grid":
        print(grid(args.runs, args.results, plan, args))
    else:
        print(curve(args.runs, args.results, plan, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
