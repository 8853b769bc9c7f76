"""The report of a staged run (`mtl_edge.workflows`): accuracy table, stage timings, curves.

RUN/report/ holds accuracy.json and accuracy.md (one row per model, head, precision and shot
count, from the metatest and bench stages' outputs), stages.md (wall time, images/s, peak
memory, achieved FLOP/s against the measured matrix rate) and curves.png (every numeric
series of the stages' metrics JSON-lines files against its step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtl_edge.atomicio import atomic_write_bytes, atomic_write_json
from mtl_edge.jsonfile import json_safe


def accuracy_rows(done: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The accuracy table: one row per (model, head, precision, shots).

    Rows come from the metatest stage's output "accuracy" and the bench stage's output
    "accuracy"; each is a list of {"model", "head", "precision", "shots", "mean", "ci95",
    "episodes"} (mean and ci95 in %), and the bench's paired differences as
    {"kind": "paired", ...}.
    """
    rows: list[dict[str, Any]] = []
    for stage in ("metatest", "bench"):
        rows.extend(done.get(stage, {}).get("outputs", {}).get("accuracy", []))
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of `accuracy_rows` as a Markdown table (mean +- 95% interval, in %)."""
    lines = [
        "| model | head | precision | shots | accuracy (%) | episodes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['mean']:.2f} ± {r['ci95']:.2f}" if r.get("mean") is not None else "-"
        lines.append(
            f"| {r.get('model', '-')} | {r.get('head', '-')} | {r.get('precision', '-')} | "
            f"{r.get('shots', '-')} | {acc} | {r.get('episodes', '-')} |"
        )
    return "\n".join(lines) + "\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics JSON-lines file (a torn last line is ignored)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_curves(files: Mapping[str, Path], out: Path) -> bool:
    """Learning curves: every numeric series of each metrics file against its step.

    The x axis is the first of "step", "epoch", "iteration" present in a row, else the row
    number. Returns False (and writes nothing) when no file has a numeric series.
    """
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for label, path in files.items():
        for i, row in enumerate(read_metrics(path)):
            x = next((row[k] for k in ("step", "epoch", "iteration") if k in row), i)
            for key, value in row.items():
                if key in ("step", "epoch", "iteration") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    xs, ys = series.setdefault(label, {}).setdefault(key, ([], []))
                    xs.append(float(x))
                    ys.append(float(value))
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl_edge.bench.plots import save_figure

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (label, curves) in zip(axes[0], series.items(), strict=True):
        for key, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, label=key)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return True


def write_report(
    run: str | Path,
    record: Mapping[str, Any],
    done: Mapping[str, Mapping[str, Any]],
    order: Sequence[str],
) -> Path:
    """RUN/report/: accuracy.json, accuracy.md, stages.md and curves.png (when curves exist).

    Args:
        record: the run's stage record (stages.json: per stage status, wall time, images/s,
            peak memory, FLOP/s; the measured matrix rate).
        done: the finished stages' markers (their outputs and metrics files).
        order: the stage names in run order.
    """
    run = Path(run)
    report = run / "report"
    rows = accuracy_rows(done)
    atomic_write_json(report / "accuracy.json", json_safe(rows))
    atomic_write_bytes(report / "accuracy.md", markdown_table(rows).encode())
    lines = [
        "| stage | status | wall (s) | images/s | peak memory (MiB) | achieved TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    stages = record.get("stages", {})
    for name in sorted(stages, key=lambda n: order.index(n) if n in order else len(order)):
        e = stages[name]
        ips = e.get("images_per_s")
        mem = e.get("peak_memory_bytes")
        fl = e.get("achieved_flops_per_s")
        lines.append(
            f"| {name} | {e.get('status')} | {e.get('wall_s', 0):.1f} | "
            f"{f'{ips:.1f}' if ips else '-'} | {f'{mem / 2**20:.0f}' if mem else '-'} | "
            f"{f'{fl / 1e12:.3g}' if fl else '-'} |"
        )
    if "matmul" in record:
        m = record["matmul"]
        lines.append(
            f"\nmeasured {m['dtype']} {m['n']}^3 matrix rate on {m['device']}: "
            f"{m['flops_per_s'] / 1e12:.3f} TFLOP/s"
        )
    atomic_write_bytes(report / "stages.md", ("\n".join(lines) + "\n").encode())
    files = {
        f"{stage}: {Path(f).name}": run / f
        for stage, d in done.items()
        for f in d.get("metrics_files", [])
        if (run / f).is_file()
    }
    plot_curves(files, report / "curves.png")
    return report
