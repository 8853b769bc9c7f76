"""`mtl-edge bench` end to end on tiny models: latency, accuracy, enroll, compare, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from device_fixtures import make_bundle, make_class_folders

pytest.importorskip("onnxruntime")

QUICK = ("--min-time", "0.02", "--min-runs", "3", "--warmup", "0", "--warmup-runs", "1")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", "bench", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    make_bundle(tmp_path / "bundle", extra_variants=("int8-cpu",))
    return tmp_path / "bundle"


def test_latency_on_a_bundle_lists_torch_as_skipped(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat"
    res = run(
        "latency", "--bundle", bundle, "--backends", "torch,onnxruntime,tensorrt",
        "--precisions", "fp32,int8-cpu", "--batch-sizes", "1,4", "--rounds", "2",
        "--no-peak", *QUICK, "--out", out, "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "mtl-edge.bench" and doc["kind"] == "latency"
    settings = {(s["backend"], s["precision"]): s for s in doc["results"]["settings"]}
    assert set(settings) == {("onnxruntime", "fp32"), ("onnxruntime", "int8-cpu")}
    for s in settings.values():
        assert s["provider"] == "CPUExecutionProvider"
        assert [b["batch"] for b in s["batches"]] == [1, 4]
        for b in s["batches"]:
            assert b["runs"] >= 3 and b["min_ms"] <= b["median_ms"] <= b["p99_ms"]
            assert "speedup_vs_torch_fp32" not in b  # no reference ran
    skipped = {(s["backend"], s["precision"]): s["reason"] for s in doc["results"]["skipped"]}
    assert "--checkpoint" in skipped[("torch", "fp32")]
    assert any(k[0] == "tensorrt" for k in skipped)  # no TensorRT here: listed, not dropped
    assert doc["results"]["model"]["flops_per_image"] > 0
    assert (out / "latency.json").is_file() and (out / "latency.png").stat().st_size > 0
    assert "| onnxruntime | fp32 |" in (out / "latency.md").read_text()


@pytest.mark.slow
def test_latency_random_model_has_torch_reference_and_peak(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "lat"
    res = run(
        "latency", "--random", "--backbone", "conv4", "--backbone-arg", "width=4",
        "--image-size", "32", "--backends", "torch,onnxruntime", "--precisions", "fp32",
        "--batch-sizes", "2", "--rounds", "1", *QUICK, "--out", out, "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    rows = {s["backend"]: s["batches"][0] for s in doc["results"]["settings"]}
    assert rows["torch"]["speedup_vs_torch_fp32"] == pytest.approx(1.0)
    assert rows["onnxruntime"]["speedup_vs_torch_fp32"] > 0
    assert rows["onnxruntime"]["percent_of_peak"] > 0
    assert doc["results"]["peak"]["fp32"]["ops_per_s"] > 0


@pytest.mark.slow
def test_accuracy_pairs_precisions_on_one_episode_list(bundle: Path, tmp_path: Path) -> None:
    data = make_class_folders(
        tmp_path / "data" / "test", ("red", "green", "blue", "yellow"), per_class=5
    )
    cache = tmp_path / "cache"
    args = (
        "accuracy", "--bundle", bundle, "--data", data.parent, "--split", "test",
        "--ways", "2,3", "--shots", "1,2", "--queries", "2", "--episodes", "6",
        "--precisions", "fp32,int8-cpu", "--head", "centroid", "--cache", cache,
    )  # fmt: skip
    res = run(*args, "--out", tmp_path / "a", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)["results"]
    assert len(doc["rows"]) == 2 * 2 * 2 and doc["episodes"] == 6
    for row in doc["rows"]:
        assert 0.0 <= row["accuracy"] <= 100.0
        if row["precision"] == "int8-cpu":
            # The test bundle's int8-cpu graph is the fp32 one: same episodes, same features.
            assert row["diff_vs_reference"] == 0.0 and row["diff_ci95"] == 0.0
        assert row["cached"] is False
    assert len(list(cache.glob("*.npy"))) == 2  # one feature file per variant
    again = run(*args[:-4], "--head", "fc", "--cache", cache, "--out", tmp_path / "b", "--json")
    assert again.returncode == 0, again.stderr
    redo = json.loads(again.stdout)["results"]
    assert redo["head"] == "mtl" and all(r["cached"] for r in redo["rows"])  # "fc" is an alias
    cmp = run("compare", tmp_path / "a" / "accuracy.json", tmp_path / "b" / "accuracy.json")
    assert cmp.returncode == 0, cmp.stderr
    assert "| onnxruntime | fp32 | 2 | 1 |" in cmp.stdout


def test_accuracy_too_few_classes_is_one_line(bundle: Path, tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data" / "test", ("red", "green"), per_class=5)
    res = run(
        "accuracy", "--bundle", bundle, "--data", data.parent, "--ways", "5",
        "--shots", "1", "--episodes", "2",
    )  # fmt: skip
    assert res.returncode != 0
    assert "fewer than --ways 5" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_enroll_stage_times(bundle: Path, tmp_path: Path) -> None:
    images = make_class_folders(tmp_path / "imgs", ("red", "green", "blue"), per_class=3)
    res = run(
        "enroll", "--bundle", bundle, "--images", images, "--classes", "3", "--shots", "2",
        "--backend", "onnxruntime", "--min-time", "0.02", "--min-runs", "3",
        "--out", tmp_path / "e", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)["results"]
    assert doc["images"] == 6
    assert set(doc["stages_s"]) == {"decode", "preprocess", "extract", "head_fit"}
    assert all(v >= 0 for v in doc["stages_s"].values())
    assert doc["enroll_total_s"] == pytest.approx(sum(doc["stages_s"].values()), rel=1e-6)
    assert doc["predict"]["runs"] >= 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("latency", "--backends", "nosuch", "--random", "--backbone", "conv4"), "--backends"),
        (("latency", "--precisions", "int4", "--random", "--backbone", "conv4"), "--precisions"),
        (("latency", "--batch-sizes", "1,x", "--random", "--backbone", "conv4"), "--batch-sizes"),
        (("latency", "--random"), "--backbone"),
        (("latency", "--random", "--backbone", "conv4", "--backbone-arg", "w"), "KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line(args: tuple[str, ...], needle: str) -> None:
    res = run(*args)
    assert res.returncode != 0
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_only_unavailable_backends_is_one_line(bundle: Path) -> None:
    res = run("latency", "--bundle", bundle, "--backends", "tensorrt", "--no-peak", *QUICK)
    assert res.returncode != 0
    assert "no backend could run" in res.stderr and "tensorrt" in res.stderr
    assert "Traceback" not in res.stderr


def test_accuracy_lists_a_missing_variant_as_skipped(bundle: Path, tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data" / "test", ("red", "green"), per_class=3)
    res = run(
        "accuracy", "--bundle", bundle, "--data", data.parent, "--ways", "2", "--shots", "1",
        "--queries", "1", "--episodes", "2", "--precisions", "fp32,fp16", "--head", "centroid",
        "--out", tmp_path / "a", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)["results"]
    assert {r["precision"] for r in doc["rows"]} == {"fp32"}
    (skip,) = doc["skipped"]
    assert skip["precision"] == "fp16" and "fp16" in skip["reason"]
