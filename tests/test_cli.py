"""The CLI frame: lazy groups, placeholders, info, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtl_edge import cli


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_group() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for group in cli.GROUPS:
        assert group in result.stdout


def test_info_json_reports_cpu_and_backends() -> None:
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cpu"]["cores"] >= 1
    assert set(data["cpu"]["flags"]) >= {"avx512_vnni", "amx_int8"}
    assert "version" in data["onnxruntime"] and "missing_reason" in data["tensorrt"]


def test_help_imports_no_torch() -> None:
    code = (
        "import sys; from mtl_edge import cli; cli.build_app(['--help']); "
        "cli.build_app(['info']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_requested_group_skips_options() -> None:
    assert cli._requested_group(["-v", "data", "verify"]) == "data"
    assert cli._requested_group(["--help"]) is None


def test_group_missing_a_dependency_is_one_line_exit_2(monkeypatch, capsys) -> None:
    def load():  # what `from mtl_edge.commands import train` raises on a torch-free install
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setitem(cli.GROUPS, "train", (load, "Needs torch."))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "pretrain", "--recipe", "demo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs torch" in err and "mtl-edge[train]" in err


def test_user_error_is_one_line_without_traceback() -> None:
    result = run_cli("data", "verify", "/no/such/folder")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "/no/such/folder" in result.stderr


def test_dependency_missing_while_a_command_runs_is_one_line(monkeypatch, capsys) -> None:
    import types

    def register(app, name):
        @app.command(name=name)
        def run() -> None:
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

    module = types.SimpleNamespace(register=register)
    monkeypatch.setitem(cli.GROUPS, "export", (lambda: module, "Needs onnx."))
    with pytest.raises(SystemExit) as info:
        cli.main(["export"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs onnx" in err and "mtl-edge[train]" in err
