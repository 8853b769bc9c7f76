"""The numpy FC base-learner: gradients, inits, determinism, parity with the torch inner loop."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mtl_edge.errors import BundleError
from mtl_edge.fewshot.fc import fit_head, l2_normalize, predict_proba, softmax


def _task(ways: int = 5, shots: int = 5, dim: int = 32, seed: int = 0):
    """Features of shape (ways * shots, dim) clustered around one centre per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(ways, dim))
    labels = np.repeat(np.arange(ways), shots)
    features = centres[labels] + 0.5 * rng.normal(0, 1, size=(ways * shots, dim))
    return features.astype(np.float32), labels


def _loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, wd: float = 0.0) -> float:
    p = softmax(x @ w.T + b)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])) + 0.5 * wd * np.sum(w * w))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_step_follows_the_numerical_gradient(weight_decay: float) -> None:
    x, y = _task(ways=3, shots=2, dim=4)
    x64 = x.astype(np.float64)
    rng = np.random.default_rng(1)
    w0 = rng.normal(0, 0.3, size=(3, 4))
    b0 = rng.normal(0, 0.3, size=3)
    lr = 0.1
    head = fit_head(
        x, y, 3, steps=1, lr=lr, init="meta", meta_init=(w0, b0), weight_decay=weight_decay
    )
    analytic_w = (w0 - head.weight) / lr
    analytic_b = (b0 - head.bias) / lr
    eps = 1e-6
    num_w = np.zeros_like(w0)
    for idx in np.ndindex(*w0.shape):
        d = np.zeros_like(w0)
        d[idx] = eps
        num_w[idx] = (
            _loss(x64, y, w0 + d, b0, weight_decay) - _loss(x64, y, w0 - d, b0, weight_decay)
        ) / (2 * eps)
    num_b = np.array(
        [
            (
                _loss(x64, y, w0, b0 + eps * e, weight_decay)
                - _loss(x64, y, w0, b0 - eps * e, weight_decay)
            )
            / (2 * eps)
            for e in np.eye(3)
        ]
    )
    np.testing.assert_allclose(analytic_w, num_w, atol=1e-5)
    np.testing.assert_allclose(analytic_b, num_b, atol=1e-5)


def test_fit_lowers_the_loss_and_separates_classes() -> None:
    x, y = _task()
    head = fit_head(x, y, 5, steps=100, lr=0.1)
    zeros = np.zeros_like(head.weight), np.zeros_like(head.bias)
    assert _loss(x.astype(np.float64), y, head.weight, head.bias) < _loss(x, y, *zeros)
    assert np.mean(predict_proba(x, head).argmax(axis=1) == y) == 1.0
    assert head.weight.dtype == np.float32 and head.weight.shape == (5, 32)


def test_fit_is_deterministic() -> None:
    x, y = _task()
    a = fit_head(x, y, 5, steps=30, lr=0.05, init="imprint", normalize=True)
    b = fit_head(x, y, 5, steps=30, lr=0.05, init="imprint", normalize=True)
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)


def test_zero_steps_returns_the_initialisation() -> None:
    x, y = _task(ways=3, shots=4, dim=6)
    head = fit_head(x, y, 3, steps=0, lr=0.1, init="imprint")
    means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
    np.testing.assert_allclose(head.weight, l2_normalize(means), atol=1e-6)
    assert np.all(head.bias == 0) and head.init == "imprint"
    assert np.all(fit_head(x, y, 3, steps=0, lr=0.1).weight == 0)


def test_meta_init_is_used_when_the_class_count_matches() -> None:
    x, y = _task(ways=3, shots=2, dim=6)
    w0 = np.full((3, 6), 0.25, dtype=np.float32)
    b0 = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    head = fit_head(x, y, 3, steps=0, lr=0.1, init="meta", meta_init=(w0, b0))
    assert head.init == "meta"
    np.testing.assert_array_equal(head.weight, w0)
    np.testing.assert_array_equal(head.bias, b0)


