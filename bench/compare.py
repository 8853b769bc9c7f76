"""`mtl-edge bench compare A.json B.json`: two reports of one kind side by side, with ratios."""

from __future__ import annotations

from typing import Any

from mtl_edge.errors import ConfigError


def _latency_rows(report: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {
        (s["backend"], s["precision"], b["batch"]): b
        for s in report["results"].get("settings", [])
        for b in s["batches"]
    }


def _accuracy_rows(report: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {
        (r["backend"], r["precision"], r["ways"], r["shots"]): r
        for r in report["results"].get("rows", [])
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Settings present in both reports with A's figure, B's figure and their ratio
    (latency: median ms and B / A; accuracy: percent and B - A in points). Settings found in
    only one report are listed under only_in_a / only_in_b.

    Raises:
        ConfigError: reports of different kinds, or of a kind without a comparison.
    """
    if a["kind"] != b["kind"]:
        raise ConfigError(
            f"bench compare: a {a['kind']} report and a {b['kind']} report; "
            "give two reports of the same kind"
        )
    if a["kind"] == "latency":
        ra, rb = _latency_rows(a), _latency_rows(b)
        rows = [
            {
                "backend": k[0],
                "precision": k[1],
                "batch": k[2],
                "a_median_ms": ra[k]["median_ms"],
                "b_median_ms": rb[k]["median_ms"],
                "ratio_b_over_a": rb[k]["median_ms"] / ra[k]["median_ms"],
            }  # fmt: skip
            for k in ra
            if k in rb
        ]
    elif a["kind"] == "accuracy":
        ra, rb = _accuracy_rows(a), _accuracy_rows(b)
        rows = [
            {
                "backend": k[0],
                "precision": k[1],
                "ways": k[2],
                "shots": k[3],
                "a_accuracy": ra[k]["accuracy"],
                "b_accuracy": rb[k]["accuracy"],
                "b_minus_a": rb[k]["accuracy"] - ra[k]["accuracy"],
            }  # fmt: skip
            for k in ra
            if k in rb
        ]
    else:
        raise ConfigError("bench compare: only latency and accuracy reports can be compared")
    return {
        "kind": a["kind"],
        "rows": rows,
        "only_in_a": [list(k) for k in ra if k not in rb],
        "only_in_b": [list(k) for k in rb if k not in ra],
    }


def compare_markdown(result: dict[str, Any], name_a: str, name_b: str) -> str:
    """The comparison as a Markdown table."""
    if result["kind"] == "latency":
        header = ["backend", "precision", "batch", f"A ms ({name_a})", f"B ms ({name_b})", "B/A"]
        body = [
            [r["backend"], r["precision"], str(r["batch"]), f"{r['a_median_ms']:.3f}",
             f"{r['b_median_ms']:.3f}", f"{r['ratio_b_over_a']:.2f}"]
            for r in result["rows"]
        ]  # fmt: skip
    else:
        header = ["backend", "precision", "ways", "shots", f"A % ({name_a})", f"B % ({name_b})",
                  "B-A"]  # fmt: skip
        body = [
            [r["backend"], r["precision"], str(r["ways"]), str(r["shots"]),
             f"{r['a_accuracy']:.2f}", f"{r['b_accuracy']:.2f}", f"{r['b_minus_a']:+.2f}"]
            for r in result["rows"]
        ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    for label, key in (("only in A", "only_in_a"), ("only in B", "only_in_b")):
        if result[key]:
            lines.append(f"{label}: " + "; ".join(" ".join(map(str, k)) for k in result[key]))
    return "\n".join(lines) + "\n"
