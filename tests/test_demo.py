"""`mtl-edge demo --quick`: every stage runs and the few-shot accuracy is well above chance."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl_edge.workflows.demo import STAGE_FNS, run_demo, summary_lines

CHANCE = 20.0  # 5-way


@pytest.mark.slow
def test_quick_demo_beats_chance(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", quick=True)
    assert list(result["seconds"]) == list(STAGE_FNS)
    table = result["metatest"]["results"]
    for head in ("mtl", "centroid"):
        assert table["5"][head]["mean"] > 1.5 * CHANCE, table
        assert table["1"][head]["mean"] > CHANCE + 5, table
    assert result["hard_tasks"]["events"] > 0
    for precision in ("fp32", "int8-cpu"):
        assert result["device"][precision]["accuracy"] > 1.5 * CHANCE, result["device"]
    text = "\n".join(summary_lines(result))
    assert "5-shot mtl" in text and "device (int8-cpu" in text
    again = run_demo(tmp_path / "demo", quick=True)  # the demo folder is made afresh
    assert again["metatest"] == result["metatest"]
