"""`mtl-edge bench openset` on a tiny ONNX bundle and synthetic class folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from device_fixtures import COLOURS, make_bundle, make_class_folders

from mtl_edge.bench.openset import (
    CUTS,
    RULES,
    OpenSetConfig,
    auroc,
    draw_episodes,
    roc_curve,
    run_openset,
)
from mtl_edge.bench.report import load_report
from mtl_edge.data.folders import read_class_folders
from mtl_edge.errors import MtlEdgeError

pytest.importorskip("onnxruntime")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    bundle = tmp_path / "bundle"
    make_bundle(bundle)
    data = make_class_folders(tmp_path / "photos", tuple(COLOURS), per_class=6)
    return bundle, data


def _cfg(bundle: Path, data: Path, **kw) -> OpenSetConfig:
    base = dict(split=None, episodes=4, enrolled=3, unknown=2, shots=3, queries=3, seed=1)
    return OpenSetConfig(bundle=bundle, data=data, **{**base, **kw})


def test_auroc_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    known, unknown = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 30).round(1)
    pairs = known[:, None] - unknown[None, :]
    expected = np.mean(pairs > 0) + 0.5 * np.mean(pairs == 0)
    assert auroc(known, unknown) == pytest.approx(expected)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0
    roc = roc_curve(known, unknown)
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    assert np.all(np.diff(roc["tpr"]) >= 0)


def test_episodes_enroll_the_first_classes_and_query_all(setup) -> None:
    bundle, data = setup
    cfg = _cfg(bundle, data)
    episodes = draw_episodes(cfg, read_class_folders(data))
    assert len(episodes) == 4
    assert all(e.ways == 5 and e.shots == 3 and e.queries == 3 for e in episodes)
    assert draw_episodes(cfg, read_class_folders(data))[2].query.tolist() == (
        episodes[2].query.tolist()
    )
    with pytest.raises(MtlEdgeError, match="fewer than"):
        draw_episodes(_cfg(bundle, data, enrolled=5, unknown=3), read_class_folders(data))


def test_run_measures_every_rule_and_matches_the_gallery(setup, tmp_path: Path) -> None:
    bundle, data = setup
    cfg = _cfg(bundle, data, cache=tmp_path / "cache")
    res = run_openset(cfg)
    (block,) = res["blocks"]
    assert block["cached"] is False
    assert {(r["rule"], r["cut"]) for r in block["rows"]} == {(r, c) for r in RULES for c in CUTS}
    rows = {(r["rule"], r["cut"]): r for r in block["rows"]}
    for row in block["rows"]:
        assert 0 <= row["auroc"] <= 100 and 0 <= row["known_accepted"] <= 100
        assert row["balanced"] == pytest.approx(
            (row["known_accepted"] + row["unknown_rejected"]) / 2
        )
    # Gallery.predict's own verdicts are the balanced rows of the gallery's rules
    for rule, verdict in block["device"].items():
        assert verdict["known_accepted"] == pytest.approx(
            rows[(rule, "balanced")]["known_accepted"]
        )
        assert verdict["unknown_rejected"] == pytest.approx(
            rows[(rule, "balanced")]["unknown_rejected"]
        )
    ref = rows[("probability", "balanced")]
    assert ref["balanced_diff"] == 0.0 and ref["auroc_diff"] == 0.0
    again = run_openset(cfg)
    assert again["blocks"][0]["cached"] is True
    assert again["blocks"][0]["rows"] == block["rows"]


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mtl_edge.cli", "bench", "openset", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_writes_json_markdown_and_plot(setup, tmp_path: Path) -> None:
    bundle, data = setup
    out = tmp_path / "report"
    args = ["--bundle", bundle, "--data", data, "--split", "", "--episodes", "2"]
    args += ["--enrolled", "3", "--unknown", "2", "--shots", "3", "--queries", "3"]
    result = _cli(*args, "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kind"] == "openset"
    report = load_report(out / "openset.json")
    assert report["results"]["episodes"] == 2
    assert "| cosine | balanced |" in (out / "openset.md").read_text()
    assert (out / "openset.png").read_bytes()[:4] == b"\x89PNG"
    bad = _cli(*args, "--precisions", "fp64", "--out", tmp_path / "bad")
    assert bad.returncode != 0 and "--precisions" in bad.stderr
