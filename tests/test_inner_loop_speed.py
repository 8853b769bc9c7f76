"""bench/inner_loop_speed.py runs both loops and reports a ratio per setting (no timing test)."""

from mtl_edge.bench.inner_loop_speed import measure


def test_both_loops_run_and_give_a_ratio() -> None:
    rows = measure(rounds=1, reps=1)
    assert [(r["inner_steps"], r["second_order"]) for r in rows] == [(20, True), (100, False)]
    assert all(r["batched_s"] > 0 and r["ratio_autograd_over_batched"] > 0 for r in rows)
