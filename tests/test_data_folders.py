"""Class-folder readers: layout, sorting, and every kind of bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl_edge.data.folders import read_class_folders, read_user_folder, validate_images
from mtl_edge.errors import DatasetError


def _jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return path


def _user_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for c in ("dog", "cat"):
        for i in range(2):
            _jpeg(root / c / f"{i}.jpg", seed=i)
    return root


def test_reads_split_sorted(class_folders: Path) -> None:
    split = read_class_folders(class_folders, "train")
    assert split.class_names == ["class0", "class1", "class2", "class3"]
    assert len(split) == 24
    assert split.labels.tolist() == sorted(split.labels.tolist())
    assert split.paths is not None
    assert [p.name for p in split.paths[:6]] == [f"{i}.jpg" for i in range(6)]
    assert split.name == f"{class_folders.name}/train"
    assert split.image(0).size == (24, 20)


def test_hidden_junk_and_case(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _jpeg(root / "a" / "x.JPG")
    _jpeg(root / "a" / ".hidden.jpg")
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "a" / "Thumbs.db").write_bytes(b"junk")
    _jpeg(root / ".trash" / "y.jpg")
    split = read_class_folders(root)
    assert split.class_names == ["a"]
    assert [p.name for p in split.paths] == ["x.JPG"]


def test_missing_root_and_split(tmp_path: Path, class_folders: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        read_class_folders(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"no such split folder \(found: train\)"):
        read_class_folders(class_folders, "val")
    file = tmp_path / "f.txt"
    file.write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        read_class_folders(file)


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        read_class_folders(tmp_path / "empty")
    _jpeg(tmp_path / "flat" / "a.jpg")
    with pytest.raises(DatasetError, match="holds 1 images directly"):
        read_class_folders(tmp_path / "flat")


def test_empty_class(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _user_folder(tmp_path)
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: class folder has no images"):
        read_class_folders(root)
    with caplog.at_level(logging.WARNING):
        split = read_class_folders(root, on_error="skip")
    assert split.class_names == ["cat", "dog"]
    assert "empty" in caplog.text
    for c in ("cat", "dog"):
        for f in (root / c).iterdir():
            f.unlink()
    with pytest.raises(DatasetError, match="no class folder holds any images"):
        read_class_folders(root, on_error="skip")


def test_non_image_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _user_folder(tmp_path)
    (root / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"notes\.txt: not an image by its extension"):
        read_class_folders(root)
    with caplog.at_level(logging.WARNING):
        split = read_class_folders(root, on_error="skip")
    assert len(split) == 4 and "notes.txt" in caplog.text


def test_folder_inside_class_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _user_folder(tmp_path)
    _jpeg(root / "cat" / "nested" / "z.jpg")
    with caplog.at_level(logging.WARNING):
        split = read_class_folders(root)
    assert len(split) == 4 and "nested" in caplog.text


def test_bad_on_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="on_error='ignore'"):
        read_class_folders(_user_folder(tmp_path), on_error="ignore")


def _bad_images(root: Path) -> dict[str, Path]:
    """Broken files in class 'cat' of `root`; returns them by kind."""
    good = (root / "cat" / "0.jpg").read_bytes()
    truncated = root / "cat" / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = root / "cat" / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    empty = root / "cat" / "empty.jpg"
    empty.write_bytes(b"")
    return {"truncated": truncated, "garbage": garbage, "empty": empty}


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_corrupt_image_named(tmp_path: Path, kind: str) -> None:
    root = _user_folder(tmp_path)
    bad = _bad_images(root)
    for other, path in bad.items():
        if other != kind:
            path.unlink()
    # Listing does not decode; validation does and names the file.
    assert len(read_class_folders(root)) == 5
    with pytest.raises(DatasetError, match=str(bad[kind].name)) as info:
        read_class_folders(root, validate=True)
    assert "\n" not in str(info.value)
    with pytest.raises(DatasetError, match=str(bad[kind].name)):
        read_user_folder(root)


def test_corrupt_images_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _user_folder(tmp_path)
    bad = _bad_images(root)
    with caplog.at_level(logging.WARNING):
        split = read_user_folder(root, on_error="skip")
    assert len(split) == 4
    for path in bad.values():
        assert path.name in caplog.text
        assert path not in split.paths


def test_class_of_only_corrupt_images_dropped(tmp_path: Path) -> None:
    root = _user_folder(tmp_path)
    (root / "bird").mkdir()
    (root / "bird" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="x.jpg"):
        read_user_folder(root)
    split = read_user_folder(root, on_error="skip")
    assert split.class_names == ["cat", "dog"]
    assert split.class_counts().tolist() == [2, 2]


def test_unusual_modes_decode(tmp_path: Path) -> None:
    """CMYK JPEG, palette PNG, 16-bit grey PNG and RGBA PNG all read as RGB (and as L)."""
    root = tmp_path / "modes"
    (root / "a").mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(root / "a" / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(root / "a" / "palette.png")
    Image.fromarray((np.arange(72).reshape(8, 9) * 900).astype(np.uint16)).save(
        root / "a" / "grey16.png"
    )
    Image.fromarray(np.dstack([rgb, np.full((8, 9), 128, np.uint8)])).save(root / "a" / "rgba.png")
    for mode in ("RGB", "L"):
        split = read_user_folder(root, color_mode=mode)
        assert len(split) == 4
        for i in range(4):
            img = split.image(i)
            assert img.mode == mode and img.size == (9, 8)
    grey = np.asarray(read_user_folder(root, color_mode="L").image(1))  # grey16.png
    assert grey.max() > 200  # 16-bit values were rescaled, not clipped to 255 everywhere


def test_decompression_bomb(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _user_folder(tmp_path)
    _jpeg(root / "cat" / "huge.jpg", size=(200, 150))
    with pytest.raises(DatasetError, match=r"huge\.jpg: 200x150 pixels is over the limit"):
        read_user_folder(root, max_pixels=10_000)
    with caplog.at_level(logging.WARNING):
        split = read_user_folder(root, max_pixels=10_000, on_error="skip")
    assert len(split) == 4 and "huge.jpg" in caplog.text


def test_validate_images_keeps_labels_aligned(tmp_path: Path) -> None:
    root = _user_folder(tmp_path)
    (root / "cat" / "0.jpg").write_bytes(b"broken")
    split = read_class_folders(root)
    kept = validate_images(split, on_error="skip")
    assert [p.name for p in kept.paths] == ["1.jpg", "0.jpg", "1.jpg"]
    assert kept.labels.tolist() == [0, 1, 1]


@pytest.mark.shared_data
def test_real_miniimagenet_layout(shared_data: Path) -> None:
    root = shared_data / "miniimagenet"
    if not root.is_dir():
        pytest.skip("miniimagenet not in shared data")
    test = read_class_folders(root, "test")
    assert test.num_classes == 20
    assert test.class_counts().tolist() == [600] * 20
    assert all(name.startswith("n") for name in test.class_names)
