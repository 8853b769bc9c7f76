"""Backends: onnxruntime on the CPU, variant selection, auto, TensorRT guarded."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from device_fixtures import IMAGE_SIZE, make_bundle

from mtl_edge.backends import available_backends, create_backend
from mtl_edge.backends.onnxruntime_backend import OnnxRuntimeExtractor
from mtl_edge.backends.select import resolve_variant
from mtl_edge.errors import BundleError, ConfigError, UnavailableError
from mtl_edge.preprocess import load_images

ort = pytest.importorskip("onnxruntime")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return (
        np.random.default_rng(seed).normal(size=(n, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    )


def _reference(bundle, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle.variant_path()), providers=["CPUExecutionProvider"])
    return session.run(["features"], {"images": images})[0]


def test_onnxruntime_cpu_extracts_features_in_chunks(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    extractor = create_backend("onnxruntime", bundle, threads=1, batch_size=3)
    assert extractor.name == "onnxruntime" and extractor.provider == "CPUExecutionProvider"
    assert extractor.precision == "fp32" and extractor.feature_dim == 8
    images = _images(7)
    features = extractor.extract(images)
    assert features.shape == (7, 8) and features.dtype == np.float32
    np.testing.assert_allclose(features, _reference(bundle, images), rtol=1e-5, atol=1e-6)
    assert extractor.extract(images[:0]).shape == (0, 8)


def test_static_batch_models_are_padded(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", static_batch=4)
    extractor = create_backend("onnxruntime-cpu", bundle)
    images = _images(6, seed=1)
    features = extractor.extract(images)
    assert features.shape == (6, 8)
    dynamic = create_backend("onnxruntime-cpu", make_bundle(tmp_path / "d")).extract(images)
    np.testing.assert_allclose(features, dynamic, rtol=1e-5, atol=1e-6)


def test_extract_runs_the_bundle_preprocessing(tmp_path: Path, class_folders: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    paths = sorted((class_folders / "train" / "class0").glob("*.jpg"))[:2]
    images = load_images(paths, bundle.preprocess)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    features = create_backend("onnxruntime", bundle).extract(images)
    np.testing.assert_allclose(features, _reference(bundle, images), rtol=1e-5, atol=1e-6)


def test_int8_maps_to_the_cpu_variant_on_the_cpu(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", extra_variants=("int8", "int8-cpu"))
    assert resolve_variant(bundle, "onnxruntime", "int8", on_cpu=True) == "int8-cpu"
    assert resolve_variant(bundle, "onnxruntime", "int8", on_cpu=False) == "int8"
    assert resolve_variant(bundle, "tensorrt", "int8", on_cpu=False) == "int8"
    assert create_backend("onnxruntime", bundle, precision="int8").precision == "int8-cpu"
    with pytest.raises(ConfigError, match="TensorRT runs --precision int8"):
        resolve_variant(bundle, "tensorrt", "int8-cpu", on_cpu=False)


def test_int8_without_a_cpu_variant_warns(tmp_path: Path, caplog) -> None:
    bundle = make_bundle(tmp_path / "b", extra_variants=("int8",))
    with caplog.at_level(logging.WARNING):
        assert resolve_variant(bundle, "onnxruntime", "int8", on_cpu=True) == "int8"
    assert "no int8-cpu variant" in caplog.text


def test_missing_variant_and_bad_options_are_clear(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="has no 'fp16' variant"):
        create_backend("onnxruntime", bundle, precision="fp16")
    with pytest.raises(ConfigError, match="--backend 'openvino'"):
        create_backend("openvino", bundle)
    with pytest.raises(ConfigError, match="--precision 'bf16'"):
        create_backend("onnxruntime", bundle, precision="bf16")
    with pytest.raises(ConfigError, match="--threads 0"):
        create_backend("onnxruntime", bundle, threads=0)


def test_an_unloadable_model_is_a_bundle_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BundleError, match="onnxruntime cannot load it"):
        OnnxRuntimeExtractor(bad, 8)


def test_wrong_feature_dim_is_a_bundle_error(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="outputs 8 features, the manifest says 5"):
        OnnxRuntimeExtractor(bundle.variant_path(), 5)


def test_provider_fallback_is_reported(tmp_path: Path, caplog) -> None:
    bundle = make_bundle(tmp_path / "b")
    with caplog.at_level(logging.WARNING):
        extractor = OnnxRuntimeExtractor(
            bundle.variant_path(), 8, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    # On a machine without onnxruntime-gpu the CUDA provider is skipped with a warning; with
    # onnxruntime-gpu but no working CUDA, onnxruntime falls back and we say so.
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert extractor.provider == "CPUExecutionProvider"
        assert "has no CUDAExecutionProvider" in caplog.text
    elif extractor.provider != "CUDAExecutionProvider":
        assert "fallback" in caplog.text


def test_auto_picks_the_best_available_and_logs_it(tmp_path: Path, caplog) -> None:
    bundle = make_bundle(tmp_path / "b")
    reasons = available_backends()
    assert set(reasons) == {"tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"}
    assert reasons["onnxruntime-cpu"] is None
    with caplog.at_level(logging.INFO, logger="mtl_edge.backends.select"):
        extractor = create_backend("auto", bundle)
    assert "backend auto:" in caplog.text
    if reasons["tensorrt"] is not None and reasons["onnxruntime-cuda"] is not None:
        assert extractor.name == "onnxruntime" and extractor.provider == "CPUExecutionProvider"


def test_tensorrt_unavailable_is_one_line_exit_2(tmp_path: Path, monkeypatch) -> None:
    bundle = make_bundle(tmp_path / "b")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(UnavailableError) as info:
        create_backend("tensorrt", bundle)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert available_backends()["tensorrt"] is not None


def test_engine_lookup_matches_variant_and_key(tmp_path: Path) -> None:
    from mtl_edge.backends.tensorrt_runtime import find_engine

    bundle = make_bundle(tmp_path / "b")
    bundle.add_files(
        {"engines/fp32-H100-sm90-trt10.3.plan": b"engine"},
        {
            "engines": [
                {"file": "engines/fp32-H100-sm90-trt10.3.plan", "variant": "fp32"},
                {"file": "engines/missing.plan", "variant": "fp16", "key": "k"},
            ]
        },
    )
    assert find_engine(bundle, "fp32", "H100-sm90-trt10.3") is not None
    assert find_engine(bundle, "fp32", "A100-sm80-trt10.3") is None
    assert find_engine(bundle, "fp16", "k") is None  # listed but absent


def test_tensorrt_runs_when_present(tmp_path: Path) -> None:
    if available_backends()["tensorrt"] is not None:
        pytest.skip(f"TensorRT not usable here: {available_backends()['tensorrt']}")
    bundle = make_bundle(tmp_path / "b")
    extractor = create_backend("tensorrt", bundle)
    images = _images(5)
    np.testing.assert_allclose(extractor.extract(images), _reference(bundle, images), atol=1e-3)


def test_fake_tensorrt_module_does_not_count_without_cuda(monkeypatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "11.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    reason = available_backends()["tensorrt"]
    assert reason is not None and "cuda-python" in reason
