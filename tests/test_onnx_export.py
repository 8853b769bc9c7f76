"""ONNX export of a folded backbone: graph content, interface, dynamic batch, ORT parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from model_fixtures import tiny_ss_model

from mtl_edge.data.synthetic import make_synthetic_split
from mtl_edge.errors import MtlEdgeError
from mtl_edge.export import parity
from mtl_edge.export.onnx_export import (
    FORBIDDEN_OPS,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    check_graph,
    export_onnx,
    op_counts,
)
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.fuse import fuse_model

SIZE = 20


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    folded = fuse_model(tiny_ss_model(seed=4))
    path = export_onnx(folded, (3, SIZE, SIZE), tmp_path_factory.mktemp("onnx") / "b.onnx")
    return folded, path


def test_graph_is_folded_and_checked(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = op_counts(model)
    for op in FORBIDDEN_OPS:
        assert op not in ops, f"{op} left in the graph: {dict(ops)}"
    assert ops["Conv"] == 16  # 4 residual blocks x (3 convs + a 1x1 shortcut)
    assert any(o.domain in ("", "ai.onnx") and o.version == OPSET for o in model.opset_import)
    assert not model.graph.initializer or all(
        not t.HasField("data_location") or t.data_location == onnx.TensorProto.DEFAULT
        for t in model.graph.initializer
    )  # weights inside the file, not external data
    assert not list(path.parent.glob("*.data"))


def test_interface_names_and_dynamic_batch(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.output] == [OUTPUT_NAME]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_parity_at_batches_1_7_32(exported: tuple[torch.nn.Module, Path]) -> None:
    folded, path = exported
    report = parity.tensor_parity(folded, path, (3, SIZE, SIZE))
    assert set(report["batches"]) == {"1", "7", "32"}
    assert report["max_abs"] <= 1e-4
    assert report["cosine_min"] >= 0.9999
    assert report["pass"]


def test_identical_predictions_on_200_episodes(exported: tuple[torch.nn.Module, Path]) -> None:
    folded, path = exported
    split = make_synthetic_split(6, 16, SIZE, seed=2)
    images = parity.split_images(split, Preprocess(size=SIZE))
    report = parity.features_parity(folded, parity.ort_session(path), split, images, 200)
    assert report["episodes"]["episodes"] == 200
    assert report["episodes"]["identical_episodes"] == 200
    assert report["max_abs"] <= 1e-4


def test_episode_agreement_detects_a_different_model() -> None:
    split = make_synthetic_split(6, 16, 12, seed=2)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((len(split), 8)).astype(np.float32)
    b = rng.standard_normal((len(split), 8)).astype(np.float32)
    eps = parity.check_episodes(split, 50, shots=1)
    assert parity.episode_agreement(a, a, split.labels, eps)["pass"]
    assert not parity.episode_agreement(a, b, split.labels, eps)["pass"]


def test_compare_features_zero_rows() -> None:
    z = np.zeros((2, 4), dtype=np.float32)
    one = np.ones((2, 4), dtype=np.float32)
    assert parity.compare_features(z, z)["cosine_min"] == 1.0
    assert parity.compare_features(z, one)["cosine_min"] == 0.0


def test_check_graph_refuses_unfolded_ops(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["images", "images"], ["features"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
    )
    with pytest.raises(MtlEdgeError, match="Mul"):
        check_graph(helper.make_model(graph), tmp_path / "g.onnx")


def test_example_batch_of_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="example_batch"):
        export_onnx(fuse_model(tiny_ss_model()), (3, 8, 8), tmp_path / "x.onnx", example_batch=1)
