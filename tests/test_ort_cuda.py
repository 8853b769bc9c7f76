"""The onnxruntime CUDA path (`ort_cuda.py`): binding, CUDA-graph buckets, pinned staging,
prefetching and the refusal of a silent CPU fallback, against a fake onnxruntime (`fake_ort.py`)
and, for the binding logic, the real CPU provider. Nothing here ran on a GPU."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from device_fixtures import IMAGE_SIZE, make_bundle
from fake_ort import CPU, CUDA, FakeCudart, FakeState, fake_features, make_fake_ort

from mtl_edge.backends import cuda_libs
from mtl_edge.backends.ort_cuda import OrtCudaExtractor, bucket_of, buckets_for
from mtl_edge.backends.prefetch import prefetched
from mtl_edge.backends.select import create_backend
from mtl_edge.errors import UnavailableError

SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
WEIGHT = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


@pytest.fixture
def fake(monkeypatch, tmp_path: Path):
    """A fake onnxruntime where CUDA runs, a fake CUDA runtime, and a tiny bundle."""
    state = FakeState()
    cudart = FakeCudart()
    monkeypatch.setitem(sys.modules, "onnxruntime", make_fake_ort(WEIGHT, SHAPE, state))
    monkeypatch.setattr(cuda_libs, "preload", lambda dirs=None: {"missing": []})
    monkeypatch.setattr(cuda_libs, "cudart", lambda: cudart)
    state.cudart = cudart
    state.bundle = make_bundle(tmp_path / "b")
    return state


def _extractor(fake: FakeState, **kw) -> OrtCudaExtractor:
    return OrtCudaExtractor(fake.bundle.variant_path(), 8, image_shape=SHAPE, **kw)


def test_buckets_are_powers_of_two_up_to_the_batch_size() -> None:
    assert buckets_for(1) == [1]
    assert buckets_for(6) == [1, 2, 4, 6]
    assert buckets_for(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert [bucket_of(n, [1, 2, 4, 6]) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


def test_extract_binds_once_per_bucket_and_replays_its_graph(fake) -> None:
    ext = _extractor(fake, batch_size=4)
    images = _images(11)
    features = ext.extract(images)
    np.testing.assert_allclose(features, fake_features(images, WEIGHT), rtol=1e-5)
    options = fake.sessions[0]["options"]
    assert options["enable_cuda_graph"] == "1" and options["cudnn_conv_algo_search"]
    assert ext.provider == CUDA and ext.info["cuda_graphs"] and ext.buckets == [1, 2, 4]
    runs = [e for e in fake.events if e[0] == "run"]
    assert runs == [("run", 4, "3")] * 3  # 4 + 4 + 3 padded to 4: one graph id, three replays
    assert [e for e in fake.events if e[0] == "bind_in"] == [("bind_in", "images", (4, *SHAPE))]
    ext.extract(images[:2])
    ext.extract(images[:1])
    graph_ids = {e[2] for e in fake.events if e[0] == "run"}
    assert graph_ids == {"1", "2", "3"}  # one captured graph per bucket, never 0 or -1
    assert len([e for e in fake.events if e[0] == "bind_in"]) == 3
    uploads = [e for e in fake.events if e[0] == "upload"]
    assert all(e[1] == "cuda" for e in uploads)  # copies go to the device OrtValue


def test_padding_rows_are_zero_and_dropped(fake) -> None:
    ext = _extractor(fake, batch_size=8)
    images = _images(5, seed=1)
    features = ext.extract(images)
    assert features.shape == (5, 8)
    device_in = ext.slot(8).device_in.array
    np.testing.assert_array_equal(device_in[5:], 0.0)
    np.testing.assert_allclose(device_in[:5], images)


def test_pinned_staging_is_allocated_and_freed(fake) -> None:
    ext = _extractor(fake, batch_size=4)
    assert ext.info["pinned"] is True and len(fake.cudart.buffers) == 2
    ext.extract(_images(6))
    ext.close()
    assert sorted(fake.cudart.freed) == sorted(fake.cudart.buffers)


def test_failed_pinned_allocation_falls_back_to_pageable(fake, caplog) -> None:
    fake.cudart.fail = True
    with caplog.at_level(logging.WARNING):
        ext = _extractor(fake, batch_size=4)
    assert ext.info["pinned"] is False and "cudaHostAlloc" in ext.info["pinned_reason"]
    assert "pageable" in caplog.text
    np.testing.assert_allclose(ext.extract(_images(3)), fake_features(_images(3), WEIGHT), 1e-5)


def test_refused_cuda_graphs_rebuild_the_session_without_them(fake) -> None:
    fake.refuse_graphs = True
    ext = _extractor(fake, batch_size=4)
    assert ext.cuda_graphs is False and "CUDA Graph" in ext.info["cuda_graph_error"]
    assert [s["options"]["enable_cuda_graph"] for s in fake.sessions] == ["1", "0"]
    ext.extract(_images(3))
    assert {e[2] for e in fake.events if e[0] == "run"} == {None}


def test_a_failed_capture_reruns_without_graphs_once(fake, caplog) -> None:
    ext = _extractor(fake, batch_size=4)
    fake.fail_capture = True
    images = _images(6, seed=4)
    with caplog.at_level(logging.WARNING):
        features = ext.extract(images)
    np.testing.assert_allclose(features, fake_features(images, WEIGHT), rtol=1e-5)
    assert ext.cuda_graphs is False and "capturing" in ext.info["cuda_graph_error"]
    assert [s["options"]["enable_cuda_graph"] for s in fake.sessions] == ["1", "0"]
    assert "running without CUDA graphs" in caplog.text


def test_a_silent_cpu_fallback_is_an_error_for_onnxruntime_cuda(fake, caplog) -> None:
    fake.runs_on = [CPU]
    with pytest.raises(UnavailableError, match="runs on CPUExecutionProvider, not CUDA"):
        _extractor(fake)
    with pytest.raises(UnavailableError, match="docs/gpu-inference.md"):
        create_backend("onnxruntime-cuda", fake.bundle)
    for name in ("onnxruntime", "auto"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            extractor = create_backend(name, fake.bundle)
        assert type(extractor).__name__ == "OnnxRuntimeExtractor"
        assert "running onnxruntime on the CPU instead" in caplog.text


def test_select_routes_the_cuda_provider_to_the_binding_extractor(fake) -> None:
    for name in ("onnxruntime-cuda", "onnxruntime", "auto"):
        extractor = create_backend(name, fake.bundle, batch_size=16)
        assert isinstance(extractor, OrtCudaExtractor) and extractor.provider == CUDA
        assert extractor.batch_size == 16
    fake.available = [CPU]
    assert type(create_backend("onnxruntime", fake.bundle)).__name__ == "OnnxRuntimeExtractor"


def test_fp16_io_is_staged_as_float16(fake) -> None:
    fake.io_type = "tensor(float16)"
    ext = _extractor(fake, batch_size=2)
    features = ext.extract(_images(3))
    assert features.dtype == np.float32
    assert {e[3] for e in fake.events if e[0] == "upload"} == {"float16"}
    np.testing.assert_allclose(features, fake_features(_images(3), WEIGHT), atol=2e-2)


def test_static_batch_models_use_their_size_only(fake) -> None:
    fake.static_batch = 4
    ext = _extractor(fake, batch_size=64)
    assert ext.buckets == [4] and ext.extract(_images(6)).shape == (6, 8)


def test_extract_sources_decodes_on_the_producer_thread(fake, class_folders: Path) -> None:
    from mtl_edge.preprocess import load_images

    paths = sorted((class_folders / "train").rglob("*.jpg"))[:5]
    ext = _extractor(fake, batch_size=2, workers=2)
    pre = fake.bundle.preprocess
    np.testing.assert_allclose(
        ext.extract_sources(paths, pre), ext.extract(load_images(paths, pre)), rtol=1e-5
    )


def test_the_real_cpu_provider_gives_the_plain_session_features(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    bundle = make_bundle(tmp_path / "b")
    ext = OrtCudaExtractor(bundle.variant_path(), 8, device="cpu", batch_size=4, image_shape=SHAPE)
    assert ext.provider == CPU and ext.cuda_graphs is False and ext.info["pinned"] is False
    images = _images(9, seed=2)
    ref = ort.InferenceSession(str(bundle.variant_path()), providers=[CPU])
    np.testing.assert_allclose(
        ext.extract(images), ref.run(None, {"images": images})[0], rtol=1e-5, atol=1e-6
    )


def test_prefetch_fills_the_next_batch_while_the_caller_works() -> None:
    started = [threading.Event() for _ in range(4)]

    def fill(job: int, buf: np.ndarray) -> int:
        started[job].set()
        buf[...] = job
        return job * 10

    seen = []
    for job, buf, result in prefetched(range(4), fill, [np.zeros(3), np.zeros(3)]):
        if job < 3:  # the producer fills job + 1 into the other buffer meanwhile
            assert started[job + 1].wait(timeout=10)
        seen.append((job, float(buf[0]), result))
    assert seen == [(0, 0.0, 0), (1, 1.0, 10), (2, 2.0, 20), (3, 3.0, 30)]


def test_prefetch_raises_the_producer_error_and_stops_early() -> None:
    def fill(job: int, buf: np.ndarray) -> None:
        if job == 2:
            raise ValueError("bad image 2")

    with pytest.raises(ValueError, match="bad image 2"):
        for _ in prefetched(range(5), fill, [np.zeros(1), np.zeros(1)]):
            pass
    gen = prefetched(iter(range(10**6)), lambda j, b: None, [np.zeros(1), np.zeros(1)])
    next(gen)
    gen.close()  # must not hang on a producer blocked on a full pipeline
    assert not any(t.name == "mtl-edge-prefetch" and t.is_alive() for t in threading.enumerate())


def test_cuda_library_discovery(monkeypatch, tmp_path: Path) -> None:
    nvidia = tmp_path / "site" / "nvidia"
    for sub in ("cu13/lib", "cudnn/lib", "nccl/lib"):
        (nvidia / sub).mkdir(parents=True)
    (nvidia / "cu13" / "lib" / "libcudart.so.13").write_bytes(b"")
    extra = tmp_path / "extra"
    extra.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv(cuda_libs.ENV_DIRS, str(extra))
    dirs = cuda_libs.candidate_dirs()
    assert dirs[:4] == [extra, nvidia / "cu13/lib", nvidia / "cudnn/lib", nvidia / "nccl/lib"]
    assert cuda_libs.find_library("libcudart.so.13", dirs) == nvidia / "cu13/lib/libcudart.so.13"
    assert cuda_libs.ld_library_path(dirs[:2]) == f"{extra}:{nvidia / 'cu13/lib'}"
    report = cuda_libs.preload([extra])  # what cannot be loaded is reported, not raised
    accounted = set(report["loaded"]) | set(report["missing"]) | set(report["optional_missing"])
    assert accounted == set(cuda_libs.SONAMES)
    assert set(report["missing"]).isdisjoint(cuda_libs.OPTIONAL)
    assert str(extra) in report["dirs"]
