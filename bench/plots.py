"""PNG plots of bench reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(doc: dict[str, Any], out: str | Path) -> Path:
    """Median latency per image (ms, log scale) against batch size, one line per
    (backend, precision)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in doc["results"].get("settings", []):
        xs = [b["batch"] for b in s["batches"]]
        ys = [b["median_ms"] / b["batch"] for b in s["batches"]]
        ax.plot(xs, ys, marker="o", label=f"{s['backend']} {s['precision']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("median ms per image")
    ax.set_title(f"latency, {doc.get('machine')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(doc: dict[str, Any], out: str | Path) -> Path:
    """Accuracy (with its 95% interval) against shots, one line per (backend, precision, ways)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[tuple[str, str, int], list[tuple[int, float, float]]] = {}
    for r in doc["results"].get("settings", []):
        key = (r["backend"], r["precision"], r["ways"])
        lines.setdefault(key, []).append((r["shots"], r["accuracy"], r["ci95"]))
    for (b, p, w), pts in lines.items():
        pts.sort()
        ax.errorbar(
            [x for x, _, _ in pts],
            [y for _, y, _ in pts],
            yerr=[c for _, _, c in pts],
            marker="o",
            capsize=3,
            label=f"{w}-way {b} {p}",
        )
    ax.set_xlabel("shots")
    ax.set_ylabel("accuracy %")
    ax.set_title(f"few-shot accuracy, {doc.get('machine')}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
