"""FC base-learner: the inner loop lowers the support loss, matches the device head, and its
first/second-order variants connect to the initialisation as documented; the batched
closed-form loop gives the autograd loop's fast weights and gradients (first and second order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl_edge.fewshot.fc import fit_head
from mtl_edge.train.base_learner import batched_inner_loop, fc_logits, inner_loop


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


def _tasks_batch(tasks: int = 3, ways: int = 4, n_per: int = 2, dim: int = 8):
    """Support (T, n, D), labels (T, n), query (T, m, D), query labels (T, m), float64."""
    xs, ys, qs, qys = [], [], [], []
    for t in range(tasks):
        x, y = _support(n_per, ways, dim, seed=10 + t)
        q, qy = _support(3, ways, dim, seed=50 + t)
        xs, ys, qs, qys = xs + [x], ys + [y], qs + [q], qys + [qy]
    return torch.stack(xs).double(), torch.stack(ys), torch.stack(qs).double(), torch.stack(qys)


@pytest.mark.parametrize("second", [False, True], ids=["first-order", "second-order"])
@pytest.mark.parametrize(("normalize", "wd"), [(False, 0.0), (True, 0.05)])
def test_batched_loop_equals_the_autograd_loop(second: bool, normalize: bool, wd: float) -> None:
    """Fast weights and the gradients of a query loss w.r.t. the init and the support
    features agree with one autograd loop per task (float64, to 1e-10)."""
    x, y, q, qy = _tasks_batch()
    g = torch.Generator().manual_seed(0)
    init_w = (0.1 * torch.randn(4, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    init_b = (0.1 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_(True)
    kw = {"steps": 7, "lr": 0.4, "create_graph": second, "normalize": normalize}
    results = []
    for batched in (True, False):
        feats = x.clone().requires_grad_(True)
        if batched:
            w, b = batched_inner_loop(feats, y, init_w, init_b, weight_decay=wd, **kw)
        else:
            fast = [inner_loop(f, yy, init_w, init_b, weight_decay=wd, **kw) for f, yy in
                    zip(feats, y, strict=True)]  # fmt: skip
            w, b = torch.stack([a for a, _ in fast]), torch.stack([c for _, c in fast])
        qf = F.normalize(q, dim=2) if normalize else q
        logits = torch.baddbmm(b.unsqueeze(1), qf, w.transpose(1, 2))
        loss = F.cross_entropy(logits.flatten(0, 1), qy.flatten())
        grads = torch.autograd.grad(loss, [init_w, init_b, feats], allow_unused=True)
        results.append((w.detach(), b.detach(), *grads))
    for got, want in zip(results[0], results[1], strict=True):
        if want is None:  # first order: the support features get no gradient at all
            assert got is None and not second
            continue
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_batched_loop_shapes_and_no_grad() -> None:
    x, y, _, _ = _tasks_batch(tasks=2)
    per_task_init = torch.randn(2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        w, b = batched_inner_loop(
            x, y, per_task_init, torch.zeros(2, 4, dtype=torch.float64), 3, 0.3
        )
    assert w.shape == (2, 4, 8) and b.shape == (2, 4) and not w.requires_grad
    ref, _ = inner_loop(x[1], y[1], per_task_init[1], torch.zeros(4, dtype=torch.float64), 3, 0.3)
    torch.testing.assert_close(w[1], ref)
    w0, _ = batched_inner_loop(x, y, per_task_init, torch.zeros(4, dtype=torch.float64), 0, 0.3)
    torch.testing.assert_close(w0, per_task_init)
    with pytest.raises(ValueError, match=r"\(T, n, D\)"):
        batched_inner_loop(x[0], y[0], per_task_init[0], torch.zeros(4), 3, 0.3)
