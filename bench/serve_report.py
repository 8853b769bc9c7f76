"""The report of `mtl-edge bench serve`: JSON (the bench schema, kind "serve"), Markdown and a
PNG plot of throughput and latency per batching mode."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.bench.serve_bench import ServeBenchConfig


def make_report(cfg: ServeBenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    """{"schema", "version", "kind": "serve", "created", "environment", "config", "results"}."""
    from mtl_edge.bench.report import SCHEMA, VERSION, environment

    config = {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(cfg).items()
    }
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "kind": "serve",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "config": config,
        "results": results,
    }


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def per_image(mode: dict[str, Any]) -> float | None:
    """Mean backend time per image in ms: what batching saves inside the backend."""
    extract, images = mode["stage_mean_ms"]["extract"], mode["images_per_run"]
    return extract / images if extract is not None and images else None


def to_markdown(report: dict[str, Any]) -> str:
    from mtl_edge.bench.report import environment_lines

    res, cfg = report["results"], report["config"]
    lines = ["# Serve under load", "", *environment_lines(report["environment"]), ""]
    lines.append(
        f"- bundle {res['bundle']['backbone']} ({cfg['backend']}, {cfg['precision']}); photos: "
        f"{res['images']}"
    )
    lines.append(
        f"- {cfg['clients']} predict clients (1 photo per request) for {cfg['duration_s']:g} s "
        f"per round after {cfg['warmup_s']:g} s warm-up, plus 1 enroll client "
        f"({cfg['enroll_images']} photos every {cfg['enroll_interval_s']:g} s); batching up to "
        f"{cfg['max_batch']} images, {cfg['max_delay_ms']:g} ms; {cfg['rounds']} round(s) per "
        f"mode in the order {' '.join(res['order'])}; seed {cfg['seed']}; loopback only"
    )
    lines.append("")
    header = ["batching", "predict req/s", "req per server CPU s", "p50 ms", "p90 ms", "p99 ms",
              "enroll p50 / p99 ms", "errors", "classes ok / lost", "images per backend run",
              "extract ms per run / per image", "queue ms", "server / client CPU s",
              "top-1 agreement"]  # fmt: skip
    rows = []
    for m in res["modes"]:
        p, e, st = m["predict"], m["enroll"], m["stage_mean_ms"]
        rows.append([
            m["mode"], _f(p["throughput_rps"]), _f(p["per_server_cpu_s"]), _f(p["p50_ms"]),
            _f(p["p90_ms"]), _f(p["p99_ms"]), f"{_f(e['p50_ms'], 0)} / {_f(e['p99_ms'], 0)}",
            str(m["errors"]), f"{m['classes_acknowledged']} / {m['classes_lost']}",
            _f(m["images_per_run"], 2), f"{_f(st['extract'])} / {_f(per_image(m))}",
            _f(st["queue"]),
            f"{_f(m['server_cpu_s'])} / {_f(m['client_cpu_s'])}", _f(p["top1_agreement"], 3),
        ])  # fmt: skip
    lines += _table(header, rows)
    if "throughput_ratio_on_off" in res:
        lines += [
            "",
            f"Batched / unbatched: throughput **{res['throughput_ratio_on_off']:.2f}x**, requests "
            f"per server CPU second {_f(res.get('cpu_efficiency_ratio_on_off'), 2)}x, p50 "
            f"{_f(res.get('p50_ratio_on_off'), 2)}x, p99 {_f(res.get('p99_ratio_on_off'), 2)}x.",
        ]
    ceiling = res.get("backend_ceiling")
    if ceiling:
        lines.append(
            f"The backend alone, no server: {ceiling['batch1_ms_per_image']:.2f} ms per image at "
            f"batch 1, {ceiling['batched_ms_per_image']:.2f} at batch {ceiling['batch']}: "
            f"batching can at most make it **{ceiling['ratio']:.2f}x** faster."
        )
    goal = res["goal"]
    lines.append(
        f"Goal: 0 errors {'met' if goal['zero_errors'] else 'MISSED'}, 0 classes lost "
        f"{'met' if goal['zero_classes_lost'] else 'MISSED'}, batched >= 2x unbatched "
        f"{'met' if goal['batched_2x'] else 'MISSED'}."
    )
    if cfg["rounds"] > 1:
        rows = [
            [m["mode"], str(i + 1), _f(r["throughput_rps"]), _f(r["server_cpu_s"]),
             _f(r["images_per_run"], 2)]
            for m in res["modes"]
            for i, r in enumerate(m["per_round"])
        ]  # fmt: skip
        lines += ["", "Rounds:", ""]
        lines += _table(["batching", "round", "req/s", "server CPU s", "images per run"], rows)
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Predict throughput and p50 / p99 latency per mode, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl_edge.bench.plots import save_figure

    modes = report["results"]["modes"]
    names = [f"batching {m['mode']}" for m in modes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.6))
    colours = ["#2f6fde" if m["batching"] else "#9aa5b8" for m in modes]
    left.bar(names, [m["predict"]["throughput_rps"] for m in modes], color=colours)
    left.set_ylabel("predict requests / s")
    left.set_title("Throughput")
    x = np.arange(len(modes))
    for offset, key in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
        right.bar(x + offset, [m["predict"][key] or 0 for m in modes], 0.4, label=key[:3])
    right.set_xticks(x, names)
    right.set_ylabel("ms")
    right.set_title("Predict latency")
    right.legend()
    cfg = report["config"]
    fig.suptitle(
        f"mtl-edge serve: {cfg['clients']} clients, {cfg['duration_s']:g} s x {cfg['rounds']}, "
        f"{cfg['precision']}"
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    """serve.json, serve.md and serve.png in `out`; the paths written."""
    from mtl_edge.atomicio import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "serve.json", report)
    atomic_write_bytes(out / "serve.md", to_markdown(report).encode())
    return [out / "serve.json", out / "serve.md", plot(report, out / "serve.png")]
