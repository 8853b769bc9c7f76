"""Meta-test: the interval formula, the heads, paired evaluation, determinism, fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.data.synthetic import make_synthetic_split
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.heads import (
    LogisticRegressionHead,
    MTLHead,
    NearestCentroidHead,
    finetune_everything,
)
from mtl_edge.train.meta_transfer import MetaTransferLearner
from mtl_edge.train.metatest import (
    confidence_interval,
    evaluate_finetune,
    evaluate_heads,
    extract_features,
    meta_test,
)


def test_confidence_interval_known_numbers() -> None:
    mean, half = confidence_interval([50.0, 60.0, 70.0, 80.0])
    # std (ddof=0) = sqrt(125) = 11.1803..., 1.96 * 11.1803 / 2 = 10.9567
    assert mean == pytest.approx(65.0)
    assert half == pytest.approx(1.96 * np.sqrt(125.0) / 2.0)
    assert confidence_interval([1.0]) == (1.0, 0.0)
    with pytest.raises(ValueError):
        confidence_interval([])


def _blobs(ways: int = 4, per: int = 10, dim: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(ways, dim, generator=g) * 3
    labels = torch.arange(ways).repeat_interleave(per)
    return centers[labels] + 0.3 * torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize(
    "make",
    [
        MTLHead,
        NearestCentroidHead,
        lambda: NearestCentroidHead("euclidean"),
        LogisticRegressionHead,
    ],
)
def test_heads_classify_separable_features(make) -> None:
    x, y = _blobs()
    head = make()
    head.fit(x[::2], y[::2])
    logits = head.predict(x[1::2])
    assert logits.shape == (20, 4)
    assert (logits.argmax(1) == y[1::2]).float().mean() == 1.0


def test_logreg_reaches_its_optimum() -> None:
    x, y = _blobs(seed=2)
    head = LogisticRegressionHead(C=1.0, max_iter=200)
    head.fit(x, y)
    xn = F.normalize(x.double(), dim=1)
    w = head.weight.clone().requires_grad_(True)
    b = head.bias.clone().requires_grad_(True)
    loss = F.cross_entropy(xn @ w.T + b, y, reduction="sum") + 0.5 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4


def test_centroid_cosine_ignores_feature_norms() -> None:
    x, y = _blobs(seed=1)
    head = NearestCentroidHead("cosine")
    head.fit(x, y)
    torch.testing.assert_close(head.predict(x * 7.0), head.predict(x))


def test_mtl_head_uses_meta_init_only_for_matching_ways() -> None:
    x, y = _blobs()
    init = torch.randn(4, 6)
    head = MTLHead(init, torch.zeros(4), steps=0)
    head.fit(x, y)
    torch.testing.assert_close(head.weight, init)
    head3 = MTLHead(init, torch.zeros(4), steps=0)
    keep = y < 3
    head3.fit(x[keep], y[keep])
    assert torch.equal(head3.weight, torch.zeros(3, 6))


@pytest.fixture(scope="module")
def tiny_split():
    return make_synthetic_split(6, 12, size=16, seed=0)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_backbone("conv4", width=8).eval()


CFG = Preprocess(size=16)


def test_extract_features_matches_direct_forward(tiny_split, tiny_model) -> None:
    feats = extract_features(tiny_model, tiny_split, batch_size=5, cfg=CFG)
    assert feats.shape == (len(tiny_split), 8) and feats.dtype == np.float32
    from mtl_edge.preprocess import preprocess_image

    x = torch.from_numpy(preprocess_image(tiny_split.image(7), CFG))[None]
    with torch.no_grad():
        np.testing.assert_allclose(feats[7], tiny_model(x)[0].numpy(), rtol=1e-5, atol=1e-6)


def test_evaluate_heads_same_episodes_and_deterministic(tiny_split, tiny_model) -> None:
    feats = extract_features(tiny_model, tiny_split, cfg=CFG)
    heads = {"mtl": MTLHead, "centroid": NearestCentroidHead, "logreg": LogisticRegressionHead}

    def run(seed: int):
        eps = EpisodeSampler.for_split(tiny_split, 3, 2, 4, seed).episodes(6)
        return evaluate_heads(feats, tiny_split.labels, eps, heads)

    a, b, c = run(0), run(0), run(1)
    for name in heads:
        assert a[name].accuracies == b[name].accuracies
        assert len(a[name].accuracies) == 6
        assert 0.0 <= a[name].mean <= 100.0
    assert any(a[n].accuracies != c[n].accuracies for n in heads)


def test_episodes_of_another_split_are_refused(tiny_split, tiny_model) -> None:
    feats = np.zeros((len(tiny_split), 8), dtype=np.float32)
    bad = Episode(np.array([0, 1]), np.array([0, 1]), np.array([2, 3]))  # both from class 0
    with pytest.raises(DatasetError, match="another split"):
        evaluate_heads(feats, tiny_split.labels, [bad], {"c": NearestCentroidHead})


def test_features_of_another_split_are_refused(tiny_split) -> None:
    eps = EpisodeSampler.for_split(tiny_split, 3, 1, 2, 0).episodes(1)
    with pytest.raises(DatasetError, match="extract"):
        evaluate_heads(np.zeros((5, 8)), tiny_split.labels, eps, {"c": NearestCentroidHead})


def test_finetune_everything_leaves_model_unchanged(tiny_split) -> None:
    torch.manual_seed(0)
    learner = MetaTransferLearner(create_backbone("conv4", width=8), ways=3, test_steps=3)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    x = torch.randn(6, 3, 16, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = finetune_everything(learner, x, y, x, steps=40, lr=0.1)
    assert logits.shape == (6, 3)
    # fitting the support set itself: fine-tuning reaches perfect support accuracy
    assert (logits.argmax(1) == y).all()
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_evaluate_finetune_runs(tiny_split, tiny_model) -> None:
    from mtl_edge.preprocess import preprocess_image

    def load(idx):
        return torch.from_numpy(
            np.stack([preprocess_image(tiny_split.image(int(i)), CFG) for i in idx])
        )

    eps = EpisodeSampler.for_split(tiny_split, 3, 1, 2, 0).episodes(2)
    res = evaluate_finetune(tiny_model, load, eps, steps=2, lr=0.01)
    assert len(res.accuracies) == 2


def test_meta_test_table_is_json_and_deterministic(tiny_split) -> None:
    torch.manual_seed(0)
    learner = MetaTransferLearner(create_backbone("conv4", width=8), ways=3, test_steps=10)
    kw = dict(ways=3, shots_list=(1, 2), episodes=4, queries=3, seed=0)
    a = meta_test(learner, tiny_split, CFG, **kw)
    b = meta_test(learner, tiny_split, CFG, **kw)
    assert json.loads(json.dumps(a)) == a == b
    assert set(a["results"]) == {"1", "2"}
    assert set(a["results"]["1"]) == {"mtl", "centroid", "logreg"}
    with pytest.raises(ConfigError, match="unknown"):
        meta_test(learner, tiny_split, CFG, heads=("knn",), **kw)
    ft = meta_test(learner, tiny_split, CFG, heads=("ft", "centroid"), ft_steps=1, **kw)
    assert list(ft["results"]["1"]) == ["centroid", "finetune"] and ft["heads"] == [
        "finetune",
        "centroid",
    ]
    with pytest.raises(DatasetError, match="ways"):
        meta_test(learner, tiny_split, CFG, ways=10, shots_list=(1,), episodes=1)
    with pytest.raises(ConfigError, match="shots"):
        meta_test(learner, tiny_split, CFG, ways=3, shots_list=(), episodes=1)


def test_cuda_without_cuda_is_one_clear_error(tiny_split, tiny_model) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from mtl_edge.errors import UnavailableError

    with pytest.raises(UnavailableError, match="CUDA"):
        extract_features(tiny_model, tiny_split, cfg=CFG, device="cuda")
