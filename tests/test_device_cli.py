"""`mtl-edge enroll`, `predict` and `gallery` through the real CLI, and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from device_fixtures import COLOURS, make_bundle, make_class_folders, make_image

pytest.importorskip("onnxruntime")


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def assert_one_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert needle in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    bundle = make_bundle(tmp_path / "bundle").root
    photos = make_class_folders(tmp_path / "photos", ("red", "green", "blue"), per_class=4)
    return {"bundle": bundle, "photos": photos, "gallery": tmp_path / "shop.gallery"}


def test_enroll_predict_and_gallery_round_trip(env: dict[str, Path], tmp_path: Path) -> None:
    b, g, photos = env["bundle"], env["gallery"], env["photos"]
    common = ("--bundle", b, "--gallery", g, "--backend", "onnxruntime-cpu", "--threads", "1")
    result = run("enroll", *common, "--from-folder", photos, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["enrolled"] == {"blue": 4, "green": 4, "red": 4} and data["classes"] == 3
    assert data["provider"] == "CPUExecutionProvider"
    yellow = [make_image(tmp_path / "y" / f"{i}.jpg", COLOURS["yellow"], seed=i) for i in range(3)]
    result = run("enroll", *common, "--class", "yellow", *yellow)
    assert result.returncode == 0, result.stderr
    assert "enrolled 'yellow': 3 images" in result.stdout

    queries = [
        make_image(tmp_path / "q" / f"{name}.jpg", COLOURS[name], seed=500 + i)
        for i, name in enumerate(("red", "green", "blue", "yellow"))
    ]
    result = run("predict", *common, *queries, "--top-k", "2", "--threshold", "0", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["label"] for r in rows] == ["red", "green", "blue", "yellow"]
    assert all(len(r["top_k"]) == 2 and r["known"] for r in rows)
    result = run("predict", *common, queries[0], "--threshold", "1")
    assert result.returncode == 0 and ": unknown (" in result.stdout

    result = run("gallery", "rename", g, "red", "tomato")
    assert result.returncode == 0, result.stderr
    assert run("gallery", "remove", g, "green").returncode == 0
    assert run("gallery", "threshold", g, "0.4").returncode == 0
    listing = json.loads(run("gallery", "list", g, "--json").stdout)
    assert [c["name"] for c in listing["classes"]] == ["blue", "tomato", "yellow"]
    info = json.loads(run("gallery", "info", g, "--json").stdout)
    assert info["threshold"] == 0.4 and info["threshold_mode"] == "manual"
    assert info["previous_copy"] is not None and info["examples"] == 11
    assert info["rejection"] == "cosine"  # new galleries
    switched = json.loads(run("gallery", "rejection", g, "probability", "--json").stdout)
    assert (switched["rejection"], switched["mode"]) == ("probability", "auto")
    assert "rejection probability" in run("gallery", "info", g).stdout


def test_bad_input_gives_one_error_line(env: dict[str, Path], tmp_path: Path) -> None:
    b, g, photos = env["bundle"], env["gallery"], env["photos"]
    common = ("--bundle", b, "--gallery", g, "--backend", "onnxruntime-cpu")
    assert_one_error(run("enroll", *common, "--class", "x", tmp_path / "missing.jpg"), "no such")
    assert_one_error(run("enroll", *common, "--class", "x"), "list the image files")
    assert_one_error(
        run("enroll", *common, "--class", "x", "--from-folder", photos), "either --class"
    )
    assert_one_error(run("predict", *common, photos / "red" / "0.jpg"), "no such gallery")
    reds = sorted((photos / "red").glob("*.jpg"))
    assert run("enroll", *common, "--class", "red", *reds).returncode == 0
    assert_one_error(run("enroll", *common, "--class", "red", *reds), "already enrolled")
    assert_one_error(run("gallery", "remove", g, "dog"), "no class 'dog'")
    assert_one_error(run("predict", *common, photos / "red" / "0.jpg", "--top-k", "0"), "--top-k")
    assert_one_error(run("enroll", *common, "--precision", "bf16", "--class", "z", *reds), "bf16")
    assert_one_error(run("gallery", "threshold", g, "high"), "threshold 'high'")
    assert_one_error(run("gallery", "rejection", g, "energy"), "rejection 'energy'")
    from mtl_edge.backends import available_backends

    if available_backends()["tensorrt"] is not None:
        result = run("predict", "-b", b, "-g", g, reds[0], "--backend", "tensorrt")
        assert_one_error(result, "TensorRT is not usable here")
        assert result.returncode == 2
    before = g.read_bytes()
    assert run("gallery", "remove", g, "red").returncode == 0
    assert_one_error(run("predict", *common, reds[0]), "no classes enrolled")
    assert Path(str(g) + ".prev").read_bytes() == before


def test_tampered_bundle_is_one_line(env: dict[str, Path]) -> None:
    b = env["bundle"]
    with open(b / "backbone.onnx", "ab") as f:
        f.write(b"x")
    result = run("enroll", "-b", b, "-g", env["gallery"], "--from-folder", env["photos"])
    assert_one_error(result, "sha256 does not match")
    assert not env["gallery"].exists()


def test_damaged_gallery_error_then_restore(env: dict[str, Path]) -> None:
    b, g, photos = env["bundle"], env["gallery"], env["photos"]
    common = ("--bundle", b, "--gallery", g, "--backend", "onnxruntime-cpu")
    assert run("enroll", *common, "--class", "red", *(photos / "red").glob("*.jpg")).returncode == 0
    assert (
        run("enroll", *common, "--class", "blue", *(photos / "blue").glob("*.jpg")).returncode == 0
    )
    g.write_bytes(g.read_bytes()[:-50])
    assert_one_error(run("predict", *common, photos / "red" / "0.jpg"), "gallery restore")
    result = run("gallery", "restore", g)
    assert result.returncode == 0, result.stderr
    listing = json.loads(run("gallery", "list", g, "--json").stdout)
    assert [c["name"] for c in listing["classes"]] == ["red"]


def test_unreadable_image_in_folder_is_a_warning(env: dict[str, Path]) -> None:
    (env["photos"] / "red" / "bad.jpg").write_bytes(b"garbage")
    result = run(
        "enroll", "-b", env["bundle"], "-g", env["gallery"], "--from-folder", env["photos"]
    )
    assert result.returncode == 0, result.stderr
    assert "bad.jpg" in result.stderr and "error:" not in result.stderr
    assert "enrolled 'red': 4 images" in result.stdout
