"""FC base-learner: the inner loop lowers the support loss, matches the device head, and its
first/second-order variants connect to the initialisation as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl_edge.fewshot.fc import fit_head
from mtl_edge.train.base_learner import fc_logits, inner_loop


def _support(n_per: int = 3, ways: int = 4, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(ways, dim, generator=g) * 2
    y = torch.arange(ways).repeat_interleave(n_per)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def test_fc_logits_shape_and_value() -> None:
    x, w, b = torch.ones(3, 2), torch.tensor([[1.0, 2.0]]), torch.tensor([0.5])
    assert torch.equal(fc_logits(x, w, b), torch.full((3, 1), 3.5))


@pytest.mark.parametrize("normalize", [False, True])
def test_inner_loop_lowers_support_loss(normalize: bool) -> None:
    x, y = _support()
    w0, b0 = torch.zeros(4, 8), torch.zeros(4)
    feats = F.normalize(x, dim=1) if normalize else x
    before = F.cross_entropy(fc_logits(feats, w0, b0), y)
    w, b = inner_loop(x, y, w0, b0, steps=20, lr=0.5, normalize=normalize)
    after = F.cross_entropy(fc_logits(feats, w, b), y)
    assert after < 0.5 * before
    assert not w.requires_grad  # nothing to differentiate: plain tensors back


@pytest.mark.parametrize(("normalize", "wd"), [(False, 0.0), (True, 0.1)])
def test_matches_device_numpy_head(normalize: bool, wd: float) -> None:
    x, y = _support(n_per=5, ways=5, dim=16, seed=3)
    init_w = torch.randn(5, 16) * 0.1
    init_b = torch.randn(5) * 0.1
    w, b = inner_loop(x, y, init_w, init_b, 50, 0.05, normalize=normalize, weight_decay=wd)
    head = fit_head(
        x.numpy(),
        y.numpy(),
        5,
        steps=50,
        lr=0.05,
        init="meta",
        meta_init=(init_w.numpy(), init_b.numpy()),
        normalize=normalize,
        weight_decay=wd,
    )
    np.testing.assert_allclose(w.numpy(), head.weight, atol=1e-4)
    np.testing.assert_allclose(b.numpy(), head.bias, atol=1e-4)


def test_zero_steps_returns_init() -> None:
    x, y = _support()
    w0 = torch.randn(4, 8, requires_grad=True)
    b0 = torch.zeros(4, requires_grad=True)
    w, b = inner_loop(x, y, w0, b0, steps=0, lr=0.1)
    assert w is w0 and b is b0


def test_first_order_is_straight_through() -> None:
    """d(query loss)/d w0 equals d(query loss)/d w_T in first order; second order differs."""
    x, y = _support()
    xq, yq = _support(seed=1)
    grads = {}
    for second in (False, True):
        w0 = torch.zeros(4, 8, requires_grad=True)
        b0 = torch.zeros(4, requires_grad=True)
        w, b = inner_loop(x, y, w0, b0, steps=5, lr=0.3, create_graph=second)
        w.retain_grad()
        F.cross_entropy(fc_logits(xq, w, b), yq).backward()
        grads[second] = (w0.grad.clone(), w.grad.clone())
    torch.testing.assert_close(grads[False][0], grads[False][1])
    assert not torch.allclose(grads[True][0], grads[True][1])


def test_support_features_get_gradient_only_in_second_order() -> None:
    x, y = _support()
    for second in (False, True):
        feats = x.clone().requires_grad_(True)
        w0 = torch.zeros(4, 8, requires_grad=True)
        w, b = inner_loop(feats, y, w0, torch.zeros(4), steps=3, lr=0.3, create_graph=second)
        F.cross_entropy(fc_logits(x, w, b), y).backward()
        assert (feats.grad is not None) == second


def test_works_under_no_grad() -> None:
    x, y = _support()
    with torch.no_grad():
        w, _ = inner_loop(x, y, torch.zeros(4, 8), torch.zeros(4), steps=3, lr=0.3)
    assert w.abs().sum() > 0


def test_bad_arguments() -> None:
    x, y = _support()
    with pytest.raises(ValueError, match="lr"):
        inner_loop(x, y, torch.zeros(4, 8), torch.zeros(4), steps=3, lr=0.0)
