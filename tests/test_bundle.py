"""The model bundle: round trip, hash verification, atomic writes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtl_edge.bundle import MANIFEST, Bundle, write_bundle
from mtl_edge.errors import BundleError, MtlEdgeError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess


def manifest() -> dict:
    return {
        "backbone": {
            "name": "toy",
            "args": {},
            "feature_dim": 4,
            "input_name": "images",
            "output_name": "features",
        },
        "preprocess": Preprocess(size=8).to_dict(),
        "head": {
            "steps": 10,
            "lr": 0.1,
            "init": "meta",
            "normalize": False,
            "weight_decay": 0.0,
            "meta_init": {
                "weight": "head_init_weight.npy",
                "bias": "head_init_bias.npy",
                "ways": 2,
            },
        },
        "variants": {"fp32": {"file": "backbone.onnx", "precision": "fp32"}},
        "provenance": {"seed": 0},
    }


def npy_bytes(arr: np.ndarray, tmp: Path) -> bytes:
    np.save(tmp, arr)
    return tmp.read_bytes()


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    files = {
        "backbone.onnx": b"not really onnx",
        "head_init_weight.npy": npy_bytes(np.ones((2, 4), np.float32), tmp_path / "w.npy"),
        "head_init_bias.npy": npy_bytes(np.zeros(2, np.float32), tmp_path / "b.npy"),
    }
    return write_bundle(tmp_path / "bundle", manifest(), files)


def test_round_trip(bundle: Bundle) -> None:
    loaded = Bundle.load(bundle.root)
    assert loaded.feature_dim == 4 and loaded.preprocess == Preprocess(size=8)
    assert loaded.head == HeadRecipe(steps=10, lr=0.1, init="meta")
    weight, bias = loaded.meta_init()
    assert weight.shape == (2, 4) and bias.shape == (2,)
    assert loaded.variant_path("fp32").name == "backbone.onnx"
    assert len(loaded.model_id) == 64


def test_tampered_file_is_refused(bundle: Bundle) -> None:
    (bundle.root / "backbone.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="backbone.onnx: sha256 does not match"):
        Bundle.load(bundle.root)


def test_missing_file_and_manifest(bundle: Bundle) -> None:
    (bundle.root / "head_init_bias.npy").unlink()
    with pytest.raises(BundleError, match="head_init_bias.npy: listed in the manifest but missing"):
        Bundle.load(bundle.root)
    (bundle.root / MANIFEST).unlink()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        Bundle.load(bundle.root)


def test_edited_manifest_is_refused(bundle: Bundle) -> None:
    doc = json.loads((bundle.root / MANIFEST).read_text())
    doc["schema_version"] = 99
    (bundle.root / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="schema version 99"):
        Bundle.load(bundle.root)
    (bundle.root / MANIFEST).write_text("{truncated")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(bundle.root)


def test_existing_output_needs_force(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(MtlEdgeError, match="already exists"):
        write_bundle(bundle.root, manifest(), {"backbone.onnx": b"x"})


def test_failed_write_leaves_no_half_bundle_and_keeps_the_old_one(
    bundle: Bundle, tmp_path: Path
) -> None:
    bad = manifest()
    del bad["variants"]
    with pytest.raises(BundleError):
        write_bundle(bundle.root, bad, {"backbone.onnx": b"new"}, force=True)
    assert Bundle.load(bundle.root).variant_path().read_bytes() == b"not really onnx"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_add_files_updates_hashes(bundle: Bundle) -> None:
    bundle.add_files({"engines/gpu.plan": b"engine"}, {"engines": [{"file": "engines/gpu.plan"}]})
    reloaded = Bundle.load(bundle.root)
    assert reloaded.manifest["engines"][0]["file"] == "engines/gpu.plan"
    (bundle.root / "engines/gpu.plan").write_bytes(b"other")
    with pytest.raises(BundleError, match="gpu.plan"):
        Bundle.load(bundle.root)


def test_unknown_variant_and_bad_recipe(bundle: Bundle) -> None:
    with pytest.raises(BundleError, match="no 'int8' variant"):
        bundle.variant_path("int8")
    with pytest.raises(BundleError, match="head.init"):
        HeadRecipe(init="random")
