"""The gallery: operations, rejection, round trip, corruption, model checks, two-process lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mtl_edge.errors import GalleryError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.gallery import (
    SAVE_PAUSE_ENV,
    UNKNOWN,
    Gallery,
    edit_gallery,
    prev_path,
    restore_previous,
)

DIM = 16
RECIPE = HeadRecipe(steps=60, lr=0.5, normalize=True)


def _centres(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM))


def _samples(centre: np.ndarray, n: int, seed: int) -> np.ndarray:
    return centre + 0.3 * np.random.default_rng(seed).normal(size=(n, DIM))


def _gallery(ways: int = 4, shots: int = 4, dtype: str = "float16") -> Gallery:
    centres = _centres()
    g = Gallery("model-a", DIM, RECIPE, feature_dtype=dtype, backbone="tiny")
    for c in range(ways):
        g.add_class(f"class{c}", _samples(centres[c], shots, seed=c))
    return g


def test_fit_and_predict_known_classes() -> None:
    g = _gallery()
    g.fit()
    centres = _centres()
    queries = np.concatenate([_samples(centres[c], 3, seed=100 + c) for c in range(4)])
    preds = g.predict(queries, top_k=3)
    assert [p.label for p in preds] == [f"class{c}" for c in range(4) for _ in range(3)]
    assert all(p.known and len(p.top_k) == 3 for p in preds)
    assert all(p.top_k[0][1] >= p.top_k[1][1] >= p.top_k[2][1] for p in preds)
    assert preds[0].to_dict()["top_k"][0]["label"] == "class0"


def test_unknown_images_are_rejected_by_the_calibrated_threshold() -> None:
    g = _gallery()
    g.fit()
    assert g.threshold_mode == "auto" and 0 < g.threshold < 1
    assert g.calibration["known"] > 0 and g.calibration["unknown"] > 0
    centres = _centres()
    impostors = np.concatenate([_samples(centres[c], 4, seed=200 + c) for c in (4, 5)])
    preds = g.predict(impostors)
    assert sum(p.label == UNKNOWN for p in preds) >= 6
    assert all(p.label == UNKNOWN for p in g.predict(impostors, threshold=0.999))
    assert all(p.known for p in g.predict(impostors, threshold=0.0))


def test_manual_threshold_survives_a_refit_and_auto_restores_calibration() -> None:
    g = _gallery()
    g.set_threshold(0.9)
    g.fit()
    assert g.threshold == 0.9 and g.threshold_mode == "manual"
    g.set_threshold(None)
    g.fit()
    assert g.threshold_mode == "auto" and g.calibration["method"] == "leave-one-out"
    with pytest.raises(GalleryError, match="probability in"):
        g.set_threshold(1.5)


def test_single_shot_two_way_has_no_rejection_data() -> None:
    g = _gallery(ways=2, shots=1)
    g.fit()
    assert g.threshold == 0.0 and "too little data" in g.calibration["note"]


def test_class_operations() -> None:
    g = _gallery(ways=3)
    g.fit()
    head = g.head
    g.rename_class("class1", "cat")
    assert g.class_names == ["class0", "cat", "class2"] and g.head is head  # no refit needed
    g.add_examples("cat", _samples(_centres()[1], 2, seed=9))
    assert len(g.classes["cat"].features) == 6 and g.head is None
    g.remove_class("class0")
    assert g.class_names == ["cat", "class2"]
    with pytest.raises(GalleryError, match="already enrolled"):
        g.add_class("cat", np.ones((1, DIM)))
    with pytest.raises(GalleryError, match="no class 'dog'"):
        g.remove_class("dog")
    with pytest.raises(GalleryError, match="already enrolled"):
        g.rename_class("cat", "class2")
    with pytest.raises(GalleryError, match="reserved"):
        g.add_class("Unknown", np.ones((1, DIM)))
    with pytest.raises(GalleryError, match="printable"):
        g.add_class("a/b", np.ones((1, DIM)))
    with pytest.raises(GalleryError, match=r"expected \(n >= 1, 16\)"):
        g.add_class("dog", np.ones((2, 5)))
    with pytest.raises(GalleryError, match=r"expected \(n >= 1"):
        g.add_class("dog", np.ones((0, DIM)))
    with pytest.raises(GalleryError, match="float16 range"):
        g.add_class("dog", np.full((1, DIM), 1e6))


def test_adding_a_class_refits_from_stored_features_only() -> None:
    g = _gallery(ways=3)
    g.fit()
    stored = {n: c.features.copy() for n, c in g.classes.items()}
    g.add_class("new", _samples(_centres()[3], 4, seed=5))
    g.fit()
    assert g.head is not None and g.head.ways == 4
    for name, feats in stored.items():
        assert np.array_equal(g.classes[name].features, feats)


def test_empty_gallery_cannot_predict() -> None:
    g = Gallery("m", DIM, RECIPE)
    with pytest.raises(GalleryError, match="no classes"):
        g.predict(np.ones((1, DIM)))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_loses_nothing(tmp_path: Path, dtype: str) -> None:
    g = _gallery(dtype=dtype)
    g.classes["class0"].sources = [{"path": f"/x/{i}.jpg", "sha256": "ab" * 32} for i in range(4)]
    g.meta_init = (np.ones((4, DIM), np.float32), np.zeros(4, np.float32))
    path = tmp_path / "g.gallery"
    with edit_gallery(path, new=g):
        pass
    loaded = Gallery.load(path, model_id="model-a")
    assert loaded.class_names == g.class_names
    for name in g.class_names:
        a, b = g.classes[name], loaded.classes[name]
        assert a.features.dtype == b.features.dtype == np.dtype(dtype)
        assert np.array_equal(a.features, b.features) and a.sources == b.sources
    assert g.head is not None and loaded.head is not None
    assert np.array_equal(g.head.weight, loaded.head.weight)
    assert loaded.threshold == g.threshold and loaded.calibration == g.calibration
    assert loaded.recipe == RECIPE and loaded.backbone == "tiny"
    assert loaded.meta_init is not None and np.array_equal(loaded.meta_init[0], g.meta_init[0])
    queries = _samples(_centres()[2], 3, seed=77)
    assert [p.to_dict() for p in g.predict(queries)] == [
        p.to_dict() for p in loaded.predict(queries)
    ]
    # no pickle anywhere: every array member loads with allow_pickle=False
    with zipfile.ZipFile(path) as zf:
        assert "CHECKSUM" in zf.namelist() and "gallery.json" in zf.namelist()


def test_float16_storage_halves_the_file(tmp_path: Path) -> None:
    sizes = {}
    for dtype in ("float16", "float32"):
        g = Gallery("m", 256, RECIPE, feature_dtype=dtype)
        g.add_class("a", np.random.default_rng(0).normal(size=(50, 256)))
        g.add_class("b", np.random.default_rng(1).normal(size=(50, 256)))
        with edit_gallery(tmp_path / dtype, new=g):
            pass
        sizes[dtype] = (tmp_path / dtype).stat().st_size
    assert sizes["float16"] < 0.6 * sizes["float32"]


def test_gallery_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.gallery"
    with edit_gallery(path, new=_gallery()):
        pass
    with pytest.raises(GalleryError, match="built with another model.*reextract"):
        Gallery.load(path, model_id="model-b")
    with pytest.raises(GalleryError, match="another model"), edit_gallery(path, model_id="b") as g:
        g.remove_class("class0")
    assert Gallery.load(path).class_names == ["class0", "class1", "class2", "class3"]


def _saved_twice(tmp_path: Path) -> Path:
    path = tmp_path / "g.gallery"
    with edit_gallery(path, new=_gallery(ways=3)):
        pass
    with edit_gallery(path) as g:
        g.add_class("class3", _samples(_centres()[3], 4, seed=3))
    return path


def test_previous_generation_is_kept(tmp_path: Path) -> None:
    path = _saved_twice(tmp_path)
    assert len(Gallery.load(path)) == 4
    assert len(Gallery.load(prev_path(path))) == 3
    assert Gallery.load(path).generation == Gallery.load(prev_path(path)).generation + 1


@pytest.mark.parametrize("damage", ["truncate", "edit_json", "flip_feature_byte", "garbage"])
def test_damaged_gallery_is_a_clear_error_and_can_be_restored(tmp_path: Path, damage: str) -> None:
    path = _saved_twice(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"hello")
    elif damage == "edit_json":
        path.write_bytes(data.replace(b'"class0"', b'"classX"'))
    else:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("features.npy")
        pos = info.header_offset + 30 + len(info.filename) + 200
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    with pytest.raises(GalleryError) as err:
        Gallery.load(path)
    message = str(err.value)
    assert "corrupt gallery" in message and "mtl-edge gallery restore" in message
    assert "\n" not in message
    # an edit refuses to overwrite it; the good previous copy stays untouched
    prev = prev_path(path).read_bytes()
    with pytest.raises(GalleryError), edit_gallery(path) as g:
        g.remove_class("class0")
    assert prev_path(path).read_bytes() == prev
    aside = restore_previous(path)
    assert aside.exists() and aside != path
    assert len(Gallery.load(path)) == 3


def test_no_previous_copy_says_so(tmp_path: Path) -> None:
    path = tmp_path / "g.gallery"
    with edit_gallery(path, new=_gallery()):
        pass
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GalleryError, match="no good previous copy"):
        Gallery.load(path)
    with pytest.raises(GalleryError, match="no previous copy"):
        restore_previous(path)


def test_missing_gallery_and_directory(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="no such gallery"):
        Gallery.load(tmp_path / "nope")
    with pytest.raises(GalleryError, match="is a directory"):
        Gallery.load(tmp_path)


def test_exception_inside_an_edit_saves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "g.gallery"
    with edit_gallery(path, new=_gallery()):
        pass
    before = path.read_bytes()
    with pytest.raises(RuntimeError), edit_gallery(path) as g:
        g.remove_class("class0")
        raise RuntimeError("boom")
    assert path.read_bytes() == before


WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mtl_edge.fewshot.fc import HeadRecipe
    from mtl_edge.gallery import Gallery, edit_gallery

    path, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(abs(hash(prefix)) % 1000)
    for i in range(n):
        new = Gallery("model-a", 16, HeadRecipe(steps=5, lr=0.5))
        with edit_gallery(path, new=new) as g:
            g.add_class(f"{prefix}{i}", rng.normal(size=(2, 16)))
    """
)


def test_two_processes_enrolling_at_once_lose_nothing(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    path = tmp_path / "shared.gallery"
    # A pause inside every save widens the read-modify-write window: without the lock the
    # two writers overwrite each other's classes (checked by hand: 9 of 16 survive).
    env = {**os.environ, SAVE_PAUSE_ENV: "0.02"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(path), prefix, "8"], env=env)
        for prefix in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    names = set(Gallery.load(path).class_names)
    assert names == {f"{p}{i}" for p in "ab" for i in range(8)}


def test_calibration_folds_shrink_for_large_galleries(monkeypatch) -> None:
    import mtl_edge.gallery.calibration as gallery_module

    g = _gallery(ways=6, shots=5)
    g.fit()
    assert g.calibration["known"] == 24
    monkeypatch.setattr(gallery_module, "CALIBRATION_BUDGET", 1.0)
    g.fit()
    assert g.calibration["known"] == 4 and g.calibration["unknown"] == 2 * 5