def test_meta_init_falls_back_to_zeros_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    x, y = _task(ways=3, shots=2, dim=6)
    w0, b0 = np.ones((5, 6), dtype=np.float32), np.ones(5, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="mtl_edge.fewshot.fc"):
        head = fit_head(x, y, 3, steps=0, lr=0.1, init="meta", meta_init=(w0, b0))
    assert head.init == "zeros" and np.all(head.weight == 0)
    assert "learned for 5 classes" in caplog.text
    with caplog.at_level(logging.WARNING, logger="mtl_edge.fewshot.fc"):
        assert fit_head(x, y, 3, steps=0, lr=0.1, init="meta").init == "zeros"
    assert "no meta-learned init" in caplog.text


def test_meta_init_of_another_feature_size_is_a_bundle_error() -> None:
    x, y = _task(ways=3, shots=2, dim=6)
    with pytest.raises(BundleError, match="feature size 4"):
        fit_head(x, y, 3, init="meta", meta_init=(np.ones((3, 4)), np.ones(3)))


def test_normalize_makes_the_head_scale_invariant() -> None:
    x, y = _task()
    a = fit_head(x, y, 5, steps=20, lr=0.5, normalize=True)
    b = fit_head(10.0 * x, y, 5, steps=20, lr=0.5, normalize=True)
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-6)
    np.testing.assert_allclose(predict_proba(x, a), predict_proba(7.0 * x, a), atol=1e-6)


def test_weight_decay_shrinks_the_weights() -> None:
    x, y = _task()
    plain = fit_head(x, y, 5, steps=50, lr=0.1)
    decayed = fit_head(x, y, 5, steps=50, lr=0.1, weight_decay=1.0)
    assert np.linalg.norm(decayed.weight) < np.linalg.norm(plain.weight)


def test_predict_proba_rows_sum_to_one() -> None:
    x, y = _task()
    proba = predict_proba(x, fit_head(x, y, 5, steps=10, lr=0.1))
    assert proba.shape == (25, 5) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": np.array([0, 1, 5])}, "labels must lie"),
        ({"labels": np.array([0, 1])}, "labels must be"),
        ({"features": np.full((3, 4), np.nan)}, "NaN"),
        ({"lr": 0.0}, "lr > 0"),
        ({"init": "random"}, "init="),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"features": np.ones((3, 4)), "labels": np.array([0, 1, 2]), "ways": 3, "lr": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_head(**args)


def test_imprint_needs_every_class() -> None:
    with pytest.raises(ValueError, match="every class"):
        fit_head(np.ones((2, 4)), np.array([0, 0]), 2, init="imprint")


@pytest.mark.parametrize(
    "normalize, init, weight_decay",
    [
        (False, "zeros", 0.0),
        (True, "zeros", 0.0),
        (False, "meta", 0.0),
        (True, "meta", 0.0),
        (True, "meta", 0.05),
    ],
)
def test_matches_the_torch_inner_loop(normalize: bool, init: str, weight_decay: float) -> None:
    torch = pytest.importorskip("torch")
    base_learner = pytest.importorskip("mtl_edge.train.base_learner")
    x, y = _task(ways=5, shots=5, dim=64, seed=3)
    rng = np.random.default_rng(4)
    if init == "meta":
        w0 = rng.normal(0, 0.1, size=(5, 64)).astype(np.float32)
        b0 = rng.normal(0, 0.1, size=5).astype(np.float32)
    else:
        w0, b0 = np.zeros((5, 64), np.float32), np.zeros(5, np.float32)
    ours = fit_head(
        x,
        y,
        5,
        steps=100,
        lr=0.01,
        init=init,
        meta_init=(w0, b0),
        normalize=normalize,
        weight_decay=weight_decay,
    )
    weight = torch.tensor(w0, requires_grad=True)
    bias = torch.tensor(b0, requires_grad=True)
    tw, tb = base_learner.inner_loop(
        torch.tensor(x),
        torch.tensor(y),
        weight,
        bias,
        steps=100,
        lr=0.01,
        create_graph=False,
        normalize=normalize,
        weight_decay=weight_decay,
    )
    np.testing.assert_allclose(ours.weight, tw.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.bias, tb.detach().numpy(), atol=1e-4)
