"""`mtl-edge bench compare A.json B.json`: two reports of the same kind side by side."""

from __future__ import annotations

from typing import Any

from mtl_edge.errors import ConfigError


def _latency_rows(doc: dict[str, Any]) -> dict[tuple[str, ...], float]:
    return {
        (s["backend"], s["precision"], str(b["batch"])): b["median_ms"]
        for s in doc["results"].get("settings", [])
        for b in s["batches"]
    }


def _accuracy_rows(doc: dict[str, Any]) -> dict[tuple[str, ...], float]:
    return {
        (r["backend"], r["precision"], f"{r['ways']}-way {r['shots']}-shot"): r["accuracy"]
        for r in doc["results"].get("settings", [])
    }


def _enroll_rows(doc: dict[str, Any]) -> dict[tuple[str, ...], float]:
    res = doc["results"]
    rows = {(k,): v * 1e3 for k, v in res.get("stages_s", {}).items()}
    if "predict_one" in res:
        rows[("predict one (median)",)] = res["predict_one"]["median_ms"]
    return rows


ROWS = {"latency": _latency_rows, "accuracy": _accuracy_rows, "enroll": _enroll_rows}
KEYS = {
    "latency": ["backend", "precision", "batch"],
    "accuracy": ["backend", "precision", "setting"],
    "enroll": ["stage"],
}
VALUE = {"latency": "median ms", "accuracy": "accuracy %", "enroll": "ms"}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Rows present in either report with both values and b / a.

    Returns:
        {"kind", "machines": [a, b], "columns": [...], "rows": [{"key": [...], "a", "b",
        "ratio"}]}; a value is None where that report lacks the row.

    Raises:
        ConfigError: reports of different kinds.
    """
    if a["kind"] != b["kind"]:
        raise ConfigError(
            f"bench compare: a {a['kind']} report and a {b['kind']} report; compare two of one kind"
        )
    kind = a["kind"]
    ra, rb = ROWS[kind](a), ROWS[kind](b)
    rows = []
    for key in list(ra) + [k for k in rb if k not in ra]:
        va, vb = ra.get(key), rb.get(key)
        ratio = vb / va if va and vb is not None else None
        rows.append({"key": list(key), "a": va, "b": vb, "ratio": ratio})
    return {
        "kind": kind,
        "machines": [a.get("machine"), b.get("machine")],
        "created": [a.get("created"), b.get("created")],
        "columns": KEYS[kind],
        "value": VALUE[kind],
        "rows": rows,
    }


def to_markdown(cmp: dict[str, Any]) -> str:
    """The comparison as a Markdown table (ratio = B / A)."""

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    v = cmp["value"]
    lines = [
        f"A: {cmp['machines'][0]} ({cmp['created'][0]})",
        f"B: {cmp['machines'][1]} ({cmp['created'][1]})",
        "",
        "| " + " | ".join([*cmp["columns"], f"A {v}", f"B {v}", "B / A"]) + " |",
        "|" + "---|" * (len(cmp["columns"]) + 3),
    ]
    for r in cmp["rows"]:
        lines.append("| " + " | ".join([*r["key"], f(r["a"]), f(r["b"]), f(r["ratio"])]) + " |")
    return "\n".join(lines) + "\n"
