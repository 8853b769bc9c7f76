"""Benchmark statistics on inputs whose answers are known by hand, and the timing loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mtl_edge.bench.timing import TimingBudget, measure
from mtl_edge.errors import ConfigError
from mtl_edge.stats import Z95, latency_summary, mean_ci, paired_difference, percentile


def test_percentile_interpolates_linearly() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)  # rank 0.9 * 4 = 3.6
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_mean_ci_matches_hand_computation() -> None:
    values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # mean 5, sample std sqrt(32/7)
    mean, half = mean_ci(values)
    assert mean == 5.0
    assert half == pytest.approx(Z95 * math.sqrt(32 / 7) / math.sqrt(8))
    assert mean_ci([3.0]) == (3.0, 0.0)


def test_paired_difference_cancels_shared_variance() -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(20, 100, size=500)  # per-episode difficulty, shared by both
    ref = difficulty
    other = difficulty - 0.3 + rng.normal(0, 0.1, size=500)
    diff, half = paired_difference(ref, other)
    assert diff == pytest.approx(-0.3, abs=0.02)
    _, unpaired_half = mean_ci(other)
    assert half < unpaired_half / 50  # pairing removes the difficulty spread
    assert diff - half < -0.3 < diff + half
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_paired_difference_exact() -> None:
    diff, half = paired_difference([1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0])
    # differences 0, -1, 0, 1: mean 0, sample std sqrt(2/3)
    assert diff == 0.0
    assert half == pytest.approx(Z95 * math.sqrt(2 / 3) / 2)


def test_latency_summary_fields() -> None:
    s = latency_summary([0.001, 0.002, 0.003, 0.004, 0.010], batch_size=4)
    assert s["runs"] == 5
    assert s["min_ms"] == pytest.approx(1.0)
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["mean_ms"] == pytest.approx(4.0)
    assert s["p99_ms"] == pytest.approx(9.76)
    assert s["throughput_ips"] == pytest.approx(4 / 0.003)


def test_measure_reaches_runs_and_time() -> None:
    calls = []
    budget = TimingBudget(warmup_s=0.0, warmup_runs=2, min_time_s=0.0, min_runs=7)
    times = measure(lambda: calls.append(1), budget)
    assert len(times) == 7 and len(calls) == 9  # 2 warm-up + 7 timed
    split = TimingBudget(min_time_s=3.0, min_runs=100).split(3)
    assert split.min_runs == 34 and split.min_time_s == pytest.approx(1.0)


def test_budget_rejects_bad_values() -> None:
    with pytest.raises(ConfigError):
        TimingBudget(min_runs=0)
    with pytest.raises(ConfigError):
        TimingBudget(min_time_s=-1)


def test_flops_counters_agree_on_a_known_model(tmp_path: Path) -> None:
    """Conv 3->4 (3x3, pad 1) on 8x8 = 256 outputs x 27 MACs, then linear 4->2 = 8 MACs."""
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from mtl_edge.bench.machine import onnx_flops_per_image, torch_flops_per_image

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    expected = 2.0 * (256 * 27 + 8)
    assert torch_flops_per_image(model, (3, 8, 8)) == expected

    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    fc = numpy_helper.from_array(np.zeros((4, 2), np.float32), "fc")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [w, fc],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert onnx_flops_per_image(str(path), (3, 8, 8)) == expected
