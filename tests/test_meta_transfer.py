"""Meta-transfer learner: a meta step moves SS and the FC init, never W (nor frozen BN);
first and second order both reach SS and the FC init; tasks from episodes."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from torch import nn

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.errors import ConfigError
from mtl_edge.settings import from_dict
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.meta_transfer import (
    MetaTransferLearner,
    Task,
    TaskBuilder,
    learner_from_parts,
)
from mtl_edge.train.ss import ss_modules
from mtl_edge.train.stage_config import MetaConfig

WAYS, SHOTS, QUERIES = 3, 2, 3


def _images(n_classes: int = 5, per: int = 8, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Class-coloured 16x16 noise images of shape (n_classes * per, 3, 16, 16)."""
    g = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(n_classes), per)
    base = torch.randn(n_classes, 3, 1, 1, generator=g)
    x = base[labels] + 0.5 * torch.randn(len(labels), 3, 16, 16, generator=g)
    return x, labels


def _learner(**overrides) -> MetaTransferLearner:
    torch.manual_seed(0)
    encoder = create_backbone("resnet12", widths=[4, 6, 8, 10])
    return MetaTransferLearner(encoder, WAYS, inner_steps=5, test_steps=5, **overrides)


def _tasks(count: int = 2, seed: int = 0) -> list[Task]:
    x, labels = _images()
    by_class = [np.flatnonzero(labels == c) for c in range(5)]
    sampler = EpisodeSampler(by_class, WAYS, SHOTS, QUERIES, seed=seed)
    builder = TaskBuilder(lambda idx: x[torch.from_numpy(np.asarray(idx))])
    return [builder(e) for e in sampler.episodes(count)]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
def test_meta_step_moves_ss_and_fc_not_w(bn_mode: str) -> None:
    learner = _learner(bn_mode=bn_mode, fc_init="normal")
    before = _snapshot(learner)
    opt = learner.make_optimizer(ss_lr=1e-2, fc_lr=1e-2)
    stats = learner.meta_step(_tasks(), opt)
    after = _snapshot(learner)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"fc_weight", "fc_bias"} <= moved
    assert any(k.endswith("ss_scale") for k in moved) and any(k.endswith("ss_shift") for k in moved)
    assert not any(k.endswith(".weight") and ".conv." in k for k in moved)  # W buffers
    assert not any(k.endswith(".conv.bias") for k in moved)  # b buffers
    bn_keys = {k for k in moved if ".bn." in k}
    if bn_mode == "frozen":
        assert not bn_keys
    else:  # official PyTorch code: BN affine trained, running statistics updated
        assert any(k.endswith("bn.weight") for k in bn_keys)
        assert any(k.endswith("running_mean") for k in bn_keys)
    assert 0.0 <= stats.accuracy <= 1.0 and np.isfinite(stats.loss)
    assert len(stats.tasks) == 2 and len(stats.tasks[0].class_accuracy) == WAYS


@pytest.mark.parametrize("second_order", [False, True])
def test_both_orders_reach_ss_and_fc(second_order: bool) -> None:
    learner = _learner(second_order=second_order, fc_init="normal")
    learner.train()
    task = _tasks(1)[0]
    logits = learner.task_logits(task.support_x, task.support_y, task.query_x)
    assert logits.shape == (WAYS * QUERIES, WAYS)
    nn.functional.cross_entropy(logits, task.query_y).backward()
    assert learner.fc_weight.grad is not None and learner.fc_weight.grad.abs().sum() > 0
    ss = ss_modules(learner.encoder)
    assert all(m.ss_scale.grad is not None for m in ss)
    assert sum(float(m.ss_shift.grad.abs().sum()) for m in ss) > 0


