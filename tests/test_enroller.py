"""The Enroller API on a tiny torch-free bundle and folders of coloured JPEGs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from device_fixtures import COLOURS, make_bundle, make_class_folders, make_image

from mtl_edge.errors import BundleError, DatasetError, GalleryError, ImageError
from mtl_edge.gallery import Gallery
from mtl_edge.preprocess import load_images

pytest.importorskip("onnxruntime")

from mtl_edge.enroller import Enroller  # noqa: E402


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    bundle = make_bundle(tmp_path / "bundle").root
    photos = make_class_folders(tmp_path / "photos", ("red", "green", "blue"), per_class=4)
    return bundle, photos, tmp_path / "shop.gallery"


def _enroller(bundle: Path, gallery: Path, **kwargs) -> Enroller:
    return Enroller(bundle, gallery, backend="onnxruntime-cpu", threads=1, **kwargs)


def test_enroll_folder_then_predict_new_photos(setup, tmp_path: Path) -> None:
    bundle, photos, gallery = setup
    enroller = _enroller(bundle, gallery)
    assert enroller.enroll_folder(photos) == {"blue": 4, "green": 4, "red": 4}
    queries = [
        make_image(tmp_path / "q" / f"{name}.jpg", COLOURS[name], seed=900 + i)
        for i, name in enumerate(("red", "green", "blue"))
    ]
    preds = enroller.predict(queries, top_k=2, threshold=0.0)
    assert [p.label for p in preds] == ["red", "green", "blue"]
    assert all(len(p.top_k) == 2 for p in preds)
    info = enroller.info()
    assert info["examples"] == 12 and info["backbone"] == "tiny-test"
    assert info["model_id"] == enroller.bundle.model_id


def test_features_use_the_bundle_preprocessing(setup) -> None:
    bundle, photos, gallery = setup
    enroller = _enroller(bundle, gallery, feature_dtype="float32")
    paths = sorted((photos / "red").glob("*.jpg"))
    enroller.enroll_class("red", paths)
    stored = Gallery.load(gallery).classes["red"]
    direct = enroller.extractor.extract(load_images(paths, enroller.bundle.preprocess))
    np.testing.assert_allclose(stored.features, direct, rtol=1e-6)
    assert stored.sources[0] is not None and stored.sources[0]["path"] == str(paths[0].resolve())
    assert len(stored.sources[0]["sha256"]) == 64


def test_unreadable_images_skipped_in_folders_error_for_files(setup, caplog) -> None:
    bundle, photos, gallery = setup
    (photos / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "red" / "notes.txt").write_text("ignored: not an image suffix")
    enroller = _enroller(bundle, gallery)
    with caplog.at_level(logging.WARNING):
        counts = enroller.enroll_folder(photos)
    assert counts["red"] == 4 and "broken.jpg" in caplog.text
    with pytest.raises(ImageError, match="broken.jpg"):
        enroller.enroll_class("more_red", [photos / "red" / "0.jpg", photos / "red" / "broken.jpg"])
    assert "more_red" not in enroller.classes()


def test_class_without_usable_image_saves_nothing(setup, tmp_path: Path) -> None:
    bundle, photos, gallery = setup
    enroller = _enroller(bundle, gallery)
    enroller.enroll_class("red", sorted((photos / "red").glob("*.jpg")))
    before = gallery.read_bytes()
    more = make_class_folders(tmp_path / "more", ("green",), per_class=2)
    (more / "empty").mkdir()
    (more / "empty" / "bad.png").write_bytes(b"nope")
    with pytest.raises(GalleryError, match="'empty': no usable image"):
        enroller.enroll_folder(more)
    assert gallery.read_bytes() == before  # green was not saved either


def test_duplicates_and_append(setup) -> None:
    bundle, photos, gallery = setup
    enroller = _enroller(bundle, gallery)
    reds = sorted((photos / "red").glob("*.jpg"))
    enroller.enroll_class("red", reds[:2])
    with pytest.raises(GalleryError, match="already enrolled.*--append"):
        enroller.enroll_class("red", reds[2:])
    with pytest.raises(GalleryError, match="already enrolled"):
        enroller.enroll_folder(photos)
    assert enroller.enroll_class("red", reds[2:], append=True) == 2
    assert enroller.info()["classes"] == [{"name": "red", "count": 4}]
    with pytest.raises(GalleryError, match="no class 'cyan'"):
        enroller.enroll_class("cyan", reds, append=True)
    with pytest.raises(GalleryError, match="no images given"):
        enroller.enroll_class("cyan", [])


def test_gallery_ops_and_empty_gallery(setup) -> None:
    bundle, photos, gallery = setup
    enroller = _enroller(bundle, gallery)
    enroller.enroll_folder(photos)
    enroller.rename_class("red", "tomato")
    enroller.remove_class("green")
    assert enroller.classes() == ["blue", "tomato"]
    enroller.set_threshold(0.75)
    assert enroller.info()["threshold"] == 0.75
    enroller.remove_class("blue")
    enroller.remove_class("tomato")
    with pytest.raises(GalleryError, match="no classes enrolled"):
        enroller.predict([photos / "red" / "0.jpg"])


def test_missing_folder_and_flat_folder(setup) -> None:
    bundle, photos, gallery = setup
    enroller = _enroller(bundle, gallery)
    with pytest.raises(DatasetError, match="no such folder"):
        enroller.enroll_folder(photos / "nope")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        enroller.enroll_folder(photos / "red")


def test_tampered_bundle_is_refused(setup) -> None:
    bundle, _, gallery = setup
    with open(bundle / "backbone.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256 does not match"):
        _enroller(bundle, gallery)


def test_other_bundle_refused_then_reextracted(setup, tmp_path: Path) -> None:
    bundle, photos, gallery = setup
    _enroller(bundle, gallery).enroll_folder(photos)
    other = make_bundle(tmp_path / "other", seed=5).root
    enroller = _enroller(other, gallery)
    with pytest.raises(GalleryError, match="built with another model"):
        enroller.predict([photos / "red" / "0.jpg"])
    assert enroller.reextract() == 12
    preds = enroller.predict([photos / "blue" / "1.jpg"], threshold=0.0)
    assert preds[0].label == "blue"
    assert Gallery.load(gallery).model_id == enroller.bundle.model_id


def test_reextract_needs_stored_paths(setup, tmp_path: Path) -> None:
    bundle, photos, gallery = setup
    _enroller(bundle, gallery, store_sources=False).enroll_folder(photos)
    enroller = _enroller(make_bundle(tmp_path / "other", seed=5).root, gallery)
    with pytest.raises(GalleryError, match="without stored image paths"):
        enroller.reextract()


def test_meta_init_travels_with_the_gallery(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", head={"init": "meta"}, meta_ways=3).root
    photos = make_class_folders(tmp_path / "photos", ("red", "green", "blue"), per_class=3)
    enroller = _enroller(bundle, tmp_path / "g")
    enroller.enroll_folder(photos)
    g = Gallery.load(tmp_path / "g")
    assert g.meta_init is not None and g.head is not None and g.head.init == "meta"


def test_progress_is_reported(setup) -> None:
    bundle, photos, gallery = setup
    seen: list[tuple[int, int]] = []
    enroller = _enroller(bundle, gallery, progress=lambda d, t: seen.append((d, t)))
    enroller.enroll_class("red", sorted((photos / "red").glob("*.jpg")))
    assert seen[-1] == (4, 4) and len(seen) == 4


def test_new_class_extracts_only_its_own_images(setup, tmp_path: Path) -> None:
    bundle, photos, gallery = setup
    enroller = _enroller(bundle, gallery)
    enroller.enroll_folder(photos)
    seen: list[int] = []
    real = enroller.extractor.extract

    def counting(images: np.ndarray) -> np.ndarray:
        seen.append(len(images))
        return real(images)

    enroller.extractor.extract = counting  # type: ignore[method-assign]
    yellow = [make_image(tmp_path / "y" / f"{i}.jpg", COLOURS["yellow"], seed=i) for i in range(3)]
    enroller.enroll_class("yellow", yellow)
    assert sum(seen) == 3
    g = Gallery.load(gallery)
    assert g.head is not None and g.head.ways == 4 and len(g.features_and_labels()[1]) == 15


def test_predict_accepts_arrays_and_bytes(setup) -> None:
    bundle, photos, gallery = setup
    enroller = _enroller(bundle, gallery)
    enroller.enroll_folder(photos)
    path = photos / "green" / "2.jpg"
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"))
    preds = enroller.predict([path, path.read_bytes(), array], threshold=0.0)
    assert [p.label for p in preds] == ["green"] * 3
    assert preds[0].probability == pytest.approx(preds[1].probability, abs=1e-6)


def test_invalid_class_name_fails_before_extraction(setup, tmp_path: Path) -> None:
    bundle, _, gallery = setup
    photos = make_class_folders(tmp_path / "p", ("red",), per_class=1)
    (photos / "red").rename(photos / "unknown")
    enroller = _enroller(bundle, gallery)
    with pytest.raises(GalleryError, match="reserved"):
        enroller.enroll_folder(photos)
    assert enroller._extractor is None and not gallery.exists()


@pytest.mark.slow
def test_exported_training_backbone_enrolls_like_torch(tmp_path: Path) -> None:
    """Train-side backbone -> export -> device: features match torch, int8 runs int8-cpu."""
    torch = pytest.importorskip("torch")
    backbones = pytest.importorskip("mtl_edge.train.backbones")
    api = pytest.importorskip("mtl_edge.export.api")
    from mtl_edge.data.synthetic import make_synthetic_split, write_class_folders
    from mtl_edge.preprocess import Preprocess

    torch.manual_seed(0)
    model = backbones.create_backbone("conv4", width=16, in_channels=3).eval()
    from mtl_edge.fewshot.fc import HeadRecipe
    from mtl_edge.train.checkpoint import backbone_state, deploy_section, save_checkpoint

    checkpoint = {
        "model": "conv4",
        "model_args": model.model_args,
        "state_dict": backbone_state(model),
        "stage": "pretrain",
        "preprocess": Preprocess(size=28).to_dict(),
        "config": {"data": {"kind": "synthetic"}},
        "metrics": {},
        "deploy": deploy_section(HeadRecipe(), {"kind": "centroid"}),
    }
    save_checkpoint(tmp_path / "model.pt", checkpoint)
    calib = write_class_folders(make_synthetic_split(4, 6, 28, seed=9), tmp_path / "calib")
    bundle, _ = api.export_checkpoint(
        tmp_path / "model.pt",
        tmp_path / "bundle",
        int8=True,
        calib=calib,
        parity_episodes=10,
        quant_episodes=50,
    )
    photos = write_class_folders(make_synthetic_split(5, 6, 28, seed=21), tmp_path / "photos")
    images = sorted(photos.rglob("*.png"))

    fp32 = _enroller(bundle.root, tmp_path / "fp32.gallery")
    features = fp32.extract(images)[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(load_images(images, bundle.preprocess))).numpy()
    np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-4)

    int8 = _enroller(bundle.root, tmp_path / "int8.gallery", precision="int8")
    assert int8.extractor.precision == "int8-cpu"
    q = int8.extract(images)[0]
    cosine = np.sum(q * features, axis=1) / (
        np.linalg.norm(q, axis=1) * np.linalg.norm(features, axis=1) + 1e-12
    )
    assert np.median(cosine) > 0.98
    assert fp32.enroll_folder(photos) == {name: 6 for name in sorted(os.listdir(photos))}
    preds = fp32.predict(images, threshold=0.0)
    truth = [p.parent.name for p in images]
    # an untrained conv4 and the default recipe (100 steps at lr 0.01): above chance (0.2)
    assert np.mean([p.label == t for p, t in zip(preds, truth, strict=True)]) > 0.3
