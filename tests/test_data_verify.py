"""`mtl-edge data verify` and `data episodes`: layouts, checksums, corrupt files, duplicates."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl_edge import cli
from mtl_edge.data.checks import read_sums
from mtl_edge.data.episodes import load_episodes
from mtl_edge.data.verify import detect_layout, verify_dataset
from mtl_edge.errors import DatasetError


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _image(path: Path, seed: int, size: tuple[int, int] = (10, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _dataset(root: Path) -> Path:
    """<root>/data/{train,val}/<class>/<i>.png, 3 + 2 classes x 3 images, all distinct."""
    seed = 0
    for split, classes in (("train", 3), ("val", 2)):
        for c in range(classes):
            for i in range(3):
                _image(root / "data" / split / f"{split}{c}" / f"{i}.png", seed)
                seed += 1
    return root / "data"


def _write_sums(folder: Path) -> Path:
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder)}"
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return folder / "SHA256SUMS"


def test_clean_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path)
    report = verify_dataset(root, workers=1, progress=False)
    assert report.ok and report.layout == "splits"
    assert report.splits["train"].classes == 3 and report.splits["train"].images == 9
    assert report.splits["val"].classes == 2 and report.splits["val"].images == 6
    assert report.splits["val"].sizes == {"10x8": 6} and report.splits["val"].modes == {"RGB": 6}
    assert report.checksums["file"] is None and not report.duplicates
    code, out, _ = run(capsys, "data", "verify", str(root))
    assert code == 0
    assert "train: 3 classes, 9 images (3 per class)" in out and out.rstrip().endswith("OK")


def test_sums_in_parent_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path)
    sums = _write_sums(tmp_path)  # entries are "data/train/...", relative to tmp_path
    report = verify_dataset(root, workers=1, progress=False)
    assert report.ok and report.checksums["file"] == str(sums)
    assert report.checksums["checked"] == 15 and report.checksums["mismatched"] == []
    # A changed file, a listed file that is gone, a new file that is not listed.
    _image(root / "train" / "train0" / "0.png", 99)
    (root / "val" / "val1" / "2.png").unlink()
    _image(root / "val" / "val1" / "new.png", 123)
    code, out, _ = run(capsys, "data", "verify", str(root), "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert data["checksums"]["mismatched"] == [str(root / "train" / "train0" / "0.png")]
    assert data["checksums"]["missing"] == [str(root / "val" / "val1" / "2.png")]
    assert data["checksums"]["unlisted"] == 1
    # --no-hash skips the comparison: the remaining data is fine.
    code, _, _ = run(capsys, "data", "verify", str(root), "--no-hash")
    assert code == 0


def test_sums_star_format_and_bad_line(tmp_path: Path) -> None:
    (tmp_path / "SHA256SUMS").write_text(f"{'a' * 64} *sub/x.png\n\n")
    assert read_sums(tmp_path / "SHA256SUMS") == {tmp_path / "sub" / "x.png": "a" * 64}
    (tmp_path / "SHA256SUMS").write_text("nonsense\n")
    with pytest.raises(DatasetError, match="SHA256SUMS:1: expected"):
        read_sums(tmp_path / "SHA256SUMS")
    (tmp_path / "SHA256SUMS").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DatasetError, match="cannot read checksum file"):
        read_sums(tmp_path / "SHA256SUMS")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_images_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    root = _dataset(tmp_path)
    bad = root / "val" / "val0" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"hello", "empty": b""}[damage])
    report = verify_dataset(root, workers=1, progress=False)
    assert not report.ok
    assert [c["path"] for c in report.corrupt] == [str(bad)]
    assert report.splits["val"].images == 6  # still counted, but listed as corrupt
    code, out, _ = run(capsys, "data", "verify", str(root))
    assert code == 1 and f"error: {bad}" in out and "FAILED" in out


def test_decompression_bomb_reported(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    big = _image(root / "train" / "train1" / "big.png", 7, size=(300, 200))
    report = verify_dataset(root, workers=1, progress=False, max_pixels=10_000)
    assert [c["path"] for c in report.corrupt] == [str(big)]
    assert "over the limit" in report.corrupt[0]["error"]


def test_unusual_modes_are_fine(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (root / "a").mkdir(parents=True)
    Image.fromarray(rgb).convert("CMYK").save(root / "a" / "c.jpg")
    Image.fromarray(rgb).convert("P").save(root / "a" / "p.png")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "a" / "g16.png")
    report = verify_dataset(root, workers=1, progress=False)
    assert report.ok and report.layout == "classes"
    assert set(report.splits["modes"].modes) == {"CMYK", "P", "I;16"}


def test_duplicates_are_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path)
    shutil.copy(root / "train" / "train0" / "0.png", root / "val" / "val0" / "dup.png")
    shutil.copy(root / "train" / "train1" / "0.png", root / "train" / "train2" / "dup.png")
    shutil.copy(root / "train" / "train1" / "1.png", root / "train" / "train1" / "dup.png")
    report = verify_dataset(root, workers=1, progress=False)
    assert report.ok
    kinds = sorted(d["kind"] for d in report.duplicates)
    assert kinds == ["across classes", "across splits", "within a class"]
    across = next(d for d in report.duplicates if d["kind"] == "across splits")
    assert across["splits"] == ["train", "val"]
    code, out, _ = run(capsys, "data", "verify", str(root))
    assert code == 0 and out.count("warning: byte-identical images") == 3


def test_layout_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path)
    (root / "train" / "empty").mkdir()
    (root / "val" / "val0" / "notes.txt").write_text("x")
    (root / "val" / "val0" / ".hidden").write_text("x")
    report = verify_dataset(root, workers=1, progress=False)
    assert report.errors == [f"{root / 'train' / 'empty'}: class folder has no images"]
    assert report.warnings == [
        f"{root / 'val' / 'val0' / 'notes.txt'}: not an image by its extension, not read"
    ]
    code, _, err = run(capsys, "data", "verify", str(tmp_path / "missing"))
    assert (
        code == 1
        and err.strip() == f"error: {tmp_path / 'missing'}: no such folder; pass the dataset folder"
    )
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no train/val/test"):
        detect_layout(tmp_path / "flat")


def test_omniglot_layout(tmp_path: Path) -> None:
    for a in ("A", "B"):
        for c in ("character01", "character02"):
            for i in range(2):
                folder = tmp_path / "images_background" / a / c
                folder.mkdir(parents=True, exist_ok=True)
                bits = np.random.default_rng(i).random((6, 6)) > 0.5
                Image.fromarray(bits).convert("1").save(folder / f"{i}.png")
    report = verify_dataset(tmp_path, workers=1, progress=False, color_mode="L")
    assert report.layout == "omniglot" and report.ok
    assert report.splits["images_background"].classes == 4
    assert report.splits["images_background"].modes == {"1": 8}
    # Two characters drawn alike are byte-identical PNGs: reported, not fatal.
    assert report.duplicates


def test_process_pool(tmp_path: Path) -> None:
    """Enough files to use worker processes; the result equals the single-process one."""
    for i in range(70):
        _image(tmp_path / "d" / f"c{i % 5}" / f"{i}.png", i)
    (tmp_path / "d" / "c0" / "69.png").write_bytes(b"broken")
    one = verify_dataset(tmp_path / "d", workers=1, progress=False)
    two = verify_dataset(tmp_path / "d", workers=2, progress=False)
    assert one.to_dict() == two.to_dict()
    assert [c["path"] for c in two.corrupt] == [str(tmp_path / "d" / "c0" / "69.png")]


def test_episodes_command(
    class_folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "eps.json"
    code, out, err = run(
        capsys,
        "data",
        "episodes",
        str(class_folders),
        "--split",
        "train",
        "--ways",
        "3",
        "--shots",
        "1",
        "--queries",
        "2",
        "--episodes",
        "20",
        "--seed",
        "4",
        "--out",
        str(out_file),
        "--json",
    )
    assert code == 0, err
    stats = json.loads(out)
    assert stats["images_per_episode"] == 9 and stats["episodes"] == 20
    assert stats["classes_total"] == 4 and stats["classes_used"] == 4
    assert stats["class_appearances"]["mean"] == pytest.approx(20 * 3 / 4)
    assert 0 < stats["image_coverage"] <= 1
    episodes, meta = load_episodes(out_file)
    assert len(episodes) == 20 and meta["seed"] == 4 and meta["ways"] == 3
    assert meta["fingerprint"] == stats["fingerprint"] and meta["kind"] == "folders"
    code, text, _ = run(
        capsys,
        "data",
        "episodes",
        str(class_folders),
        "--split",
        "train",
        "--ways",
        "3",
        "--queries",
        "2",
        "--episodes",
        "20",
        "--seed",
        "4",
    )
    assert code == 0 and "20 episodes of 3-way 1-shot 2-query (seed 4)" in text
    code, _, err = run(capsys, "data", "episodes", str(class_folders), "--split", "train")
    assert code == 1 and "fewer than the 5 ways" in err
    (tmp_path / "unknown").mkdir()
    code, _, err = run(capsys, "data", "episodes", str(tmp_path / "unknown"), "--split", "train")
    assert code == 1 and "pass --kind" in err


def test_episodes_synthetic_with_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "data",
        "episodes",
        "synthetic",
        "--split",
        "test",
        "--episodes",
        "5",
        "--json",
        "-o",
        "test_classes=6",
        "-o",
        "size=16",
        "--option",
        "per_class=20",
    )
    assert code == 0, err
    stats = json.loads(out)
    assert stats["classes_total"] == 6 and stats["images_total"] == 120
    code, _, err = run(capsys, "data", "episodes", "synthetic", "-o", "size")
    assert code == 1 and "write KEY=VALUE" in err
    code, _, err = run(capsys, "data", "episodes", "synthetic", "-o", "colour=L")
    assert code == 1 and "unknown option(s) ['colour']" in err


@pytest.mark.shared_data
def test_real_miniimagenet_val_counts(shared_data: Path) -> None:
    """The val split of the real data: 16 x 600 images, checksums and decoding all pass."""
    root = shared_data / "miniimagenet" / "val"
    if not root.is_dir():
        pytest.skip("miniimagenet not in shared data")
    report = verify_dataset(root, progress=False)
    assert report.ok, report.errors[:3]
    assert report.splits["val"].classes == 16 and report.splits["val"].images == 9600
    assert report.splits["val"].sizes == {"84x84": 9600}
    assert report.checksums["checked"] == 9600 and report.checksums["mismatched"] == []
    assert report.duplicates == []


def _csv_for(root: Path, split: str, drop: int = 0) -> Path:
    rows = ["filename,label"]
    for p in sorted((root / split).rglob("*.png"))[drop:]:
        rows.append(f"{p.name},{p.parent.name}")
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root / "splits" / f"{split}.csv"


def test_split_files_cross_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path)
    _csv_for(root, "train")
    report = verify_dataset(root, workers=1, progress=False)
    assert report.ok and not report.warnings
    assert report.split_files["train"]["listed"] == 9
    assert report.split_files["train"]["not_in_csv"] == 0
    code, out, _ = run(capsys, "data", "verify", str(root))
    assert code == 0 and "9 images listed, the same as the folders" in out
    _csv_for(root, "val", drop=1)  # the CSV misses one image of the folders
    report = verify_dataset(root, workers=1, progress=False)
    assert report.ok and report.split_files["val"]["not_in_csv"] == 1
    assert any("lists 5 images, the val folders hold 6" in w for w in report.warnings)


def test_csv_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """images/ flat + splits/*.csv: the CSV decides splits and classes."""
    root = tmp_path / "mini"
    rows = ["filename,label"]
    for i in range(6):
        _image(root / "images" / f"n0{i % 2}_{i}.png", i)
        rows.append(f"n0{i % 2}_{i}.png,n0{i % 2}")
    (root / "splits").mkdir()
    (root / "splits" / "test.csv").write_text("\n".join(rows) + "\n")
    report = verify_dataset(root, workers=1, progress=False)
    assert report.ok and report.layout == "csv"
    assert report.splits["test"].classes == 2 and report.splits["test"].images == 6
    (root / "images" / "n01_3.png").unlink()
    code, out, _ = run(capsys, "data", "verify", str(root))
    assert code == 1 and "n01_3.png: listed in" in out
