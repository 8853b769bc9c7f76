"""`mtl-edge demo --quick`: every stage runs and the few-shot accuracy is well above chance."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl_edge.commands.demo import default_stages, run_demo, summary_lines

CHANCE = 20.0  # 5-way


@pytest.mark.slow
def test_quick_demo_beats_chance(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", quick=True)
    names = [name for name, _ in default_stages()]
    assert list(result["seconds"]) == names
    table = result["metatest"]["results"]
    for head in ("mtl", "centroid"):
        assert table["5"][head]["mean"] > 1.5 * CHANCE, table
        assert table["1"][head]["mean"] > CHANCE + 5, table
    assert result["meta"]["hard_tasks"]["events"] > 0
    if "device" in result:
        for precision in ("fp32", "int8-cpu"):
            assert result["device"][precision]["accuracy"] > 1.5 * CHANCE, result["device"]
    text = "\n".join(summary_lines(result))
    assert "5-shot mtl" in text


def test_stages_are_a_list_that_can_be_extended(tmp_path: Path) -> None:
    calls: list[str] = []

    def first(ctx) -> dict:
        calls.append("first")
        return {"value": 1}

    def second(ctx) -> dict:
        calls.append("second")
        return {"twice": ctx.results["first"]["value"] * 2}

    result = run_demo(tmp_path, quick=True, stages=[("first", first), ("second", second)])
    assert calls == ["first", "second"] and result["second"] == {"twice": 2}
