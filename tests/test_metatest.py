"""Meta-test: features once, every head on the same seeded episodes, the fine-tune head."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.data.synthetic import make_synthetic_split
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess, preprocess_image
from mtl_edge.settings import from_dict
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.config import EvalConfig
from mtl_edge.train.finetune import FinetuneHead
from mtl_edge.train.metatest import extract_features, image_loader, meta_test
from mtl_edge.train.ss import convert_to_ss

CFG = Preprocess(size=16)


@dataclass
class Model:
    """What meta-test needs (a LoadedCheckpoint has the same fields)."""

    backbone: nn.Module
    preprocess: Preprocess = CFG
    head: HeadRecipe = HeadRecipe(steps=10)
    meta_init: tuple[np.ndarray, np.ndarray] | None = None


@pytest.fixture(scope="module")
def tiny_split():
    return make_synthetic_split(6, 12, size=16, seed=0)


@pytest.fixture(scope="module")
def tiny_model() -> Model:
    torch.manual_seed(0)
    return Model(create_backbone("conv4", width=8).eval())


def _protocol(**kw) -> EvalConfig:
    base = {"ways": 3, "shots": [1, 2], "episodes": 4, "queries": 3, "seed": 0}
    return from_dict(EvalConfig, base | kw)


def test_extract_features_matches_direct_forward(tiny_split, tiny_model) -> None:
    load = image_loader(tiny_split, CFG)
    feats = extract_features(tiny_model.backbone, load, len(tiny_split), batch_size=5)
    assert feats.shape == (len(tiny_split), 8) and feats.dtype == np.float32
    x = torch.from_numpy(preprocess_image(tiny_split.image(7), CFG))[None]
    with torch.no_grad():
        expected = tiny_model.backbone(x)[0].numpy()
    np.testing.assert_allclose(feats[7], expected, rtol=1e-5, atol=1e-6)


def test_meta_test_table_is_json_and_deterministic(tiny_split, tiny_model) -> None:
    a = meta_test(tiny_model, tiny_split, _protocol())
    b = meta_test(tiny_model, tiny_split, _protocol())
    assert json.loads(json.dumps(a)) == a == b
    assert set(a["results"]) == {"1", "2"}
    assert set(a["results"]["1"]) == {"mtl", "centroid", "logreg"}
    c = meta_test(tiny_model, tiny_split, _protocol(seed=1))
    assert c["results"] != a["results"]  # another seed, other episodes
    with pytest.raises(ConfigError, match="unknown"):
        meta_test(tiny_model, tiny_split, _protocol(heads=["knn"]))
    with pytest.raises(DatasetError, match="ways"):
        meta_test(tiny_model, tiny_split, _protocol(ways=10))


def test_meta_test_uses_the_models_head_recipe(tiny_split, tiny_model) -> None:
    """The "mtl" head is the model's deploy recipe from its meta-learned init: with zero steps
    it scores the init itself, so an init that prefers one class gives chance or worse."""
    init = (np.zeros((3, 8), np.float32), np.array([5.0, 0.0, 0.0], np.float32))
    fixed = Model(tiny_model.backbone, head=HeadRecipe(steps=0, init="meta"), meta_init=init)
    res = meta_test(fixed, tiny_split, _protocol(shots=[1], heads=["mtl"]))
    assert res["results"]["1"]["mtl"]["mean"] == pytest.approx(100.0 / 3)


def test_finetune_head_in_meta_test(tiny_split, tiny_model) -> None:
    res = meta_test(
        tiny_model, tiny_split, _protocol(heads=["ft", "centroid"], ft_steps=1, ft_episodes=2)
    )
    assert list(res["results"]["1"]) == ["centroid", "finetune"]
    assert res["heads"] == ["finetune", "centroid"]
    assert res["results"]["1"]["finetune"]["episodes"] == 2


def test_finetune_head_leaves_the_model_unchanged_and_fits_the_support() -> None:
    torch.manual_seed(0)
    backbone = convert_to_ss(create_backbone("conv4", width=8)).eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(6, 3, 16, 16)
    y = np.array([0, 0, 1, 1, 2, 2])
    for kw in ({}, {"batch_size": 4, "bn_mode": "train", "head_init": "prototypes", "momentum": 0}):
        head = FinetuneHead(backbone, steps=40, lr=0.1, **kw)
        head.fit(x, y)
        scores = head.predict(x)
        assert scores.shape == (6, 3)
        assert (scores.argmax(1) == y).mean() >= 5 / 6  # it learns the support set
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    with pytest.raises(ConfigError, match="bn_mode"):
        FinetuneHead(backbone, bn_mode="batch")


def test_cuda_without_cuda_is_one_clear_error(tiny_split, tiny_model) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from mtl_edge.errors import UnavailableError

    load = image_loader(tiny_split, CFG)
    with pytest.raises(UnavailableError, match="CUDA"):
        extract_features(tiny_model.backbone, load, len(tiny_split), device="cuda")


def test_episodes_are_the_samplers(tiny_split, tiny_model) -> None:
    """Meta-test's episodes for (ways, shots, queries, seed) are the sampler's 0..n-1."""
    protocol = _protocol(shots=[2], heads=["centroid"], episodes=3)
    load = image_loader(tiny_split, CFG)
    feats = extract_features(tiny_model.backbone, load, len(tiny_split))
    res = meta_test(tiny_model, tiny_split, protocol, features=feats)
    from mtl_edge.fewshot.evaluate import evaluate_episodes
    from mtl_edge.fewshot.heads import CentroidHead

    eps = EpisodeSampler.for_split(tiny_split, 3, 2, 3, 0).episodes(3)
    again = evaluate_episodes(feats, tiny_split.labels, eps, {"c": CentroidHead})["c"]
    assert res["results"]["2"]["centroid"]["mean"] == again.mean
