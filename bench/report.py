"""Benchmark reports: one JSON document per run (schema + version, environment, config,
results) and its Markdown tables.

A report is {"schema": SCHEMA, "version": VERSION, "kind": "latency" | "accuracy" | "enroll",
"created": ISO time, "environment": sysinfo.collect() + threads, "config": {...},
"results": {...}}. `results` is what `run_latency`, `run_accuracy` or `run_enroll` returned.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from mtl_edge.atomicio import atomic_write_bytes, atomic_write_json
from mtl_edge.errors import ConfigError

SCHEMA = "mtl-edge.bench"
VERSION = 1
KINDS = ("latency", "accuracy", "enroll", "train", "serve", "openset")


def environment() -> dict[str, Any]:
    """CPU, GPUs, library versions and thread settings of this machine."""
    from mtl_edge import __version__, sysinfo

    env = {"mtl_edge": __version__, **sysinfo.collect()}
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    env["cpu_count"] = os.cpu_count()
    env["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return env


def make_report(kind: str, config: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"report kind {kind!r} not in {KINDS}")
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "config": config,
        "results": results,
    }


def save_report(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_json(path, report)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report, checking schema and version.

    Raises:
        ConfigError: missing or unreadable file, not a bench report, a newer version.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such report; give a JSON written by mtl-edge bench"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e}); give a bench report") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ConfigError(f"{path}: not an mtl-edge bench report (schema {SCHEMA!r} missing)")
    if doc.get("version") != VERSION or doc.get("kind") not in KINDS:
        raise ConfigError(
            f"{path}: bench report version {doc.get('version')} kind {doc.get('kind')!r}; "
            f"this mtl-edge reads version {VERSION}"
        )
    return doc


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def environment_lines(env: dict[str, Any]) -> list[str]:
    cpu = env.get("cpu", {})
    flags = [f for f, on in cpu.get("flags", {}).items() if on]
    gpus = ", ".join(g.get("name", "?") for g in env.get("gpus", [])) or "none"
    libs = []
    for lib in ("onnxruntime", "torch", "tensorrt"):
        v = (env.get(lib) or {}).get("version")
        libs.append(f"{lib} {v or 'absent'}")
    return [
        f"- CPU: {cpu.get('model', '?')} ({cpu.get('cores', '?')} usable cores); "
        f"flags: {' '.join(flags) or 'none'}",
        f"- GPU: {gpus}",
        f"- Python {env.get('python', '?')}, numpy {env.get('numpy', '?')}, " + ", ".join(libs),
        f"- load average at the end: {env.get('load_average')}",
    ]


def latency_markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    lines = ["# Latency", "", *environment_lines(report["environment"]), ""]
    flops = res.get("model", {}).get("flops_per_image")
    peak = res.get("peak", {})
    lines.append(
        f"- input {res.get('model', {}).get('input_shape')}; FLOPs per image: "
        + (
            f"{flops / 1e9:.3f} G"
            if flops and flops >= 1e8
            else f"{(flops or 0) / 1e6:.2f} M"
            if flops
            else "not counted"
        )
    )
    for key in ("fp32", "int8"):
        entry = peak.get(key, {})
        if "ops_per_s" in entry:
            lines.append(
                f"- measured peak {key}: {entry['ops_per_s'] / 1e9:.1f} G ops/s "
                f"({entry['source']}, {peak.get('n')}^3 matmul)"
            )
        elif entry:
            lines.append(f"- peak {key}: {entry.get('error')}")
    if "error" in peak:
        lines.append(f"- peak: {peak['error']}")
    lines.append("")
    # The mode column (GPU: compute / copies) only where some setting is not a host one.
    modes = any(s.get("mode", "host") != "host" for s in res.get("settings", []))
    header = [
        "backend",
        "precision",
        *(["mode"] if modes else []),
        "provider",
        "batch",
        "median ms",
        "p90",
        "p99",
        "min",
        "img/s",
        "x torch fp32",
        "% peak",
        "runs",
    ]
    rows = []
    for s in res.get("settings", []):
        for b in s["batches"]:
            rows.append(
                [
                    s["backend"],
                    s["precision"],
                    *([str(s.get("mode"))] if modes else []),
                    str(s.get("provider", "-")),
                    str(b["batch"]),
                    _fmt(b["median_ms"], 3),
                    _fmt(b["p90_ms"], 3),
                    _fmt(b["p99_ms"], 3),
                    _fmt(b["min_ms"], 3),
                    _fmt(b["throughput_ips"], 1),
                    _fmt(b.get("speedup_vs_torch_fp32")),
                    _fmt(b.get("percent_of_peak"), 1),
                    str(b["runs"]),
                ]
            )
    lines += _table(header, rows)
    from mtl_edge.bench.gpu_report import markdown_lines

    lines += markdown_lines(res)
    lines += _skipped_lines(res)
    return "\n".join(lines) + "\n"


def _skipped_lines(res: dict[str, Any]) -> list[str]:
    skipped = res.get("skipped", [])
    if not skipped:
        return []
    return ["", "Skipped:", ""] + [
        f"- {s['backend']} {s['precision']}: {s['reason']}" for s in skipped
    ]


def accuracy_markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    lines = ["# Accuracy", "", *environment_lines(report["environment"]), ""]
    lines.append(
        f"- split {res.get('split')}, seed {res.get('seed')}, "
        f"{res.get('episodes')} episodes per setting, {res.get('queries')} queries "
        f"per class, head {res.get('head')}"
    )
    lines.append("")
    header = [
        "backend",
        "precision",
        "ways",
        "shots",
        "accuracy %",
        "95% +-",
        "diff vs fp32 (points)",
        "diff 95% +-",
    ]
    rows = []
    for r in res.get("rows", []):
        rows.append(
            [
                r["backend"],
                r["precision"],
                str(r["ways"]),
                str(r["shots"]),
                _fmt(r["accuracy"]),
                _fmt(r["ci95"]),
                _fmt(r.get("diff_vs_reference")),
                _fmt(r.get("diff_ci95")),
            ]
        )
    lines += _table(header, rows)
    lines += _skipped_lines(res)
    return "\n".join(lines) + "\n"


def enroll_markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    lines = ["# Enrollment", "", *environment_lines(report["environment"]), ""]
    lines.append(
        f"- backend {res.get('backend')} {res.get('precision')} "
        f"(provider {res.get('provider')}), {res.get('classes')} classes x "
        f"{res.get('shots')} shots = {res.get('images')} images"
    )
    lines.append("")
    rows = [[k, _fmt(v * 1e3, 2)] for k, v in res.get("stages_s", {}).items()]
    rows.append(["enroll total", _fmt(res.get("enroll_total_s", 0.0) * 1e3, 2)])
    lines += _table(["stage", "ms"], rows)
    pred = res.get("predict", {})
    if pred:
        lines += [
            "",
            f"Predict one image end to end (decode + preprocess + extract + head): "
            f"median {_fmt(pred.get('median_ms'), 3)} ms, p90 {_fmt(pred.get('p90_ms'), 3)}"
            f" ms over {pred.get('runs')} runs",
        ]
    return "\n".join(lines) + "\n"


def to_markdown(report: dict[str, Any]) -> str:
    """The Markdown page of a report of any kind."""
    kind = report["kind"]
    if kind == "train":
        from mtl_edge.bench.train_speed import train_speed_markdown

        return train_speed_markdown(report)
    if kind == "serve":
        from mtl_edge.bench import serve_report

        return serve_report.to_markdown(report)
    if kind == "openset":
        from mtl_edge.bench.openset import openset_markdown

        return openset_markdown(report)
    return {
        "latency": latency_markdown,
        "accuracy": accuracy_markdown,
        "enroll": enroll_markdown,
    }[kind](report)


def write_outputs(report: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Write `<stem>.json`, `<stem>.md` and the kind's plots into `out`; the paths written."""
    from mtl_edge.bench.plots import plot_report

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    save_report(report, json_path)
    atomic_write_bytes(md_path, to_markdown(report).encode())
    if report["kind"] == "openset":
        from mtl_edge.bench.openset import plot_openset

        return [json_path, md_path, plot_openset(report, out / f"{stem}.png")]
    return [json_path, md_path, *plot_report(report, out, stem)]
