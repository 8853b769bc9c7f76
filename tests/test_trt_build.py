"""TensorRT engine building without TensorRT: key computation, TensorRT 10/11 flag detection and
the whole build flow against a fake `tensorrt` module, and the error path. A real build runs
only where TensorRT and a GPU exist (skipped here)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from device_fixtures import make_bundle

from mtl_edge.backends import trt_build
from mtl_edge.bundle import Bundle
from mtl_edge.errors import MtlEdgeError, UnavailableError


def fake_trt(version: str, weak_typing: bool, fail_parse: bool = False) -> types.ModuleType:
    """A stand-in `tensorrt` module with the API trt_build uses; records what was called."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    calls: dict[str, Any] = {"flags": [], "shapes": None, "network_flags": None}
    trt.calls = calls  # type: ignore[attr-defined]
    builder_flags = {"TF32": 1}
    if weak_typing:
        builder_flags |= {"FP16": 2, "INT8": 3}
    trt.BuilderFlag = types.SimpleNamespace(**builder_flags)  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(  # type: ignore[attr-defined]
        STRONGLY_TYPED=1
    )
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Parser:
        def __init__(self, network: Any, logger: Any) -> None:
            self.num_errors = 1 if fail_parse else 0

        def parse_from_file(self, path: str) -> bool:
            calls["parsed"] = path
            return not fail_parse

        def get_error(self, i: int) -> str:
            return "unsupported op Foo"

    class Cache:
        def serialize(self) -> bytes:
            return b"timing-cache"

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls["shapes"] = (name, lo, opt, hi)

    class Config:
        def set_memory_pool_limit(self, pool: int, size: int) -> None:
            calls["workspace"] = size

        def set_flag(self, flag: int) -> None:
            calls["flags"].append(flag)

        def add_optimization_profile(self, profile: Any) -> None:
            calls["profile_added"] = True

        def create_timing_cache(self, data: bytes) -> Cache:
            calls["cache_in"] = data
            return Cache()

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> None:
            pass

        def get_timing_cache(self) -> Cache:
            return Cache()

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> object:
            calls["network_flags"] = flags
            return object()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Any, config: Any) -> bytes:
            return b"PLAN-" + version.encode()

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, Parser, Builder  # type: ignore[attr-defined]
    return trt


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import mtl_edge.sysinfo

    monkeypatch.setattr(
        mtl_edge.sysinfo,
        "gpu_info",
        lambda: [{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}],
    )


def install(monkeypatch: pytest.MonkeyPatch, trt: types.ModuleType) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)


def test_engine_key_parts() -> None:
    key = trt_build.engine_key("NVIDIA H100 80GB HBM3", "9.0", "10.3.0.26")
    assert key == "NVIDIA-H100-80GB-HBM3-sm90-trt10.3.0.26"
    assert trt_build.engine_key("Orin (nvgpu)", "8.7", "11.0") == "Orin-nvgpu-sm87-trt11.0"
    assert trt_build.engine_key("A100", "8.0", "10.3") != trt_build.engine_key(
        "A100", "8.0", "11.0"
    )
    assert trt_build.engine_file("int8", key) == f"engines/int8-{key}.plan"


def test_engine_key_reads_this_machine(gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_trt("10.7.0", weak_typing=True))
    assert trt_build.engine_key() == "NVIDIA-H100-80GB-HBM3-sm90-trt10.7.0"


def test_no_gpu_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import mtl_edge.sysinfo

    monkeypatch.setattr(mtl_edge.sysinfo, "gpu_info", lambda: [])
    with pytest.raises(UnavailableError, match="no NVIDIA GPU") as info:
        trt_build.engine_key(tensorrt_version="10.0")
    assert info.value.exit_code == 2


def test_flags_tensorrt_10() -> None:
    trt = fake_trt("10.3.0", weak_typing=True)
    assert trt_build.has_weak_typing(trt)
    assert trt_build.precision_flags(trt, "fp32") == []
    assert trt_build.precision_flags(trt, "fp16") == [trt.BuilderFlag.FP16]
    assert trt_build.precision_flags(trt, "int8") == [trt.BuilderFlag.INT8]
    assert trt_build.network_flags(trt) == 0


