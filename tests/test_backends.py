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
from mtl_edge.bundle import Bundle
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


# --- the TensorRT runtime's Python logic against fake tensorrt / cuda-python modules ---------
# This checks our side (engine lookup and build, tensor names, shapes, chunking, buffers and
# copies), not TensorRT itself: the fakes follow the documented API, nothing here ran on a GPU.


class _FakeCudart(types.ModuleType):
    """cuda-python's runtime API on host memory: pointers index a dict of bytearrays."""

    class cudaError_t:  # noqa: N801 - mirrors cuda-python's name
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.memory: dict[int, bytearray] = {}
        self.freed: list[int] = []

    def cudaMalloc(self, n: int):  # noqa: N802
        ptr = 4096 * (len(self.memory) + 1)
        self.memory[ptr] = bytearray(n)
        return 0, ptr

    def cudaFree(self, ptr: int):  # noqa: N802
        self.freed.append(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        import ctypes

        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.memory[dst][:n] = ctypes.string_at(src, n)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:n]), n)
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        return 0, 7

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (0,)

    def cudaGetDeviceCount(self):  # noqa: N802
        return 0, 1

    def cudaGetDeviceProperties(self, index: int):  # noqa: N802
        return 0, types.SimpleNamespace(name=b"FakeGPU")


def _fake_tensorrt(cudart: _FakeCudart, onnx_path: Path, max_batch: int) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: np.float32
    trt.BuilderFlag = types.SimpleNamespace(FP16=1, INT8=2)  # TensorRT 10 style
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shapes: list[tuple[int, ...]] = []

    class Context:
        def __init__(self) -> None:
            self.addr: dict[str, int] = {}
            self.shape: tuple[int, ...] = ()

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            shapes.append(tuple(shape))
            self.shape = tuple(shape)
            return name == "images" and 1 <= shape[0] <= max_batch

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addr[name] = ptr

        def execute_async_v3(self, stream: int) -> bool:
            n = int(np.prod(self.shape)) * 4
            x = np.frombuffer(bytes(cudart.memory[self.addr["images"]][:n]), np.float32)
            y = session.run(None, {"images": x.reshape(self.shape)})[0]
            cudart.memory[self.addr["features"]][: y.nbytes] = y.tobytes()
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["images", "features"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "images" else "out"

        def get_tensor_dtype(self, name: str) -> str:
            return "float"

        def get_tensor_profile_shape(self, name: str, profile: int):
            return [(1, 3, 16, 16), (max_batch, 3, 16, 16), (max_batch, 3, 16, 16)]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return Engine() if data == b"fake engine" else None

    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Runtime = Runtime
    trt.shapes = shapes
    return trt


@pytest.fixture
def fake_trt(tmp_path: Path, monkeypatch):
    bundle = make_bundle(tmp_path / "b")
    cudart = _FakeCudart()
    trt = _fake_tensorrt(cudart, bundle.variant_path(), max_batch=4)
    cuda_pkg = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda_pkg.bindings = bindings
    builds: list[str] = []
    from mtl_edge.backends import trt_build

    def build_serialized(trt_module, onnx_path, input_name, shape, variant, *args):
        builds.append(variant)
        return b"fake engine"

    monkeypatch.setattr(trt_build, "this_gpu", lambda: ("Fake GPU", "9.0"))
    monkeypatch.setattr(trt_build, "_build_serialized", build_serialized)
    for name, module in {
        "tensorrt": trt,
        "cuda": cuda_pkg,
        "cuda.bindings": bindings,
        "cuda.bindings.runtime": cudart,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(bundle=bundle, cudart=cudart, trt=trt, builds=builds)


def test_tensorrt_runtime_logic_with_fakes(fake_trt) -> None:
    assert available_backends()["tensorrt"] is None
    extractor = create_backend("tensorrt", fake_trt.bundle, batch_size=32)
    assert fake_trt.builds == ["fp32"]  # no engine for this GPU: built once and stored
    entry = Bundle.load(fake_trt.bundle.root).manifest["engines"][0]
    assert entry["key"] == "Fake-GPU-sm90-trt10.3.0" and entry["variant"] == "fp32"
    assert extractor.provider == "TensorRT 10.3.0 on FakeGPU" and extractor.batch_size == 4
    images = _images(10, seed=3)
    features = extractor.extract(images)
    np.testing.assert_allclose(features, _reference(fake_trt.bundle, images), atol=1e-6)
    assert fake_trt.trt.shapes == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]
    # the stored engine is found next time, no rebuild
    create_backend("tensorrt", Bundle.load(fake_trt.bundle.root))
    assert fake_trt.builds == ["fp32"]
    extractor.close()
    assert len(fake_trt.cudart.freed) == 2


def test_auto_prefers_tensorrt_and_falls_back(fake_trt, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mtl_edge.backends.select"):
        assert create_backend("auto", fake_trt.bundle).name == "tensorrt"
    assert "backend auto: tensorrt" in caplog.text
    entry = Bundle.load(fake_trt.bundle.root).manifest["engines"][0]
    (fake_trt.bundle.root / entry["file"]).write_bytes(b"corrupt engine")
    bundle = Bundle.load(fake_trt.bundle.root, verify=False)
    with caplog.at_level(logging.WARNING):
        extractor = create_backend("auto", bundle)
    assert extractor.name == "onnxruntime"
    assert "tensorrt failed" in caplog.text and "cannot deserialize" in caplog.text