def test_second_order_differs_from_first() -> None:
    grads = []
    for second in (False, True):
        learner = _learner(second_order=second, fc_init="normal")
        learner.train()
        task = _tasks(1)[0]
        logits = learner.task_logits(task.support_x, task.support_y, task.query_x)
        nn.functional.cross_entropy(logits, task.query_y).backward()
        grads.append(ss_modules(learner.encoder)[0].ss_scale.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_meta_training_lowers_query_loss() -> None:
    learner = _learner(fc_init="zeros")
    opt = learner.make_optimizer(ss_lr=5e-3, fc_lr=5e-3)
    tasks = _tasks(4, seed=3)
    first = np.mean([learner.evaluate_task(t).loss for t in tasks])
    for _ in range(8):
        learner.meta_step(tasks[:2], opt)
        learner.meta_step(tasks[2:], opt)
    last = np.mean([learner.evaluate_task(t).loss for t in tasks])
    assert last < first


def test_meta_parameters_groups() -> None:
    learner = _learner()
    groups = learner.meta_parameters()
    assert groups["fc"] == [learner.fc_weight, learner.fc_bias]
    n_ss = len(ss_modules(learner.encoder))
    assert len(groups["ss"]) == 2 * n_ss
    trainable = {id(p) for p in learner.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g}


def test_eval_uses_test_steps_and_other_ways() -> None:
    learner = _learner()
    task = _tasks(1)[0]
    learner.eval()
    with torch.no_grad():
        # 2-way subset: the 3-way meta init does not fit, zeros are used
        keep = task.support_y < 2
        logits = learner.task_logits(task.support_x[keep], task.support_y[keep], task.query_x)
    assert logits.shape == (len(task.query_x), 2)
    bns = [m for m in learner.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    learner.train()
    assert not any(bn.training for bn in bns)  # frozen BN survives .train()


def test_settings_validation_and_round_trip() -> None:
    s = MetaConfig(inner_steps=20, test_steps=100, inner_lr=1e-3, second_order=True)
    assert from_dict(MetaConfig, asdict(s)) == s
    with pytest.raises(ConfigError, match="fc_init"):
        MetaConfig(fc_init="ones")
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(MetaConfig, {"inner_step": 3})
    with pytest.raises(ConfigError, match="inner_step"):
        _learner(inner_step=3)
    with pytest.raises(ConfigError, match="ways"):
        MetaTransferLearner(create_backbone("conv4", width=4), ways=1)


@pytest.mark.parametrize(("kind", "factor"), [("sum", WAYS * SHOTS), ("tf", WAYS)])
def test_summed_inner_losses_equal_scaled_lr(kind: str, factor: int) -> None:
    task = _tasks(1)[0]
    learner = _learner(inner_loss=kind, inner_lr=1e-3)
    ref = _learner(inner_loss="mean", inner_lr=1e-3 * factor)
    ref.load_state_dict(learner.state_dict())
    learner.eval()
    ref.eval()
    with torch.no_grad():
        a = learner.task_logits(task.support_x, task.support_y, task.query_x)
        b = ref.task_logits(task.support_x, task.support_y, task.query_x)
    torch.testing.assert_close(a, b)
    # the TF reduction itself: per-example CE / shots, summed
    feats = torch.randn(6, 4, requires_grad=True)
    w = torch.zeros(3, 4, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    tf_loss = (torch.nn.functional.cross_entropy(feats @ w.T, y, reduction="none") / 2).sum()
    mean_loss = torch.nn.functional.cross_entropy(feats @ w.T, y)
    (g_tf,) = torch.autograd.grad(tf_loss, w)
    (g_mean,) = torch.autograd.grad(mean_loss, w)
    torch.testing.assert_close(g_tf, 3 * g_mean)


def test_task_builder_labels_and_indices() -> None:
    task = _tasks(1)[0]
    assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert task.query_x.shape == (WAYS * QUERIES, 3, 16, 16)
    assert task.indices is not None and len(task.indices) == WAYS * (SHOTS + QUERIES)


def test_checkpoint_parts_round_trip(tmp_path) -> None:
    learner = _learner(fc_init="normal", second_order=True)
    with torch.no_grad():
        for m in ss_modules(learner.encoder):
            m.ss_shift.normal_(0.0, 0.1)
    path = tmp_path / "m.pt"
    torch.save(learner.checkpoint_parts(), path)
    parts = torch.load(path, weights_only=True)
    again = learner_from_parts(**parts)
    assert again.settings == learner.settings and again.ways == WAYS
    task = _tasks(1)[0]
    learner.eval()
    again.eval()
    with torch.no_grad():
        a = learner.task_logits(task.support_x, task.support_y, task.query_x)
        b = again.task_logits(task.support_x, task.support_y, task.query_x)
    torch.testing.assert_close(a, b)


def test_parts_from_pretraining_and_wrong_architecture() -> None:
    backbone = create_backbone("conv4", width=8)
    learner = learner_from_parts("conv4", backbone.model_args, backbone.state_dict(), ways=4)
    assert learner.ways == 4 and ss_modules(learner.encoder)
    with pytest.raises(ConfigError, match="another architecture"):
        learner_from_parts("conv4", {"width": 16}, backbone.state_dict())
    with pytest.raises(ConfigError, match="unknown"):
        learner_from_parts("resnet99", {}, backbone.state_dict())


def _reference_meta_grads(learner: MetaTransferLearner, tasks: list[Task]) -> list[torch.Tensor]:
    """The meta-gradients of the original per-task algorithm: each task encoded on its own,
    the FC adapted by the autograd loop, the task's loss back-propagated on its own."""
    from mtl_edge.train.base_learner import inner_loop

    s = learner.settings
    learner.train()
    learner.zero_grad(set_to_none=True)
    for task in tasks:
        with torch.set_grad_enabled(s.second_order):
            support = learner.encode(task.support_x)
        w, b = inner_loop(
            support, task.support_y, learner.fc_weight, learner.fc_bias, s.inner_steps,
            s.inner_lr, create_graph=s.second_order, weight_decay=s.inner_weight_decay,
        )  # fmt: skip
        logits = learner.encode(task.query_x) @ w.T + b
        (nn.functional.cross_entropy(logits, task.query_y) / len(tasks)).backward()
    return [p.grad.clone() for g in learner.meta_parameters().values() for p in g]


@pytest.mark.parametrize("second_order", [False, True], ids=["first-order", "second-order"])
def test_batched_meta_step_gives_the_per_task_autograd_meta_gradients(second_order: bool) -> None:
    tasks = _tasks(3, seed=5)
    grads = {}
    for kind in ("batched", "autograd", "reference"):
        learner = _learner(
            fc_init="normal", second_order=second_order, inner_weight_decay=0.01,
            inner_loop="autograd" if kind == "autograd" else "batched",
        )  # fmt: skip
        if kind == "reference":
            grads[kind] = _reference_meta_grads(learner, tasks)
            continue
        opt = learner.make_optimizer(ss_lr=1e-12, fc_lr=1e-12)
        stats = learner.meta_step(tasks, opt)
        grads[kind] = [p.grad.clone() for g in learner.meta_parameters().values() for p in g]
        assert stats.losses.shape == (3,) and len(stats.tasks) == 3
    assert any(g.abs().sum() > 0 for g in grads["reference"])
    for kind in ("batched", "autograd"):
        for got, want in zip(grads[kind], grads["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_meta_step_stats_stay_on_the_device_until_read() -> None:
    learner = _learner(fc_init="normal")
    stats = learner.meta_step(_tasks(2), learner.make_optimizer())
    assert stats.losses.shape == (2,) and stats.class_accuracy.shape == (2, WAYS)
    assert stats.loss == pytest.approx(float(stats.losses.mean()))
    assert [t.accuracy for t in stats.tasks] == pytest.approx(stats.accuracies.tolist())
    task = _tasks(1)[0]
    fewer = replace(task, query_x=task.query_x[:3], query_y=task.query_y[:3])
    with pytest.raises(ValueError, match="differ in shape"):
        learner.meta_step([task, fewer], learner.make_optimizer())
