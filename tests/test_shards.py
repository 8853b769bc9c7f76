"""Tar shards: pack, read back identical bytes and labels, checksums, size limit."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mtl_edge import cli
from mtl_edge.data.folders import read_class_folders
from mtl_edge.data.registry import open_split
from mtl_edge.data.shards import pack_split, read_index, read_shards
from mtl_edge.data.synthetic import make_synthetic_split
from mtl_edge.data.verify import verify_dataset
from mtl_edge.errors import DatasetError, MtlEdgeError


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_round_trip_files(class_folders: Path, tmp_path: Path) -> None:
    split = read_class_folders(class_folders, "train")
    index = pack_split(split, tmp_path / "shards")
    assert index["num_samples"] == 24 and index["class_names"] == split.class_names
    assert [s["file"] for s in index["shards"]] == ["train-00000.tar"]
    back = read_shards(tmp_path / "shards")
    assert back.class_names == split.class_names
    assert back.labels.tolist() == split.labels.tolist()
    assert back.blobs == [p.read_bytes() for p in split.paths]  # original bytes, not re-encoded
    assert back.name == split.name and back.color_mode == "RGB"
    assert np.array_equal(np.asarray(back.image(7)), np.asarray(split.image(7)))
    with tarfile.open(tmp_path / "shards" / "train-00000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000.jpg", "000000.cls"]


def test_round_trip_arrays_and_rotations(tmp_path: Path) -> None:
    split = make_synthetic_split(3, 2, size=16, color_mode="L")
    split.rotations = np.array([0, 90, 180, 270, 0, 90])
    pack_split(split, tmp_path / "s")
    back = read_shards(tmp_path / "s")
    assert back.color_mode == "L" and back.rotations.tolist() == [0, 90, 180, 270, 0, 90]
    for i in range(len(split)):
        assert np.array_equal(np.asarray(back.image(i)), np.asarray(split.image(i)))


def test_size_limit_and_order(class_folders: Path, tmp_path: Path) -> None:
    split = read_class_folders(class_folders, "train")
    limit_mib = 0.03  # about 31 KB: several shards for 24 small JPEGs
    index = pack_split(split, tmp_path / "s", max_mib=limit_mib)
    assert len(index["shards"]) > 1
    assert sum(s["samples"] for s in index["shards"]) == 24
    for s in index["shards"]:
        size = (tmp_path / "s" / s["file"]).stat().st_size
        assert size == s["bytes"] <= limit_mib * 2**20
    back = read_shards(tmp_path / "s")
    assert back.blobs == [p.read_bytes() for p in split.paths]
    with pytest.raises(DatasetError, match="does not fit in a 0.001 MiB shard"):
        pack_split(split, tmp_path / "tiny", max_mib=0.001)
    assert not (tmp_path / "tiny").exists()  # nothing half-written
    with pytest.raises(DatasetError, match="must be positive"):
        pack_split(split, tmp_path / "zero", max_mib=0)


def test_identical_inputs_give_identical_shards(class_folders: Path, tmp_path: Path) -> None:
    split = read_class_folders(class_folders, "train")
    a = pack_split(split, tmp_path / "a")
    b = pack_split(split, tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_corrupt_shard_refused_by_name(class_folders: Path, tmp_path: Path) -> None:
    split = read_class_folders(class_folders, "train")
    index = pack_split(split, tmp_path / "s", max_mib=0.03)
    victim = tmp_path / "s" / index["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"{victim.name}: sha256 differs from index.json"):
        read_shards(tmp_path / "s")
    report = verify_dataset(tmp_path / "s", progress=False)
    assert not report.ok and report.checksums["mismatched"] == [str(victim)]
    victim.unlink()
    with pytest.raises(DatasetError, match=f"{victim.name}: shard listed in index.json is missing"):
        read_shards(tmp_path / "s")


def test_bad_index(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(DatasetError, match="not an mtl-edge shard index"):
        read_index(tmp_path)


def test_refuses_existing_output(class_folders: Path, tmp_path: Path) -> None:
    split = read_class_folders(class_folders, "train")
    pack_split(split, tmp_path / "s")
    with pytest.raises(MtlEdgeError, match="already exists"):
        pack_split(split, tmp_path / "s")
    pack_split(split.subset([0]), tmp_path / "s", force=True)
    assert read_index(tmp_path / "s")["num_samples"] == 6


def test_cli_pack_open_split_and_verify(
    class_folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "packed" / "train"
    code, text, err = run(
        capsys,
        "data",
        "pack",
        str(class_folders),
        "--split",
        "train",
        "--out",
        str(out),
        "--max-mib",
        "0.03",
    )
    assert code == 0, err
    assert "24 images of 4 classes in" in text
    split = open_split("shards", tmp_path / "packed", "train")
    assert len(split) == 24 and split.num_classes == 4
    assert len(open_split("shards", out, "train")) == 24  # the shard folder itself
    with pytest.raises(DatasetError, match="not of split 'val'"):
        open_split("shards", out, "val")
    code, text, _ = run(capsys, "data", "verify", str(out))
    assert code == 0 and "24 images (6 per class)" in text
    code, _, err = run(
        capsys, "data", "pack", str(class_folders), "--split", "train", "--out", str(out)
    )
    assert code == 1 and "already exists" in err
