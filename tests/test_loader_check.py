"""`mtl-edge train loader-check`: the device-resident loader against a fixed synthetic batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtl_edge.errors import ConfigError


def test_loader_check_cli(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from mtl_edge.commands.train import register

    app = typer.Typer()
    register(app, "train")
    args = [
        "train",
        "loader-check",
        "--backbone",
        "conv4",
        "--size",
        "16",
        "-o",
        "size=16",
        "-o",
        "per_class=8",
        "-o",
        "train_classes=4",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "lc.json"),
        "--json",
    ]
    got = CliRunner().invoke(app, args)
    assert got.exit_code == 0, got.output
    result = json.loads(got.output)
    assert result == json.loads((tmp_path / "lc.json").read_text())
    assert result["loader_images_per_s"] > 0 and result["synthetic_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["loader_images_per_s"] / result["synthetic_images_per_s"]
    )
    bad = CliRunner().invoke(app, ["train", "loader-check", "-o", "novalue"])
    assert isinstance(bad.exception, ConfigError)