def test_flags_tensorrt_11() -> None:
    trt = fake_trt("11.0.0", weak_typing=False)
    assert not trt_build.has_weak_typing(trt)
    for variant in trt_build.TRT_VARIANTS:
        assert trt_build.precision_flags(trt, variant) == []
    assert trt_build.network_flags(trt) == 1 << 1  # STRONGLY_TYPED
    del trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert trt_build.network_flags(trt) == 0  # always strongly typed, flag gone


def test_int8_cpu_variant_is_refused() -> None:
    with pytest.raises(MtlEdgeError, match="int8-cpu is onnxruntime"):
        trt_build.precision_flags(fake_trt("10.3", True), "int8-cpu")


def test_profile_validation() -> None:
    with pytest.raises(MtlEdgeError, match="min <= opt <= max"):
        trt_build.Profile(1, 16, 8)


@pytest.mark.parametrize(("version", "weak"), [("10.3.0", True), ("11.1.0", False)])
def test_build_flow_with_fake_tensorrt(
    version: str, weak: bool, gpu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt = fake_trt(version, weak_typing=weak)
    install(monkeypatch, trt)
    bundle = make_bundle(tmp_path / "b", extra_variants=("int8", "int8-cpu"))
    cache = tmp_path / "cache" / "t.cache"
    profile = trt_build.Profile(1, 4, 16)
    path = trt_build.build_engine(bundle, "int8", profile, timing_cache=cache)
    key = f"NVIDIA-H100-80GB-HBM3-sm90-trt{version}"
    assert path == bundle.root / f"engines/int8-{key}.plan"
    assert path.read_bytes() == b"PLAN-" + version.encode()
    assert trt.calls["flags"] == ([trt.BuilderFlag.INT8] if weak else [])
    assert trt.calls["network_flags"] == (0 if weak else 2)
    assert trt.calls["shapes"] == ("images", (1, 3, 16, 16), (4, 3, 16, 16), (16, 3, 16, 16))
    assert trt.calls["parsed"] == str(bundle.variant_path("int8"))
    assert cache.read_bytes() == b"timing-cache"
    reloaded = Bundle.load(bundle.root)  # engine hashed and listed
    (entry,) = reloaded.manifest["engines"]
    assert entry["key"] == key and entry["variant"] == "int8"
    assert entry["strongly_typed"] is (not weak)
    # The device runtime finds it by the same key.
    from mtl_edge.backends.tensorrt_runtime import engine_for

    assert engine_for(reloaded, "int8", build=False) == path
    # A second call reuses it; another TensorRT version builds a second engine.
    trt.calls["parsed"] = None
    assert trt_build.build_engine(reloaded, "int8", profile, timing_cache=cache) == path
    assert trt.calls["parsed"] is None
    install(monkeypatch, fake_trt("99.0", weak_typing=False))
    other = trt_build.build_engine(reloaded, "int8", profile, timing_cache=cache)
    assert other != path
    assert len(Bundle.load(bundle.root).manifest["engines"]) == 2


def test_parse_failure_is_one_line(
    gpu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(monkeypatch, fake_trt("10.3.0", weak_typing=True, fail_parse=True))
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(MtlEdgeError, match="cannot parse it \\(unsupported op Foo\\)"):
        trt_build.build_engine(bundle, "fp32", timing_cache=tmp_path / "c")
    assert Bundle.load(bundle.root).manifest["engines"] == []


def test_missing_tensorrt_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(UnavailableError, match="TensorRT is not usable here") as info:
        trt_build.build_engine(bundle, "fp32")
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_real_build(tmp_path: Path) -> None:
    """Only where TensorRT and a GPU exist: a real FP32 engine of the tiny bundle."""
    pytest.importorskip("tensorrt")
    from mtl_edge.sysinfo import gpu_info

    if not gpu_info():
        pytest.skip("no NVIDIA GPU")
    bundle = make_bundle(tmp_path / "b")
    path = trt_build.build_engine(bundle, "fp32", timing_cache=tmp_path / "cache")
    assert path.stat().st_size > 0
