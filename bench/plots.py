"""PNG plots of bench reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from mtl_edge.atomicio import atomic_write


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 90) -> Path:
    """Write a matplotlib figure to `path` atomically as a 256-colour PNG.

    Line plots lose nothing visible in the palette and shrink to about a third of the bytes of
    matplotlib's RGBA PNG, which keeps the committed results inside the repo's size budget.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    atomic_write(path, lambda f: small.save(f, format="PNG", optimize=True))
    return Path(path)


def _plain_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:g}")


def plot_latency(report: dict[str, Any], path: Path) -> Path:
    """Median latency per image (ms, log scale) against batch size, one line per setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in report["results"].get("settings", []):
        batches = [b["batch"] for b in s["batches"]]
        per_image = [b["median_ms"] / b["batch"] for b in s["batches"]]
        ax.plot(batches, per_image, marker="o", label=f"{s['backend']} {s['precision']}")
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted(
        {b["batch"] for s in report["results"].get("settings", []) for b in s["batches"]}
    )
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(_plain_formatter())
    ax.yaxis.set_minor_formatter(_plain_formatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("median ms per image")
    ax.set_title("Latency per image vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Accuracy (%) with 95% intervals against shots, one line per (backend, precision, ways)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in report["results"].get("rows", []):
        lines.setdefault((r["backend"], r["precision"], r["ways"]), []).append(r)
    for (backend, precision, ways), rows in lines.items():
        rows.sort(key=lambda r: r["shots"])
        ax.errorbar(
            [r["shots"] for r in rows],
            [r["accuracy"] for r in rows],
            yerr=[r["ci95"] for r in rows],
            marker="o",
            capsize=3,
            label=f"{ways}-way {backend} {precision}",
        )
    ax.set_xlabel("shots")
    ax.set_ylabel("accuracy % (95% interval)")
    ax.set_title("Accuracy vs shots")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_report(report: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """The plots of a report's kind written into `out`; enroll reports have none."""
    if report["kind"] == "latency" and report["results"].get("gpu_peak"):
        from mtl_edge.bench.gpu_report import plot_gpu

        return [plot_gpu(report, out / f"{stem}.png")]
    if report["kind"] == "latency" and report["results"].get("settings"):
        return [plot_latency(report, out / f"{stem}.png")]
    if report["kind"] == "accuracy" and report["results"].get("rows"):
        return [plot_accuracy(report, out / f"{stem}.png")]
    return []
