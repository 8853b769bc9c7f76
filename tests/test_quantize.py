"""INT8 (S8S8 for TensorRT, U8S8 for onnxruntime CPU) and FP16 variants of a small backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from model_fixtures import tiny_ss_model
from PIL import Image

from mtl_edge.data.synthetic import make_synthetic_split, write_class_folders
from mtl_edge.errors import DatasetError
from mtl_edge.export import fp16, parity, quantize
from mtl_edge.export.check import CHECK_COSINE
from mtl_edge.export.onnx_export import export_onnx
from mtl_edge.fewshot.heads import CentroidHead
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.fuse import fuse_model

SIZE = 20
CFG = Preprocess(size=SIZE)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folded = fuse_model(tiny_ss_model(seed=5))
    return export_onnx(folded, (3, SIZE, SIZE), tmp_path_factory.mktemp("q") / "fp32.onnx")


@pytest.fixture(scope="module")
def data() -> tuple[object, np.ndarray]:
    split = make_synthetic_split(8, 20, SIZE, seed=1)
    return split, parity.split_images(split, CFG)


@pytest.fixture(scope="module")
def variants(fp32: Path, data: tuple[object, np.ndarray]) -> dict[str, Path]:
    split, _ = data
    calib = quantize.sample_calibration(split, CFG, count=64)  # type: ignore[arg-type]
    out = {}
    for name in quantize.VARIANTS:
        out[name] = fp32.with_name(f"{name}.onnx")
        quantize.quantize_variant(fp32, out[name], calib, name)
    return out


def _zero_point_types(path: Path) -> set[int]:
    """Element types of the activation QuantizeLinear zero points."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    return {
        inits[n.input[2]].data_type
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits
    }


def test_every_conv_gets_qdq(variants: dict[str, Path]) -> None:
    for path in variants.values():
        counts = quantize.qdq_conv_count(path)
        assert counts["convs"] == 16
        assert counts["convs_with_qdq"] == 16


def test_activation_types(variants: dict[str, Path]) -> None:
    assert _zero_point_types(variants["int8"]) == {onnx.TensorProto.INT8}
    assert _zero_point_types(variants["int8-cpu"]) == {onnx.TensorProto.UINT8}


def test_cpu_variant_runs_all_convs_quantized(variants: dict[str, Path]) -> None:
    kernels = quantize.runtime_conv_kernels(variants["int8-cpu"])
    assert kernels["quantized"] == 16
    assert kernels["float"] == 0


def test_int8_features_close_and_accuracy_report(
    fp32: Path, variants: dict[str, Path], data: tuple[object, np.ndarray]
) -> None:
    split, images = data
    ref = parity.ort_features(parity.ort_session(fp32), images)
    for path in variants.values():
        got = parity.ort_features(parity.ort_session(path), images)
        heads = {"centroid": CentroidHead}
        report = parity.accuracy_change(ref, got, split, heads, episodes=600)  # type: ignore[arg-type]
        assert report["cosine_min"] > CHECK_COSINE["int8"]  # the bundle check's tolerance
        for shots in (1, 5):
            entry = report[f"5way_{shots}shot"]["centroid"]
            assert entry["episodes"] == 600
            assert entry["change"] == pytest.approx(entry["candidate"] - entry["reference"])
            assert abs(entry["change"]) < 5.0  # percentage points


def test_fp16_variant_keeps_float32_io(fp32: Path, data: tuple[object, np.ndarray]) -> None:
    _, images = data
    half = fp32.with_name("fp16.onnx")
    fp16.convert_fp16(fp32, half)
    model = onnx.load(str(half))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    ref = parity.ort_features(parity.ort_session(fp32), images[:16])
    got = parity.ort_features(parity.ort_session(half), images[:16])
    assert got.dtype == np.float32
    assert parity.compare_features(ref, got)["cosine_min"] > 0.999


def test_calibration_from_class_folders_and_flat(tmp_path: Path) -> None:
    split = make_synthetic_split(3, 5, 16, seed=0)
    write_class_folders(split, tmp_path / "classes")
    from_classes = quantize.calibration_split(tmp_path / "classes", "RGB")
    assert from_classes.num_classes == 3 and len(from_classes) == 15
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(split.arrays[i]).save(flat / f"{i}.png")  # type: ignore[index]
    assert len(quantize.calibration_split(flat, "RGB")) == 4


def test_calibration_sample_is_balanced_and_seeded() -> None:
    split = make_synthetic_split(4, 10, 12, seed=0)
    cfg = Preprocess(size=12)
    a = quantize.sample_calibration(split, cfg, count=8, seed=3)
    b = quantize.sample_calibration(split, cfg, count=8, seed=3)
    assert a.shape == (8, 3, 12, 12)
    np.testing.assert_array_equal(a, b)
    assert len(quantize.sample_calibration(split, cfg, count=1000)) == 40


def test_calibration_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        quantize.calibration_split(tmp_path / "missing", "RGB")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        quantize.calibration_split(tmp_path / "empty", "RGB")
