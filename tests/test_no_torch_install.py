"""The device side installs and runs without torch: wheel -> fresh venv with [cpu] -> CLI.

Builds the wheel from a copy of the sources (so that the shared working tree gets no build/
or egg-info), installs it with the `[cpu]` extra into a new venv that has no torch, and runs
`mtl-edge --help`, `mtl-edge info`, and an enroll + predict round trip on a tiny bundle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from device_fixtures import COLOURS, make_bundle, make_class_folders, make_image

REPO = Path(__file__).resolve().parents[1]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "mtl_edge",
    "train",
    "export",
    "bench",
    "workflows",
    "recipes",
)


def _run(cmd: list[str | Path], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{result.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_with_cpu_extra_runs_without_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnx")  # only to build the tiny test bundle here, not in the venv
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
            + [src, "-w", dist]
        )
    )
    wheel = next(dist.glob("mtl_edge-*.whl"))

    venv = tmp_path / "venv"
    created = _run([sys.executable, "-m", "venv", venv], timeout=300)
    if created.returncode != 0:
        pytest.skip(f"cannot create a venv here: {created.stderr.strip()[-300:]}")
    py, cli = venv / "bin" / "python", venv / "bin" / "mtl-edge"
    _ok(_run([py, "-m", "pip", "install", "-q", f"{wheel}[cpu]"]))

    no_torch = _run([py, "-c", "import torch"])
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    assert "enroll" in _ok(_run([cli, "--help"])).stdout
    info = json.loads(_ok(_run([cli, "info", "--json"])).stdout)
    assert info["torch"]["version"] is None and info["onnxruntime"]["version"]

    bundle = make_bundle(tmp_path / "bundle").root
    photos = make_class_folders(tmp_path / "photos", ("red", "green", "blue"), per_class=3)
    gallery = tmp_path / "g.gallery"
    common = ["--bundle", bundle, "--gallery", gallery]
    _ok(_run([cli, "enroll", *common, "--from-folder", photos]))
    query = make_image(tmp_path / "q.jpg", COLOURS["green"], seed=4242)
    rows = json.loads(
        _ok(_run([cli, "predict", *common, query, "--threshold", "0", "--json"])).stdout
    )
    assert rows[0]["label"] == "green"
    listing = json.loads(_ok(_run([cli, "gallery", "list", gallery, "--json"])).stdout)
    assert [c["name"] for c in listing["classes"]] == ["blue", "green", "red"]
    builtin = info["builtin_bundle"]
    assert builtin["present"] == (REPO / "mtl_edge" / "bundles" / "builtin").is_dir()
    if builtin["present"]:  # installed as package data, verified, and the default bundle
        assert builtin["verified"] and "site-packages" in builtin["path"]
        default = tmp_path / "default.gallery"
        _ok(_run([cli, "enroll", "--gallery", default, "--from-folder", photos]))
        about = json.loads(_ok(_run([cli, "gallery", "info", default, "--json"])).stdout)
        assert about["model_id"] == builtin["model_id"]
        _ok(_run([cli, "predict", "--gallery", default, query, "--json"]))
    check = "import sys, mtl_edge.enroller, mtl_edge.cli; print('torch' in sys.modules)"
    assert _ok(_run([py, "-c", check])).stdout.strip() == "False"
    if _run([py, "-c", "import cryptography"]).returncode != 0:  # [cpu] alone: no signing
        key = tmp_path / "some.pub"
        key.write_text("not needed: signing is unavailable before the key is read")
        signed = _run([cli, "predict", *common, query, "--require-signature", key])
        assert signed.returncode == 2 and signed.stderr.count("\n") == 1, signed.stderr
        assert "mtl-edge[sign]" in signed.stderr and "Traceback" not in signed.stderr
