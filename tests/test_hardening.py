"""Regression tests of issue 15 for images and bundles: each case is one line on stderr naming
the file, a non-zero exit code, no traceback, no hang, bounded memory, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from device_fixtures import COLOURS, make_bundle, make_class_folders, make_image, tiny_onnx_bytes
from hostile import corrupt_exif_jpeg, damaged_lzw_tiff, edit_manifest, nan_onnx, png_bytes, rehash
from PIL import Image

from mtl_edge.bundle import Bundle
from mtl_edge.errors import BundleError, ImageError
from mtl_edge.manifest import check_relpath, model_id
from mtl_edge.preprocess import MAX_RESIZED_PIXELS, Preprocess, decode_image, resize_and_crop

pytest.importorskip("onnxruntime")


def cli(*args: str | Path, timeout: float = 120, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def one_error(result: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """The single stderr line of a failed command, checked to hold every needle."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    bundle = make_bundle(tmp_path / "bundle", extra_variants=("int8-cpu",)).root
    photos = make_class_folders(tmp_path / "photos", ("red", "green", "blue"), per_class=3)
    gallery = tmp_path / "g.gallery"
    base = ("--bundle", bundle, "--gallery", gallery, "--backend", "onnxruntime-cpu")
    assert cli("enroll", *base, "--from-folder", photos).returncode == 0
    query = make_image(tmp_path / "q.jpg", COLOURS["red"], seed=77)
    return {"bundle": bundle, "gallery": gallery, "photos": photos, "query": query}


def common(env: dict[str, Path]) -> tuple:
    return ("--bundle", env["bundle"], "--gallery", env["gallery"], "--backend", "onnxruntime-cpu")


# ----------------------------------------------------------------------------------- memory


def test_one_pixel_wide_png_is_refused_by_its_header(env, tmp_path: Path) -> None:
    for height in (1_000_000, 10_000_000):
        strip = tmp_path / f"strip{height}.png"
        strip.write_bytes(png_bytes(1, height))
        one_error(cli("predict", *common(env), strip), str(strip), "side over the limit")


def test_elongated_images_are_resized_within_the_pixel_cap(monkeypatch) -> None:
    sizes: list[tuple[int, int]] = []
    real = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    cfg = Preprocess(size=84)
    for w, h in ((1, 60_000), (60_000, 3), (40, 30_000)):
        out = resize_and_crop(Image.new("RGB", (w, h), (200, 10, 10)), cfg)
        assert out.size == (84, 84)
        assert np.asarray(out)[40, 40].tolist() == [200, 10, 10]
    assert sizes and max(a * b for a, b in sizes) <= MAX_RESIZED_PIXELS


def test_ordinary_images_resize_as_before() -> None:
    # the bounded path is taken only past MAX_RESIZED_PIXELS: a 300x200 photo is resized whole
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8))
    cfg = Preprocess(size=84)
    expected = img.resize((126, 84), Image.Resampling.BILINEAR).crop((21, 0, 105, 84))
    assert np.array_equal(np.asarray(resize_and_crop(img, cfg)), np.asarray(expected))


# ------------------------------------------------------------------------------------ hangs


def test_nan_thresholds_on_the_command_line_are_refused(env) -> None:
    one_error(cli("predict", *common(env), env["query"], "--threshold", "nan"), "--threshold")
    one_error(cli("gallery", "threshold", env["gallery"], "nan"), "threshold nan")


