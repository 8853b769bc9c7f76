"""Bench reports: schema round trip, Markdown, plots and compare on hand-made results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mtl_edge.bench.compare import compare, compare_markdown
from mtl_edge.bench.report import (
    SCHEMA,
    VERSION,
    load_report,
    make_report,
    save_report,
    to_markdown,
    write_outputs,
)
from mtl_edge.errors import ConfigError


def _latency(median_ms: float) -> dict[str, Any]:
    row = {"batch": 1, "runs": 100, "min_ms": median_ms * 0.9, "mean_ms": median_ms,
           "median_ms": median_ms, "p90_ms": median_ms * 1.1, "p95_ms": median_ms * 1.2,
           "p99_ms": median_ms * 1.3, "throughput_ips": 1e3 / median_ms}  # fmt: skip
    results = {
        "settings": [
            {"backend": "torch", "precision": "fp32", "provider": "torch eager", "batches": [row]},
            {
                "backend": "onnxruntime",
                "precision": "int8-cpu",
                "provider": "CPU",
                "batches": [{**row, "median_ms": median_ms / 4, "speedup_vs_torch_fp32": 4.0}],
            },
        ],  # fmt: skip
        "skipped": [{"backend": "tensorrt", "precision": "fp32", "reason": "not installed"}],
        "peak": {"n": 1024, "fp32": {"ops_per_s": 1e11, "source": "torch.mm float32"}},
        "model": {"input_shape": [3, 84, 84], "flops_per_image": 3.5e9},
    }
    return make_report("latency", {"seed": 0}, results)


def _accuracy(acc: float) -> dict[str, Any]:
    rows = [
        {"backend": "onnxruntime", "precision": p, "ways": 5, "shots": s, "accuracy": acc + s,
         "ci95": 0.8, **({"diff_vs_reference": -0.1, "diff_ci95": 0.05} if p != "fp32" else {})}
        for p in ("fp32", "int8-cpu")
        for s in (1, 5)
    ]  # fmt: skip
    results = {"rows": rows, "skipped": [], "split": "mini/test", "seed": 0, "episodes": 2000,
               "queries": 15, "head": "fc", "reference": ["onnxruntime", "fp32"]}  # fmt: skip
    return make_report("accuracy", {}, results)


def test_report_round_trip(tmp_path: Path) -> None:
    doc = _latency(10.0)
    assert doc["schema"] == SCHEMA and doc["version"] == VERSION
    assert "cpu" in doc["environment"] and "onnxruntime" in doc["environment"]
    save_report(doc, tmp_path / "r.json")
    assert load_report(tmp_path / "r.json") == json.loads(json.dumps(doc))


def test_load_report_rejects_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    (tmp_path / "bad.json").write_text("{not json")
    newer = {**_latency(1.0), "version": VERSION + 1}
    (tmp_path / "new.json").write_text(json.dumps(newer))
    for name, needle in (("x.json", "not an mtl-edge bench report"), ("bad.json", "JSON"),
                         ("new.json", "version"), ("missing.json", "no such report")):  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            load_report(tmp_path / name)


def test_markdown_and_plots(tmp_path: Path) -> None:
    lat = to_markdown(_latency(10.0))
    assert "| onnxruntime | int8-cpu | CPU | 1 | 2.500 |" in lat
    assert "3.500 G" in lat and "tensorrt fp32: not installed" in lat
    acc = to_markdown(_accuracy(50.0))
    assert "| onnxruntime | int8-cpu | 5 | 1 | 51.00 | 0.80 | -0.10 | 0.05 |" in acc
    for doc, stem in ((_latency(10.0), "lat"), (_accuracy(50.0), "acc")):
        paths = write_outputs(doc, tmp_path, stem)
        assert [p.suffix for p in paths] == [".json", ".md", ".png"]
        assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_compare_latency_and_accuracy() -> None:
    result = compare(_latency(10.0), _latency(20.0))
    ratios = {(r["backend"], r["batch"]): r["ratio_b_over_a"] for r in result["rows"]}
    assert ratios == {("torch", 1): pytest.approx(2.0), ("onnxruntime", 1): pytest.approx(2.0)}
    assert "| torch | fp32 | 1 | 10.000 | 20.000 | 2.00 |" in compare_markdown(result, "a", "b")
    acc = compare(_accuracy(50.0), _accuracy(52.5))
    assert all(r["b_minus_a"] == pytest.approx(2.5) for r in acc["rows"])
    assert len(acc["rows"]) == 4 and acc["only_in_a"] == acc["only_in_b"] == []


def test_compare_lists_unmatched_settings_and_refuses_mixed_kinds() -> None:
    a, b = _latency(10.0), _latency(10.0)
    b["results"]["settings"] = b["results"]["settings"][:1]
    result = compare(a, b)
    assert result["only_in_a"] == [["onnxruntime", "int8-cpu", 1]]
    assert "only in A: onnxruntime int8-cpu 1" in compare_markdown(result, "a", "b")
    with pytest.raises(ConfigError, match="same kind"):
        compare(_latency(1.0), _accuracy(1.0))


def test_figures_are_saved_as_palette_pngs_in_a_third_of_the_bytes(tmp_path: Path) -> None:
    from PIL import Image

    from mtl_edge.bench.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in range(5):
        ax.plot(range(50), [(i * (k + 1)) % 17 for i in range(50)], label=f"line {k}")
    ax.legend()
    rgba = tmp_path / "rgba.png"
    fig.savefig(rgba, dpi=90)
    small = save_figure(fig, tmp_path / "sub" / "plot.png")
    plt.close(fig)
    with Image.open(small) as image, Image.open(rgba) as full:
        assert image.mode == "P" and image.size == full.size
    assert small.stat().st_size < 0.7 * rgba.stat().st_size
    assert not list(small.parent.glob(".*.tmp"))  # written through a temporary file
