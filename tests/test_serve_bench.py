"""`mtl-edge bench serve` end to end on a tiny bundle: both modes, the report, the checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from device_fixtures import make_bundle, make_class_folders

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow


def bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", "bench", "serve", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bench_serve_runs_both_modes_and_reports(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle").root
    photos = make_class_folders(
        tmp_path / "photos", ("red", "green", "blue", "yellow", "purple"), per_class=6
    )
    out = tmp_path / "report"
    result = bench(
        "--bundle", bundle, "--images", photos, "--precision", "fp32", "--clients", "3",
        "--duration", "1.5", "--warmup", "0.3", "--enroll-interval", "0.3", "--rounds", "2",
        "--shots", "3", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"serve.json", "serve.md", "serve.png"}
    doc = json.loads((out / "serve.json").read_text())
    assert doc["kind"] == "serve" and doc["config"]["clients"] == 3
    res = doc["results"]
    assert res["order"] == ["off", "on", "on", "off"]
    off, on = res["modes"]
    assert (off["mode"], on["mode"]) == ("off", "on")
    for m in (off, on):
        assert m["errors"] == 0 and m["classes_lost"] == 0, m
        assert m["predict"]["ok"] > 0 and m["enroll"]["ok"] > 0
        assert m["classes_acknowledged"] == 2 * 4 + m["enroll"]["ok"]  # 4 seed classes a round
        assert m["predict"]["p50_ms"] <= m["predict"]["p99_ms"]
        assert len(m["per_round"]) == 2
    assert off["images_per_run"] == 1.0  # batching off: every image runs alone
    assert on["images_per_run"] >= 1.0
    ratio = on["predict"]["throughput_rps"] / off["predict"]["throughput_rps"]
    assert res["throughput_ratio_on_off"] == pytest.approx(ratio)
    ceiling = res["backend_ceiling"]
    assert ceiling["batch"] == 16 and ceiling["batch1_ms_per_image"] > 0
    assert ceiling["ratio"] == pytest.approx(
        ceiling["batch1_ms_per_image"] / ceiling["batched_ms_per_image"]
    )
    markdown = (out / "serve.md").read_text()
    assert "batching can at most make it" in markdown
    assert "Batched / unbatched: throughput" in markdown and "| on |" in markdown
    assert "Goal: 0 errors met, 0 classes lost met" in markdown


def test_bench_serve_option_errors_are_one_line(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle").root
    result = bench("--bundle", bundle, "--modes", "sideways", "--out", tmp_path / "r")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --modes sideways: use off, on or off,on"
    result = bench("--bundle", bundle, "--images", tmp_path, "--out", tmp_path / "r")
    assert result.returncode == 1 and "needs more than 4 class folders" in result.stderr
