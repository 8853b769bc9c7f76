"""The benchmark side of the GPU plan on the CPU: the GPU runners in dry-run mode, torch built
from a bundle's own weights, --settings parsing, the deadline, and the goals / report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from device_fixtures import make_bundle
from gpu_fixtures import make_registry_bundle

from mtl_edge.bench.latency import LatencyConfig, parse_settings, run_latency, settings_matrix
from mtl_edge.bench.timing import TimingBudget
from mtl_edge.errors import ConfigError, MtlEdgeError

QUICK = TimingBudget(warmup_s=0, warmup_runs=1, min_time_s=0.0, min_runs=2)


@pytest.fixture(scope="module")
def registry_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return make_registry_bundle(tmp_path_factory.mktemp("reg"))


def _spec(bundle: Path, backend: str, precision: str, **kw) -> dict:
    return {"backend": backend, "precision": precision, "bundle": str(bundle),
            "checkpoint": None, "shape": [3, 32, 32], "max_batch": 4, "batch_sizes": [1, 4],
            "dry_run": True, "threads": 1, **kw}  # fmt: skip


def test_settings_parse_modes_and_batch_subsets() -> None:
    s = parse_settings(["onnxruntime-cuda:fp16:compute+copies", "torch-compile:bf16@1/256"])
    assert s[0].modes == ("compute", "copies") and s[0].batch_sizes([1, 8]) == [1, 8]
    assert s[1].modes == ("compute",) and s[1].batch_sizes([1, 8]) == [1, 256]
    for bad, needle in (
        ("onnxruntime-cuda:bf16", "use one of fp32, fp16$"),
        ("onnxruntime:fp32:compute", "use host"),
        ("torch-cuda:fp32:host", "use compute or copies"),
        ("openvino:fp32", "--backends 'openvino'"),
        ("torch-cuda", "backend:precision"),
        ("torch-cuda:fp32@x", "whole numbers"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_settings([bad])
    matrix = settings_matrix(["torch-cuda-graphs", "onnxruntime-cuda"], ["fp32", "bf16"])
    assert {(m.backend, m.precision) for m in matrix} == {
        ("torch-cuda-graphs", "fp32"),
        ("torch-cuda-graphs", "bf16"),
        ("onnxruntime-cuda", "fp32"),
    }


def test_torch_from_the_bundle_computes_what_onnxruntime_computes(registry_bundle: Path) -> None:
    import onnxruntime as ort
    import torch

    from mtl_edge.bench.latency_torch_gpu import model_from_bundle
    from mtl_edge.bundle import Bundle

    model = model_from_bundle(registry_bundle)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        got = model.forward_features(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(
        str(Bundle.load(registry_bundle).variant_path()), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(got, session.run(None, {"images": x})[0], atol=1e-4)


def test_a_bundle_of_no_registry_backbone_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from mtl_edge.bench.latency_torch_gpu import model_from_bundle

    make_bundle(tmp_path / "b")
    with pytest.raises(MtlEdgeError, match="give --checkpoint C"):
        model_from_bundle(tmp_path / "b")


@pytest.mark.parametrize(
    ("backend", "precision"),
    [("torch-cuda", "fp32"), ("torch-cuda-graphs", "fp16"), ("torch-compile", "bf16")],
)
def test_torch_gpu_runner_dry_run(registry_bundle: Path, backend: str, precision: str) -> None:
    from mtl_edge.bench.latency_torch_gpu import TorchGpuRunner

    runner = TorchGpuRunner(_spec(registry_bundle, backend, precision))
    assert runner.info["torch_variant"] in runner.info["provider"]
    for mode in ("compute", "copies"):
        res = runner.run(4, mode, QUICK, warm=True)
        assert len(res["times"]) >= 2 and res["device_times"] is None  # no CUDA events here
    from mtl_edge.bundle import Bundle

    assert runner.probe().shape == (4, Bundle.load(registry_bundle).feature_dim)
    with pytest.raises(ConfigError, match="use compute or copies"):
        runner.run(1, "host", QUICK, warm=False)


def test_ort_cuda_runner_dry_run_modes_and_pipeline(registry_bundle: Path) -> None:
    from mtl_edge.bench.latency_ort_cuda import OrtCudaRunner

    runner = OrtCudaRunner(_spec(registry_bundle, "onnxruntime-cuda", "fp32", pipeline=8))
    assert runner.ext.buckets == [1, 4]  # the timed sizes themselves: nothing is padded
    pipe = runner.info["pipeline"]
    assert pipe["images"] == 8 and min(pipe["decode_ips"], pipe["gpu_ips"]) > 0
    for mode in ("compute", "copies"):
        assert len(runner.run(4, mode, QUICK, warm=True)["times"]) >= 2
    runs = runner.ext.slot(4).runs
    runner.run(4, "compute", QUICK, warm=False)
    assert runner.ext.slot(4).runs > runs


def test_a_reached_deadline_skips_with_the_reason(registry_bundle: Path, tmp_path: Path) -> None:
    cfg = LatencyConfig(
        bundle=registry_bundle, settings=["onnxruntime-cuda:fp32"], batch_sizes=[1],
        order="setting", deadline_s=0.0, dry_run=True, measure_peak=False, budget=QUICK,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="deadline of 0 s reached"):
        run_latency(cfg)


def test_goals_and_gpu_markdown_from_hand_made_rows(tmp_path: Path) -> None:
    from mtl_edge.bench import gpu_report
    from mtl_edge.bench.report import make_report, to_markdown, write_outputs

    def row(batch: int, ms: float) -> dict:
        return {"batch": batch, "runs": 10, "min_ms": ms, "mean_ms": ms, "median_ms": ms,
                "p90_ms": ms, "p95_ms": ms, "p99_ms": ms, "throughput_ips": batch / ms * 1e3,
                "achieved_flops_per_s": 7e9 * batch / ms * 1e3}  # fmt: skip

    settings = [
        {"backend": "onnxruntime-cuda", "precision": "fp16", "mode": "compute",
         "provider": "CUDAExecutionProvider", "probe": [[1.0, 0.0]],
         "batches": [row(1, 0.25), row(256, 40.0)]},
        {"backend": "torch-cuda-graphs", "precision": "fp16", "mode": "compute",
         "provider": "torch", "probe": [[1.0, 0.001]], "batches": [row(1, 0.5), row(256, 10.0)]},
    ]  # fmt: skip
    rate = {"tflops": 790.0, "n": 8192}
    peak = {"device": "H200", "matmul": {"bf16": rate, "fp16": rate}, "copy_gbps": 4300.0}
    results = {"settings": settings, "skipped": [], "peak": {}, "model": {}, "gpu_peak": peak}
    gpu_report.annotate(results)
    goals = results["goals"]
    assert goals["batch1_compute"]["met"] and goals["batch1_compute"]["ms"] == 0.25
    assert goals["throughput_compute"]["1"]["met"]  # 2x torch at batch 1
    assert not goals["throughput_compute"]["256"]["met"]  # a quarter of torch at batch 256
    assert settings[1]["probe_cosine_min"] > 0.99 and "probe" not in settings[0]
    assert settings[0]["batches"][1]["peak_used"] == "fp16"
    doc = make_report("latency", {}, results)
    md = to_markdown(doc)
    assert "| mode |" in md and "goal >= 0.5: NOT met" in md and "H200: matmul 8192^3" in md
    paths = write_outputs(doc, tmp_path, "latency")
    assert (tmp_path / "latency.png").stat().st_size > 0 and len(paths) == 3
