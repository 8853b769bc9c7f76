"""The gallery's open-set rejection rules: "probability" (old galleries) and "cosine"."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mtl_edge.errors import GalleryError
from mtl_edge.fewshot.fc import HeadRecipe, l2_normalize
from mtl_edge.gallery import UNKNOWN, Gallery
from mtl_edge.gallery.calibration import (
    NEW_GALLERY_REJECTION,
    REJECTIONS,
    balanced_threshold,
    max_cosine,
    percentile_threshold,
    prototypes,
)
from mtl_edge.gallery.storage import members_checksum

DIM = 16
RECIPE = HeadRecipe(steps=60, lr=0.5, normalize=True)


def _centres(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, DIM)) + 2.0  # positive, like ReLU features


def _samples(centre: np.ndarray, n: int, seed: int) -> np.ndarray:
    return centre + 0.3 * np.random.default_rng(seed).normal(size=(n, DIM))


def _gallery(rejection: str, ways: int = 4, shots: int = 4) -> Gallery:
    g = Gallery("model-a", DIM, RECIPE, backbone="tiny", rejection=rejection)
    for c in range(ways):
        g.add_class(f"class{c}", _samples(_centres()[c], shots, seed=c))
    return g


def _doc(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return json.loads(zf.read("gallery.json"))


def _rewrite(data: bytes, edit) -> bytes:
    """The gallery file with gallery.json edited and the checksum made valid again."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n != "CHECKSUM"}
    doc = json.loads(members["gallery.json"])
    edit(doc)
    members["gallery.json"] = json.dumps(doc).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(members):
            zf.writestr(name, members[name])
        zf.writestr("CHECKSUM", members_checksum(members) + "\n")
    return buf.getvalue()


def test_new_galleries_use_the_chosen_rule_and_old_files_stay_probability(tmp_path: Path) -> None:
    assert Gallery("m", DIM).rejection == NEW_GALLERY_REJECTION
    old = _gallery("probability")
    data = old.to_bytes()
    # a probability gallery is written exactly as before rules existed: no new key
    assert "rejection" not in _doc(data)["threshold"]
    loaded = Gallery.from_bytes(data)
    assert loaded.rejection == "probability"
    queries = _samples(_centres()[0], 3, seed=50)
    for p in loaded.predict(queries):
        assert p.score == p.probability and p.known == (p.probability >= loaded.threshold)


def test_cosine_rule_scores_by_prototype_cosine_and_round_trips(tmp_path: Path) -> None:
    g = _gallery("cosine")
    g.fit()
    assert g.calibration["rejection"] == "cosine" and 0 < g.threshold < 1
    centres = _centres()
    known = np.concatenate([_samples(centres[c], 3, seed=100 + c) for c in range(4)])
    impostors = np.concatenate([_samples(centres[c], 4, seed=200 + c) for c in (4, 5)])
    x, y = g.features_and_labels()
    expected = (l2_normalize(impostors) @ prototypes(x, y, 4).T).max(axis=1)
    preds = g.predict(impostors)
    np.testing.assert_allclose([p.score for p in preds], expected, rtol=1e-6)
    assert [p.known for p in preds] == list(expected >= g.threshold)
    assert sum(p.label == UNKNOWN for p in preds) >= 6
    assert sum(p.known for p in g.predict(known)) >= 10
    assert all(p.to_dict()["score"] == p.score for p in preds)
    path = tmp_path / "g.gallery"
    g.save(path)
    assert _doc(path.read_bytes())["threshold"]["rejection"] == "cosine"
    loaded = Gallery.load(path)
    assert loaded.rejection == "cosine" and loaded.threshold == g.threshold
    assert [p.to_dict() for p in loaded.predict(impostors)] == [p.to_dict() for p in preds]
    assert loaded.info()["rejection"] == "cosine"


def test_switching_rule_recalibrates_and_bad_names_are_refused() -> None:
    g = _gallery("probability")
    g.set_threshold(0.9)
    g.set_rejection("probability")  # unchanged: the manual threshold stays
    assert g.threshold_mode == "manual"
    g.set_rejection("cosine")
    assert g.threshold_mode == "auto"
    g.fit()
    assert g.calibration["rejection"] == "cosine"
    with pytest.raises(GalleryError, match="rejection"):
        g.set_rejection("energy")
    assert set(REJECTIONS) == {"probability", "cosine"}


def test_a_crafted_rejection_name_is_refused_on_load() -> None:
    data = _gallery("cosine").to_bytes()
    bad = _rewrite(data, lambda d: d["threshold"].update(rejection="bogus"))
    with pytest.raises(GalleryError, match="rejection"):
        Gallery.from_bytes(bad)
    dropped = _rewrite(data, lambda d: d["threshold"].pop("rejection"))
    assert Gallery.from_bytes(dropped).rejection == "probability"


def test_threshold_cuts() -> None:
    known, unknown = np.array([0.8, 0.9, 0.7]), np.array([0.2, 0.3, 0.75])
    t = balanced_threshold(known, unknown)
    assert np.mean(known >= t) == 1.0 and np.mean(unknown < t) == pytest.approx(2 / 3)
    # separable scores below zero (energies, cosines) get a cut between them, not 0
    t = balanced_threshold(np.array([-1.0, -1.1]), np.array([-3.0, -2.5]))
    assert -2.5 < t < -1.1
    # all-overlapping scores: the lowest cut accepts every score
    assert balanced_threshold(np.array([-2.0]), np.array([-1.0])) <= -2.0
    assert percentile_threshold(np.arange(101.0)) == pytest.approx(5.0)


def test_max_cosine_of_a_prototype_is_one() -> None:
    x = np.abs(np.random.default_rng(1).normal(size=(6, DIM)))
    y = np.array([0, 0, 1, 1, 2, 2])
    protos = prototypes(x, y, 3)
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0)
    np.testing.assert_allclose(max_cosine(protos * 3.0, protos), 1.0)


def test_reextract_keeps_the_rule_and_a_manual_threshold(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from device_fixtures import make_bundle, make_class_folders

    from mtl_edge.enroller import Enroller
    from mtl_edge.gallery import edit_gallery

    photos = make_class_folders(tmp_path / "photos", ("red", "green", "blue"), per_class=3)
    path = tmp_path / "g.gallery"
    Enroller(make_bundle(tmp_path / "a").root, path).enroll_folder(photos)
    assert Gallery.load(path).rejection == NEW_GALLERY_REJECTION
    with edit_gallery(path) as g:
        g.set_rejection("probability")  # an old gallery's rule, with a probability threshold
        g.set_threshold(0.7)
    Enroller(make_bundle(tmp_path / "b", seed=5).root, path).reextract()
    g = Gallery.load(path)
    assert (g.rejection, g.threshold_mode, g.threshold) == ("probability", "manual", 0.7)
