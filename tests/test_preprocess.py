"""Decoding and preprocessing: modes, EXIF, bad files, parity of torch and numpy paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl_edge.errors import ImageError
from mtl_edge.preprocess import Preprocess, decode_image, load_images, preprocess_image


def test_output_shape_and_normalisation(tmp_path: Path) -> None:
    Image.new("RGB", (100, 60), (255, 0, 128)).save(tmp_path / "a.png")
    cfg = Preprocess(size=32)
    x = load_images([tmp_path / "a.png"], cfg)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    expected_r = (1.0 - cfg.mean[0]) / cfg.std[0]
    np.testing.assert_allclose(x[0, 0], expected_r, rtol=1e-6)


def test_resize_shorter_side_then_center_crop() -> None:
    img = Image.new("L", (40, 20))
    img.paste(255, (0, 0, 10, 20))  # a white band on the left, cropped away by the center crop
    cfg = Preprocess(size=20, color_mode="L", mean=(0.0,), std=(1.0,))
    x = preprocess_image(img, cfg)
    assert x.shape == (1, 20, 20)
    assert x.max() == pytest.approx(0.0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert decode_image(tmp_path / "r.jpg").size == (10, 30)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "I;16", "I", "1", "F"])
def test_any_mode_becomes_rgb_or_l(tmp_path: Path, mode: str) -> None:
    img = Image.new(mode, (8, 8))
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "F", "I") else "x.png")
    img.save(path)
    assert decode_image(path, "RGB").mode == "RGB"
    assert decode_image(path, "L").mode == "L"


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert np.asarray(decode_image(tmp_path / "deep.png", "L")).mean() == pytest.approx(128, abs=1)


def test_bad_files_give_one_line_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path in (truncated, text, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(ImageError) as info:
            decode_image(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(tmp_path / "big.png", max_pixels=10_000)


def test_config_round_trip_and_validation() -> None:
    cfg = Preprocess(size=28, resize=32, color_mode="L", mean=(0.5,), std=(0.5,), invert=True)
    assert Preprocess.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ImageError):
        Preprocess(color_mode="L")  # three means for one channel
    with pytest.raises(ImageError):
        Preprocess.from_dict({"size": 3, "bogus": 1})
