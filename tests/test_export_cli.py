"""`mtl-edge export CHECKPOINT ...` and `mtl-edge export check BUNDLE` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_fixtures import tiny_checkpoint

from mtl_edge.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cli") / "meta.pt")


def test_export_then_check_json(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    code, text, err = run(["export", str(ckpt), "--out", str(out), "--fp16", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(text)
    assert doc["bundle"] == str(out)
    assert doc["report"]["parity"]["pass"]
    assert set(doc["report"]["parity"]["batches"]) == {"1", "7", "32"}
    assert doc["report"]["parity"]["real"]["episodes"]["episodes"] == 200

    code, text, err = run(["export", "check", str(out), "--json"], capsys)
    assert code == 0, err
    result = json.loads(text)
    assert result["pass"] and set(result["variants"]) == {"fp32", "fp16"}
    assert result["model_id"] == doc["model_id"]


def test_export_text_report_and_check_text(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    code, text, err = run(["export", str(ckpt), "-o", str(out)], capsys)
    assert code == 0, err
    assert "parity onnxruntime vs torch: batch 1" in text
    assert "identical 5-way predictions in 200/200 episodes -> PASS" in text
    code, text, _ = run(["export", "check", str(out)], capsys)
    assert code == 0
    assert "hashes OK" in text and "check: PASS" in text and "init meta" in text


def test_check_refuses_tampered_bundle(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    assert run(["export", str(ckpt), "-o", str(out)], capsys)[0] == 0
    onnx_file = out / "backbone.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    code, text, err = run(["export", "check", str(out)], capsys)
    assert code == 1 and text == ""
    assert err.startswith("error: ") and "sha256" in err and err.count("\n") == 1


def test_existing_output_needs_force(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    code, _, err = run(["export", str(ckpt), "--out", str(out)], capsys)
    assert code == 1 and "already exists" in err and "--force" in err
    assert err.count("\n") == 1
    code, _, err = run(["export", str(ckpt), "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "check", "B", "--out", "x"], "--out is an option of `mtl-edge export"),
        (["export", "check"], "usage: mtl-edge export check BUNDLE"),
        (["export", "a.pt", "b.pt", "--out", "x"], "expected one CHECKPOINT"),
        (["export", "a.pt"], "--out BUNDLE is required"),
        (["export", "a.pt", "--out", "x", "--calib", "d"], "--calib is only used with --int8"),
        (["export", "check", "nowhere"], "no such bundle folder"),
    ],
)
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(args, capsys)
    assert code == 1
    assert message in err and err.count("\n") == 1


def test_bad_checkpoint_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    code, _, err = run(["export", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "not a readable" in err and err.count("\n") == 1
    import torch

    state = torch.load(tiny_checkpoint(tmp_path / "ok.pt"), weights_only=True)["state_dict"]
    state["blocks.1.conv2.conv.ss_shift"] *= float("inf")
    nan_ckpt = tiny_checkpoint(tmp_path / "nan.pt", state_dict=state)
    code, _, err = run(["export", str(nan_ckpt), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "non-finite" in err and err.count("\n") == 1


def test_tensorrt_missing_exits_2(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    else:
        pytest.skip("TensorRT is installed here")
    code, _, err = run(["export", str(ckpt), "--out", str(tmp_path / "o"), "--tensorrt"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "TensorRT" in err or "GPU" in err


def test_help_shows_both_forms(capsys: pytest.CaptureFixture[str]) -> None:
    code, text, _ = run(["export", "--help"], capsys)
    assert code == 0
    assert "export check BUNDLE" in text and "--calib" in text


def test_check_runs_without_torch(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`export check` is for devices too: it must not need torch or onnx."""
    import subprocess
    import sys

    out = tmp_path / "bundle"
    assert run(["export", str(ckpt), "-o", str(out)], capsys)[0] == 0
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
        "from mtl_edge.cli import main\n"
        f"main(['export', 'check', {str(out)!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "check: PASS" in done.stdout
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mtl_edge.cli import main\n"
        f"main(['export', {str(ckpt)!r}, '--out', {str(tmp_path / 'x')!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert "needs torch" in done.stderr and done.stderr.count("\n") == 1


def test_eval_folder_is_used(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mtl_edge.data.synthetic import make_synthetic_split, write_class_folders

    evald = write_class_folders(make_synthetic_split(6, 16, 20, seed=4), tmp_path / "eval")
    out = tmp_path / "bundle"
    code, text, err = run(
        ["export", str(ckpt), "-o", str(out), "--eval", str(evald), "--json"]
        + ["--eval-per-class", "12"],
        capsys,
    )
    assert code == 0, err
    real = json.loads(text)["report"]["parity"]["real"]
    assert real["data"] == "eval" and real["images"] == 6 * 12


def test_check_unloadable_variant(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from mtl_edge.bundle import Bundle

    out = tmp_path / "bundle"
    assert run(["export", str(ckpt), "-o", str(out), "--fp16"], capsys)[0] == 0
    # Consistent hashes but a file onnxruntime cannot read.
    Bundle.load(out).add_files({"backbone.fp16.onnx": b"not onnx"}, {})
    code, _, err = run(["export", "check", str(out)], capsys)
    assert code == 1 and "onnxruntime cannot load it" in err and err.count("\n") == 1


def test_check_static_batch_graph(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from device_fixtures import make_bundle

    make_bundle(tmp_path / "b", static_batch=4)
    code, _, err = run(["export", "check", str(tmp_path / "b")], capsys)
    assert code == 1 and "onnxruntime fails on inputs" in err and err.count("\n") == 1