def test_fifo_image_and_fifo_manifest_are_refused_without_opening(env, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    one_error(cli("predict", *common(env), fifo, timeout=60), str(fifo), "FIFO")
    with pytest.raises(ImageError, match="FIFO"):
        decode_image(fifo)
    manifest = env["bundle"] / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    one_error(cli("predict", *common(env), env["query"], timeout=60), "manifest.json", "FIFO")


def test_folder_enrollment_skips_a_fifo_named_like_an_image(env, tmp_path: Path) -> None:
    os.mkfifo(env["photos"] / "red" / "pipe.jpg")
    result = cli(
        "enroll", *common(env), "--gallery", tmp_path / "g2", "--from-folder", env["photos"]
    )
    assert result.returncode == 0, result.stderr
    assert "pipe.jpg" in result.stderr and "enrolled 'red': 3 images" in result.stdout


@pytest.mark.parametrize("steps", [1e9, 10**9, -1, True, "100"])
def test_unbounded_head_steps_in_a_manifest_are_refused(env, steps) -> None:
    edit_manifest(env["bundle"], lambda m: m["head"].update(steps=steps))
    one_error(cli("predict", *common(env), env["query"], timeout=60), "manifest.json", "steps")


@pytest.mark.parametrize("lr", [0, -1, 1e9, None, "0.1"])
def test_insane_head_lr_is_refused(env, lr) -> None:
    edit_manifest(env["bundle"], lambda m: m["head"].update(lr=lr))
    one_error(cli("predict", *common(env), env["query"]), "manifest.json", "head.lr")


# -------------------------------------------------------------------------------- manifests

MANIFEST_DAMAGE = {
    "files is a list": lambda m: m.update(files=[]),
    "backbone is null": lambda m: m.update(backbone=None),
    "feature_dim is text": lambda m: m["backbone"].update(feature_dim="abc"),
    "feature_dim is huge": lambda m: m["backbone"].update(feature_dim=10**12),
    "variant is a string": lambda m: m["variants"].update(fp32="backbone.onnx"),
    "variants is a list": lambda m: m.update(variants=["fp32"]),
    "preprocess size is text": lambda m: m["preprocess"].update(size="abc"),
    "preprocess std is zero": lambda m: m["preprocess"].update(std=[0, 0, 0]),
    "preprocess mean is nested": lambda m: m["preprocess"].update(mean=[[1], [2], [3]]),
    "head is a list": lambda m: m.update(head=[1, 2]),
    "file outside the bundle": lambda m: m["files"].update({"../x.onnx": "0" * 64}),
    "absolute variant path": lambda m: m["variants"]["fp32"].update(file="/etc/passwd"),
    "parent variant path": lambda m: m["variants"]["fp32"].update(file="../bundle/backbone.onnx"),
    "variant file not hashed": lambda m: m["variants"]["fp32"].update(file="other.onnx"),
    "meta_init not hashed": lambda m: m["head"].update(
        meta_init={"weight": "w.npy", "bias": "b.npy", "ways": 3}
    ),
    "meta_init outside": lambda m: m["head"].update(
        meta_init={"weight": "/etc/passwd", "bias": "b.npy", "ways": 3}
    ),
    "engine outside engines/": lambda m: m.update(engines=[{"file": "backbone.onnx"}]),
    "bad sha256": lambda m: m["files"].update({"backbone.onnx": "xyz"}),
    "input_shape disagrees": lambda m: m["backbone"].update(input_shape=[3, 99, 99]),
    "newline in the version": lambda m: m.update(schema_version="1\nerror: forged"),
    "newline in a value": lambda m: m["head"].update(init="zeros\nerror: forged"),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_malformed_manifest_is_one_bundle_error(tmp_path: Path, damage: str) -> None:
    bundle = make_bundle(tmp_path / "b").root
    edit_manifest(bundle, MANIFEST_DAMAGE[damage])
    with pytest.raises(BundleError) as err:
        Bundle.load(bundle)
    assert "manifest.json" in str(err.value) and "\n" not in str(err.value)


def test_deep_nesting_directory_and_symlink_loop_manifests(env, tmp_path: Path) -> None:
    manifest = env["bundle"] / "manifest.json"
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    one_error(cli("predict", *common(env), env["query"]), "manifest.json", "nested")
    manifest.unlink()
    manifest.mkdir()
    one_error(cli("predict", *common(env), env["query"]), "manifest.json", "directory")
    manifest.rmdir()
    manifest.symlink_to(manifest)
    one_error(cli("predict", *common(env), env["query"]), "manifest.json", "symlink loop")


def test_relpath_rule() -> None:
    for good in ("backbone.onnx", "engines/fp32-NVIDIA-H100-sm90-trt10.3.0.plan", "a_b+c-1.npy"):
        assert check_relpath(good) == good
    for bad in ("../x", "/abs", "a/../b", ".hidden", "", "a//b", "a\\b", "x\0y", "a/b/c/d", 7):
        with pytest.raises(ValueError):
            check_relpath(bad)


def test_symlink_out_of_the_bundle_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b").root
    outside = tmp_path / "elsewhere.onnx"
    (bundle / "backbone.onnx").rename(outside)
    (bundle / "backbone.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(bundle)


def test_preprocess_size_that_disagrees_with_the_onnx_input(tmp_path: Path) -> None:
    from hostile import rehash as replace

    bundle = make_bundle(tmp_path / "b").root  # preprocess size 16
    replace(bundle, "backbone.onnx", tiny_onnx_bytes(static_size=20))
    photos = make_class_folders(tmp_path / "p", ("red", "green"), per_class=2)
    result = cli(
        "enroll", "-b", bundle, "-g", tmp_path / "g", "--backend", "onnxruntime-cpu",
        "--from-folder", photos,
    )  # fmt: skip
    one_error(result, str(bundle), "(2, 3, 16, 16)", "export the bundle again")
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------------- a bundle as a whole


def test_model_id_covers_every_variant_and_field_but_not_device_engines(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", extra_variants=("int8-cpu",))
    base = bundle.model_id
    edits = [
        lambda m: m["files"].update({"backbone.int8-cpu.onnx": "1" * 64}),
        lambda m: m["variants"]["int8-cpu"].update(precision="int4"),
        lambda m: m["head"].update(steps=51),
        lambda m: m["provenance"].update(seed=1),
        lambda m: m["backbone"].update(name="other"),
    ]
    for edit in edits:
        doc = json.loads(json.dumps(bundle.manifest))
        edit(doc)
        assert model_id(doc) != base
    engine = {"file": "engines/fp32-gpu.plan", "variant": "fp32"}
    bundle.add_files({"engines/fp32-gpu.plan": b"plan"}, {"engines": [engine]})
    assert Bundle.load(bundle.root).model_id == base


def test_swapped_int8_variant_with_updated_hash_is_refused_by_the_gallery(env) -> None:
    rehash(env["bundle"], "backbone.int8-cpu.onnx", tiny_onnx_bytes(seed=5))
    result = cli("predict", *common(env), "--precision", "int8", env["query"])
    one_error(result, str(env["gallery"]), "another model", "reextract")


def test_gallery_of_one_variant_refuses_another_until_reextracted(env) -> None:
    result = cli("predict", *common(env), "--precision", "int8", env["query"])
    one_error(result, "'fp32' variant", "int8-cpu", "--precision fp32", "reextract")
    result = cli(
        "gallery", "reextract", env["gallery"], "-b", env["bundle"], "--backend",
        "onnxruntime-cpu", "--precision", "int8", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["variant"] == "int8-cpu"
    result = cli("predict", *common(env), "--precision", "int8", env["query"], "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["label"] in ("red", "unknown")


def test_nan_output_variant_is_refused_where_it_appears(env, tmp_path: Path) -> None:
    rehash(env["bundle"], "backbone.int8-cpu.onnx", nan_onnx(tiny_onnx_bytes()))
    result = cli(
        "enroll", *common(env), "--gallery", tmp_path / "g2", "--precision", "int8",
        "--class", "x", env["query"],
    )  # fmt: skip
    one_error(result, "int8-cpu variant", "NaN or infinite features")
    assert not (tmp_path / "g2").exists()


# ----------------------------------------------------------------- third-party diagnostics


def test_corrupt_exif_succeeds_without_extra_stderr_lines(env, tmp_path: Path) -> None:
    photo = tmp_path / "exif.jpg"
    photo.write_bytes(corrupt_exif_jpeg())
    result = cli("predict", *common(env), photo, "--threshold", "0")
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_damaged_lzw_tiff_is_one_line_with_libtiffs_message(env, tmp_path: Path) -> None:
    tiff = tmp_path / "damaged.tif"
    tiff.write_bytes(damaged_lzw_tiff())
    one_error(cli("predict", *common(env), tiff), str(tiff), "corrupt")


def test_damaged_tiff_in_process_leaves_fd2_clean(tmp_path: Path, capfd) -> None:
    with pytest.raises(ImageError) as err:
        decode_image(damaged_lzw_tiff(), name="damaged.tif")
    assert capfd.readouterr().err == ""
    assert "damaged.tif" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ no torch


@pytest.mark.parametrize(
    "args", [["train", "pretrain", "--recipe", "demo", "--out", "x"], ["demo", "--quick"]]
)
def test_torch_free_install_gets_one_line_and_exit_2(args: list[str], tmp_path: Path) -> None:
    code = f"import sys; sys.modules['torch'] = None\nfrom mtl_edge.cli import main\nmain({args!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    # `demo` logs its first stage before it needs torch; that INFO line is not an error
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("INFO ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "torch" in errors[0]
