"""Learning curves of training runs as one PNG: per stage, the training loss and the training
and validation accuracy (with the 95 % interval) against the wall time of the run.

    python -m mtl_edge.bench.curves RUN_PRE RUN_META [...] --out curves.png
    python -m mtl_edge.bench.curves RUN_A RUN_B [...] --compare --out tuning.png

`--compare` draws runs of one stage over each other instead (validation accuracy against the
epoch, one line per run folder, named by its folder): the plot of a tuning sweep.

Reads each run folder's metrics.jsonl (`mtl_edge.train.runs.Run.log_metrics`: one row per
epoch with "stage", "loss", "train_acc", "seconds" and, when validated, "val_acc" and
"val_ci95"). Stages are laid end to end on the time axis, so the plot shows where the budget
went.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mtl_edge.bench.plots import _pyplot, save_figure
from mtl_edge.errors import ConfigError


def read_rows(run: Path) -> list[dict[str, Any]]:
    """The metrics rows of a run folder.

    Raises:
        ConfigError: no metrics.jsonl there or an unreadable line (naming the file).
    """
    path = Path(run) / "metrics.jsonl"
    try:
        text = path.read_text()
    except OSError:
        raise ConfigError(f"{path}: no metrics file; give a run folder of mtl-edge train") from None
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: line {e.lineno} is not JSON; the run folder is damaged"
        ) from None


def plot_curves(runs: list[Path], out: Path, title: str = "") -> Path:
    """One PNG with loss (left axis) and accuracies (right panel) of every run against minutes
    since the first run's first epoch; `runs` are laid end to end in the given order."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0.0
    for run in runs:
        rows = read_rows(run)
        if not rows:
            continue
        label = f"{rows[0].get('stage', '?')} ({Path(run).name})"
        t, clock = [], offset
        for r in rows:
            clock += float(r.get("seconds", 0.0)) / 60.0
            t.append(clock)
        ax_loss.plot(t, [r["loss"] for r in rows], marker=".", label=label)
        ax_acc.plot(t, [r["train_acc"] for r in rows], ls="--", label=f"train {label}")
        val = [(x, r) for x, r in zip(t, rows, strict=True) if r.get("val_acc") is not None]
        if val:
            ax_acc.errorbar(
                [x for x, _ in val],
                [r["val_acc"] for _, r in val],
                yerr=[r.get("val_ci95", 0.0) for _, r in val],
                marker="o",
                capsize=3,
                label=f"val {label}",
            )
        ax_loss.axvline(clock, color="grey", lw=0.5)
        offset = clock
    ax_loss.set_xlabel("training minutes (epochs' own time, end to end)")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("training minutes")
    ax_acc.set_ylabel("accuracy % (val: 95 % interval)")
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(plt, fig, (ax_loss, ax_acc), out)


def _finish(plt: Any, fig: Any, axes: tuple[Any, ...], out: Path) -> Path:
    """Grid and legend on every axis, then the PNG written and the figure closed."""
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=80)
    plt.close(fig)
    return out


def plot_comparison(runs: list[Path], out: Path, title: str = "") -> Path:
    """One PNG of the validation accuracy (95 % interval shaded) of every run against its
    epoch, one line per run folder.

    Raises:
        ConfigError: a run folder without metrics, or whose rows have no validation accuracy.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        rows = [r for r in read_rows(run) if r.get("val_acc") is not None]
        if not rows:
            raise ConfigError(f"{run}: no validated epochs in metrics.jsonl; nothing to compare")
        epoch = [int(r["epoch"]) + 1 for r in rows]
        val = [float(r["val_acc"]) for r in rows]
        ci = [float(r.get("val_ci95", 0.0)) for r in rows]
        (line,) = ax.plot(
            epoch, val, marker=".", label=f"{Path(run).name} (val, last {val[-1]:.2f})"
        )
        ax.fill_between(epoch, [v - c for v, c in zip(val, ci, strict=True)],
                        [v + c for v, c in zip(val, ci, strict=True)],
                        color=line.get_color(), alpha=0.15)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy %")
    if title:
        ax.set_title(title, fontsize=9)
    return _finish(plt, fig, (ax,), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Learning curves of mtl-edge train runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="Run folders, in training order.")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write.")
    parser.add_argument("--title", default="")
    parser.add_argument(
        "--compare", action="store_true", help="Overlay the runs' validation accuracy by epoch."
    )
    args = parser.parse_args(argv)
    plot = plot_comparison if args.compare else plot_curves
    print(plot(args.runs, args.out, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
