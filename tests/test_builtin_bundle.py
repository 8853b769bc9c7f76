"""The built-in bundle: found, verified and used when neither --bundle nor MTL_EDGE_BUNDLE is
given; `info` shows it; the one committed in the repo is complete and within its size limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from device_fixtures import COLOURS, make_bundle, make_class_folders, make_image
from typer.testing import CliRunner

from mtl_edge import bundles
from mtl_edge.bundle import Bundle
from mtl_edge.cli import build_app
from mtl_edge.errors import ConfigError

pytest.importorskip("onnxruntime")

REPO_BUILTIN = Path(__file__).resolve().parents[1] / "mtl_edge" / "bundles" / "builtin"
MIB = 1 << 20


def cli(*args: str | Path):  # noqa: ANN201 - typer's Result
    """Run the real command tree in-process (the built-in path is monkeypatched)."""
    argv = [str(a) for a in args]
    return CliRunner().invoke(build_app(argv), argv)


@pytest.fixture
def fake_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bundle:
    """A tiny bundle standing in for the built-in one (the real one is a 64 px ResNet-12)."""
    bundle = make_bundle(tmp_path / "builtin")
    monkeypatch.setattr(bundles, "BUILTIN_DIR", bundle.root)
    monkeypatch.delenv("MTL_EDGE_BUNDLE", raising=False)
    return bundle


def test_resolve_prefers_the_given_bundle_and_falls_back_to_the_builtin(
    fake_builtin: Bundle, tmp_path: Path
) -> None:
    assert bundles.resolve_bundle(tmp_path / "mine") == tmp_path / "mine"
    assert bundles.resolve_bundle(None) == fake_builtin.root


def test_no_builtin_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundles, "BUILTIN_DIR", tmp_path / "absent")
    assert bundles.builtin_bundle() is None
    with pytest.raises(ConfigError, match="--bundle FOLDER or set MTL_EDGE_BUNDLE"):
        bundles.resolve_bundle(None)
    assert bundles.describe_builtin() == {"present": False}


def test_enroll_and_predict_without_bundle_use_the_builtin(
    fake_builtin: Bundle, tmp_path: Path
) -> None:
    photos = make_class_folders(tmp_path / "photos", ("red", "green", "blue"), per_class=3)
    gallery = tmp_path / "g.gallery"
    enrolled = cli("enroll", "--gallery", gallery, "--from-folder", photos)
    assert enrolled.exit_code == 0, enrolled.output
    about = cli("gallery", "info", gallery, "--json")
    assert json.loads(about.stdout)["model_id"] == fake_builtin.model_id
    query = make_image(tmp_path / "q.jpg", COLOURS["green"], seed=4242)
    predicted = cli("predict", "--gallery", gallery, query, "--threshold", "0", "--json")
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)[0]["label"] == "green"


def test_info_shows_the_builtin_and_a_failed_verification(fake_builtin: Bundle) -> None:
    shown = cli("info", "--json")
    entry = json.loads(shown.stdout)["builtin_bundle"]
    assert entry["present"] and entry["verified"] and entry["model_id"] == fake_builtin.model_id
    assert "fp32" in entry["variants"]
    text = cli("info").stdout
    assert f"model {fake_builtin.model_id[:12]}" in text
    onnx = fake_builtin.root / "backbone.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")  # tampered in place
    entry = bundles.describe_builtin()
    assert entry["present"] and not entry["verified"] and "sha256" in entry["error"]
    assert "FAILS verification" in cli("info").stdout


def test_export_writes_the_model_card_into_the_manifest(tmp_path: Path) -> None:
    from mtl_edge.commands.export import read_card

    card = tmp_path / "card.json"
    card.write_text(json.dumps({"accuracy": {"5-way 1-shot": {"mean": 50.0, "ci95": 0.4}}}))
    assert read_card(card)["accuracy"]["5-way 1-shot"]["mean"] == 50.0
    card.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        read_card(card)
    with pytest.raises(ConfigError, match="cannot read"):
        read_card(tmp_path / "none.json")


@pytest.mark.skipif(not REPO_BUILTIN.is_dir(), reason="this tree has no built-in bundle")
def test_the_committed_builtin_is_complete_and_small(tmp_path: Path) -> None:
    bundle = Bundle.load(REPO_BUILTIN)
    size = sum(f.stat().st_size for f in REPO_BUILTIN.iterdir())
    assert size <= 40 * MIB  # the limit; tests/test_lease.py keeps the tree in budget
    assert {"fp32", "int8-cpu"} <= set(bundle.variants)
    card = bundle.manifest["card"]
    assert {"commands", "accuracy", "data_terms"} <= set(card)
    int8 = bundle.manifest["quantization"]["int8-cpu"]["accuracy"]
    for shots in ("5way_1shot", "5way_5shot"):  # the paired INT8 - FP32 change, issue 16's goal
        mtl = int8[shots]["mtl"]
        assert mtl["episodes"] >= 2000 and abs(mtl["change"]) < 0.5
    copy = shutil.copytree(REPO_BUILTIN, tmp_path / "copy")
    Bundle.load(copy)  # verifies every hash
