"""The few-shot core: the head contract, each head, and the one evaluation loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.fewshot.evaluate import EvalResult, evaluate_episodes
from mtl_edge.fewshot.fc import HeadRecipe, fit_head, softmax
from mtl_edge.fewshot.heads import (
    CentroidHead,
    FCHead,
    LogRegHead,
    canonical_heads,
    feature_head,
)
from mtl_edge.stats import mean_ci


def _clusters(ways: int = 5, per: int = 12, dim: int = 16, spread: float = 0.8, seed: int = 0):
    """Features (ways * per, dim) around one centre per class, labels (ways * per,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (ways, dim)) + 2.0
    labels = np.repeat(np.arange(ways), per)
    return (centres[labels] + spread * rng.normal(0, 1, (len(labels), dim))).astype(
        np.float32
    ), labels


def test_fc_head_is_the_device_fit_with_the_recipe() -> None:
    x, y = _clusters()
    recipe = HeadRecipe(steps=25, lr=0.3, normalize=True, weight_decay=0.01)
    head = FCHead(recipe)
    head.fit(x, y)
    ref = fit_head(x, y, 5, 25, 0.3, "zeros", None, True, 0.01)
    np.testing.assert_array_equal(head.weights.weight, ref.weight)
    assert head.predict(x).shape == (len(x), 5)


def test_fc_head_meta_init_of_another_way_count_falls_back_to_zeros() -> None:
    x, y = _clusters(ways=3)
    meta = (np.ones((5, 16), np.float32), np.ones(5, np.float32))
    head = FCHead(HeadRecipe(steps=0, init="meta"), meta)
    head.fit(x, y)
    assert head.weights.init == "zeros" and np.all(head.weights.weight == 0)


@pytest.mark.parametrize("loss, scale", [("tf", 5.0), ("sum", 10.0)])
def test_loss_reductions_are_scaled_mean_losses(loss: str, scale: float) -> None:
    x, y = _clusters(ways=5, per=2)
    head = HeadRecipe(steps=10, lr=0.01, weight_decay=0.1, loss=loss).fit(x, y, 5)
    ref = HeadRecipe(steps=10, lr=0.01 * scale, weight_decay=0.1 / scale).fit(x, y, 5)
    np.testing.assert_allclose(head.weight, ref.weight, rtol=1e-6)


def test_centroid_heads_pick_the_nearest_mean() -> None:
    x, y = _clusters()
    for metric in ("cosine", "euclidean"):
        head = CentroidHead(metric)
        head.fit(x, y)
        scores = head.predict(x)
        assert scores.shape == (len(x), 5)
        means = np.stack([x[y == c].mean(0) for c in range(5)]).astype(np.float64)
        if metric == "euclidean":
            ref = -((x[:, None, :] - means[None]) ** 2).sum(-1)
        else:
            xn = x / np.linalg.norm(x, axis=1, keepdims=True)
            mn = [xn[y == c].mean(0) for c in range(5)]
            mn = np.stack([m / np.linalg.norm(m) for m in mn])
            ref = xn @ mn.T
        np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="cosine or euclidean"):
        CentroidHead("manhattan")


def _torch_logreg(x: np.ndarray, y: np.ndarray, C: float = 1.0) -> np.ndarray:
    """The same objective minimised by torch's L-BFGS: an independent reference."""
    xt = torch.nn.functional.normalize(torch.from_numpy(x).double(), dim=1)
    yt = torch.from_numpy(y)
    w = torch.zeros(int(y.max()) + 1, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = C * torch.nn.functional.cross_entropy(xt @ w.T + b, yt, reduction="sum")
        loss = loss + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (xt @ w.T + b).detach().numpy()


def test_logreg_head_reaches_the_regularised_optimum() -> None:
    x, y = _clusters(per=5, spread=1.5)
    head = LogRegHead(C=1.0, max_iter=500)
    head.fit(x, y)
    w, b = head.weights.weight.astype(np.float64), head.weights.bias.astype(np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    onehot = np.eye(5)[y]
    g = softmax(xn @ w.T + b) - onehot
    assert np.abs(g.T @ xn + w).max() < 1e-4  # stationary point of the objective
    assert np.abs(g.sum(0)).max() < 1e-4
    np.testing.assert_allclose(head.predict(x), _torch_logreg(x, y), atol=1e-3)


def test_feature_head_names_and_aliases() -> None:
    assert canonical_heads(["fc", "centroid", "mtl"], ("mtl", "centroid")) == ["mtl", "centroid"]
    assert isinstance(feature_head("centroid-euclidean")(), CentroidHead)
    assert isinstance(feature_head("fc", HeadRecipe(steps=3))(), FCHead)
    with pytest.raises(ConfigError, match="unknown"):
        feature_head("knn")


def test_evaluate_episodes_pairs_heads_on_one_episode_list() -> None:
    x, y = _clusters(ways=8, per=20, spread=2.5)
    by_class = [np.flatnonzero(y == c) for c in range(8)]
    episodes = EpisodeSampler(by_class, 5, 1, 5, seed=3).episodes(30)
    heads = {"centroid": feature_head("centroid"), "mtl": feature_head("mtl")}
    res = evaluate_episodes(x, y, episodes, heads)
    assert set(res) == {"centroid", "mtl"}
    assert all(len(r.accuracies) == 30 for r in res.values())
    mean, ci = mean_ci(res["mtl"].accuracies)
    assert (res["mtl"].mean, res["mtl"].ci95) == (mean, ci)
    # the same list through a loader function gives the same numbers
    again = evaluate_episodes(lambda idx: x[idx], y, episodes, {"centroid": CentroidHead})
    assert again["centroid"].accuracies == res["centroid"].accuracies
    diff, _ = res["mtl"].minus(res["centroid"])
    assert diff == pytest.approx(res["mtl"].mean - res["centroid"].mean)


def test_evaluate_episodes_refuses_episodes_of_another_split() -> None:
    x, y = _clusters(ways=6, per=10)
    by_class = [np.flatnonzero(y == c) for c in range(6)]
    episodes = EpisodeSampler(by_class, 5, 1, 3).episodes(2)
    with pytest.raises(DatasetError, match="another split"):
        evaluate_episodes(x, np.roll(y, 1), episodes, {"c": CentroidHead})
    with pytest.raises(DatasetError, match="do not match"):
        evaluate_episodes(x[:10], y, episodes, {"c": CentroidHead})
    with pytest.raises(ConfigError, match="no episodes"):
        evaluate_episodes(x, y, [], {"c": CentroidHead})


def test_eval_result_to_dict() -> None:
    r = EvalResult.from_accuracies([40.0, 60.0])
    assert r.to_dict() == {"mean": 50.0, "ci95": r.ci95, "episodes": 2}
    assert r.to_dict(with_accuracies=True)["accuracies"] == [40.0, 60.0]
