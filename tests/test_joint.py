"""The joint transfer + meta-learning step (train/joint.py) on toy networks and data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.train.joint import (
    JointLearner,
    all_indices,
    inner_adapt,
    maml_gradient,
    mix_parameters,
    prototype_head,
    query_labels,
    reptile_gradient,
    support_labels,
)
from mtl_edge.train.stage_config import JointConfig


class Toy(nn.Module):
    """A linear 'backbone': inputs (B, 6) -> features (B, 3)."""

    feature_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def _data(n_classes: int = 6, per_class: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, 6, generator=gen) * 2
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centers[torch.as_tensor(labels)] + 0.3 * torch.randn(len(labels), 6, generator=gen)
    return x, labels


def _learner(cfg: JointConfig, n_classes: int = 6) -> JointLearner:
    torch.manual_seed(0)
    return JointLearner(Toy(), n_classes, cfg)


def _tasks(labels: np.ndarray, cfg: JointConfig, n: int = 3) -> list[Episode]:
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    return EpisodeSampler(by_class, cfg.ways, cfg.shots, cfg.queries, seed=1).episodes(n)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("meta", ["reptile", "maml"])
def test_beta_one_is_the_meta_step_alone(meta: str) -> None:
    x, labels = _data()
    cfg = JointConfig(meta=meta, beta=1.0, ways=3, shots=2, queries=2, inner_steps=2)
    learner = _learner(cfg)
    reference = copy.deepcopy(learner.backbone)
    opt = torch.optim.Adam(reference.parameters(), lr=cfg.outer_lr)
    head_before = _state(learner.transfer_head)
    tasks = _tasks(labels, cfg)
    stats = learner.step(lambda i: x[torch.as_tensor(i)], tasks)
    fn = reptile_gradient if meta == "reptile" else maml_gradient
    grads = fn(reference, lambda i: x[torch.as_tensor(i)], tasks, cfg)
    for k, p in reference.named_parameters():
        p.grad = grads[k]
    opt.step()
    assert set(stats) == {"delta_meta"}
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(learner.backbone.state_dict()[k], v)
    for k, v in head_before.items():  # the transfer step did not run
        torch.testing.assert_close(learner.transfer_head.state_dict()[k], v)
    assert not torch.equal(reference.fc.weight, Toy().fc.weight)


def test_beta_zero_is_the_transfer_step_alone() -> None:
    x, labels = _data()
    cfg = JointConfig(beta=0.0, ways=3, shots=2, queries=2)
    learner = _learner(cfg)
    net = copy.deepcopy(learner.backbone)
    head = copy.deepcopy(learner.transfer_head)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=cfg.transfer_lr)
    tasks = _tasks(labels, cfg)
    stats = learner.step(lambda i: x[torch.as_tensor(i)], tasks)
    idx = np.concatenate([all_indices(t) for t in tasks])
    F.cross_entropy(head(net(x[idx])), torch.as_tensor(labels[idx])).backward()
    opt.step()
    assert set(stats) == {"delta_transfer"}
    for k, v in net.state_dict().items():
        torch.testing.assert_close(learner.backbone.state_dict()[k], v)
    torch.testing.assert_close(learner.transfer_head.weight, head.weight)


def test_mixing_rules() -> None:
    theta = {"w": torch.zeros(2)}
    meta, transfer = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    paper = mix_parameters(theta, meta, transfer, JointConfig(beta=0.25))
    torch.testing.assert_close(paper["w"], torch.tensor([0.25, 0.75]))
    code = mix_parameters(theta, meta, transfer, JointConfig(mix="code", beta=0.1))
    torch.testing.assert_close(code["w"], torch.tensor([0.5, 0.05]))
    assert JointConfig(beta=1.0).method == "reptile"
    assert JointConfig(beta=0.0).method == "transfer"
    assert JointConfig(meta="maml", beta=0.5).method == "maml+transfer"
    assert JointConfig(mix="code", beta=0.0).method == "reptile"


def test_reptile_moves_theta_toward_the_task_solution() -> None:
    """One task, SGD outer step: -g equals theta_k - theta of a hand-written inner loop, and
    repeated Reptile steps lower that task's loss after adaptation."""
    x, labels = _data()
    cfg = JointConfig(beta=1.0, ways=3, shots=4, queries=0, inner_steps=3, inner_lr=0.5)
    cfg.optimizer, cfg.outer_lr = "sgd", 1.0
    learner = _learner(cfg)
    task = _tasks(labels, cfg, 1)[0]
    xs, ys = x[torch.as_tensor(all_indices(task))], support_labels(task)
    net = copy.deepcopy(learner.backbone)
    w, b = torch.zeros(3, 3, requires_grad=True), torch.zeros(3, requires_grad=True)
    inner = torch.optim.SGD(list(net.parameters()) + [w, b], lr=cfg.inner_lr)
    for _ in range(cfg.inner_steps):
        inner.zero_grad()
        F.cross_entropy(F.linear(net(xs), w, b), ys).backward()
        inner.step()
    g = reptile_gradient(learner.backbone, lambda i: x[torch.as_tensor(i)], [task], cfg)
    for k, p in learner.backbone.named_parameters():
        torch.testing.assert_close(-g[k], dict(net.named_parameters())[k] - p.detach())

    def adapted_loss() -> float:
        """The task's loss after the k inner steps from the current theta."""
        fast = copy.deepcopy(learner.backbone)
        w, b = torch.zeros(3, 3, requires_grad=True), torch.zeros(3, requires_grad=True)
        inner = torch.optim.SGD(list(fast.parameters()) + [w, b], lr=cfg.inner_lr)
        for _ in range(cfg.inner_steps):
            inner.zero_grad()
            F.cross_entropy(F.linear(fast(xs), w, b), ys).backward()
            inner.step()
        return float(F.cross_entropy(F.linear(fast(xs), w, b), ys).detach())

    before = adapted_loss()
    for _ in range(10):
        learner.step(lambda i: x[torch.as_tensor(i)], [task])
    assert adapted_loss() < before


def _unrolled_query_loss(net: Toy, task: Episode, x: torch.Tensor, cfg: JointConfig):
    """MAML by hand: returns (query loss, the list of adapted weights)."""
    params = [net.fc.weight, net.fc.bias]
    w, b = torch.zeros(3, 3, requires_grad=True), torch.zeros(3, requires_grad=True)
    xs, ys = x[torch.as_tensor(task.support)], support_labels(task)
    fast = params + [w, b]
    for _ in range(cfg.inner_steps):
        logits = F.linear(torch.tanh(F.linear(xs, fast[0], fast[1])), fast[2], fast[3])
        grads = torch.autograd.grad(F.cross_entropy(logits, ys), fast, create_graph=True)
        fast = [p - cfg.inner_lr * g for p, g in zip(fast, grads, strict=True)]
    xq = x[torch.as_tensor(task.query)]
    logits = F.linear(torch.tanh(F.linear(xq, fast[0], fast[1])), fast[2], fast[3])
    return F.cross_entropy(logits, query_labels(task)), fast


def test_maml_first_and_second_order_gradients() -> None:
    x, labels = _data()
    cfg = JointConfig(meta="maml", beta=1.0, ways=3, shots=3, queries=3, inner_steps=2)
    cfg.inner_lr = 0.5
    learner = _learner(cfg)
    task = _tasks(labels, cfg, 1)[0]
    images = lambda i: x[torch.as_tensor(i)]  # noqa: E731

    loss, fast = _unrolled_query_loss(learner.backbone, task, x, cfg)
    second = torch.autograd.grad(loss, [learner.backbone.fc.weight, learner.backbone.fc.bias])
    loss, fast = _unrolled_query_loss(learner.backbone, task, x, cfg)
    first = torch.autograd.grad(loss, fast[:2])

    cfg.second_order = True
    g2 = maml_gradient(learner.backbone, images, [task], cfg)
    cfg.second_order = False
    g1 = maml_gradient(learner.backbone, images, [task], cfg)
    torch.testing.assert_close(g2["fc.weight"], second[0])
    torch.testing.assert_close(g2["fc.bias"], second[1])
    torch.testing.assert_close(g1["fc.weight"], first[0])
    torch.testing.assert_close(g1["fc.bias"], first[1])
    assert not torch.allclose(g1["fc.weight"], g2["fc.weight"])


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_beta_outside_unit_interval_is_a_config_error(beta: float) -> None:
    with pytest.raises(ConfigError, match=r"joint.beta=.*within \[0, 1\]"):
        JointLearner(Toy(), 6, JointConfig(beta=beta))


def test_bad_options_and_data() -> None:
    with pytest.raises(ConfigError, match="joint.meta"):
        JointConfig(meta="protonet")
    with pytest.raises(ConfigError, match="Reptile needs >= 2"):
        JointConfig(inner_steps=1)
    with pytest.raises(ConfigError, match="joint.head_init='random'"):
        JointConfig(head_init="random")
    JointConfig(inner_steps=1, head_init="prototypes")
    with pytest.raises(ConfigError, match="queries"):
        JointConfig(meta="maml", queries=0)
    _, labels = _data(n_classes=4, per_class=3)
    with pytest.raises(DatasetError, match="4 classes, fewer than the 5 ways"):
        _tasks(labels, JointConfig(ways=5, shots=1, queries=1))
    with pytest.raises(DatasetError, match="has 3 images, fewer than the 4"):
        _tasks(labels, JointConfig(ways=2, shots=2, queries=2))


def test_prototype_head_is_the_nearest_mean_classifier() -> None:
    """Logits of the prototype head equal -||f - mean_c||^2 up to a per-row constant, so its
    argmax is the nearest class mean."""
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(12, 5, generator=gen), torch.arange(12) % 3
    w, b = prototype_head(feats, labels, 3)
    means = torch.stack([feats[labels == c].mean(0) for c in range(3)])
    query = torch.randn(7, 5, generator=gen)
    dist = -(torch.cdist(query, means) ** 2)
    logits = F.linear(query, w, b)
    torch.testing.assert_close(logits - logits[:, :1], dist - dist[:, :1], atol=1e-4, rtol=1e-4)


def test_prototype_start_moves_the_backbone_from_the_first_step() -> None:
    """With a zero head one inner step moves only the head; from prototypes it moves theta."""
    x, labels = _data()
    net = Toy()
    idx = np.flatnonzero(labels < 3)
    xs, ys = x[torch.as_tensor(idx)], torch.as_tensor(labels[idx])
    theta = {k: p for k, p in net.named_parameters()}
    for head_init, moved in (("zero", False), ("prototypes", True)):
        fast, head = inner_adapt(net, theta, xs, ys, 3, 1, 0.5, head_init=head_init)
        changed = not torch.allclose(fast["fc.weight"], theta["fc.weight"])
        assert changed is moved, head_init
        assert head[0].shape == (3, 3)


def test_first_order_proto_maml_flows_through_the_prototypes() -> None:
    """With a vanishing inner step, theta_i = theta and fo-Proto-MAML's gradient is ProtoNet's:
    the query loss under the prototype head, differentiated through the prototypes too."""
    x, labels = _data()
    cfg = JointConfig(meta="maml", beta=1.0, ways=3, shots=2, queries=4, inner_steps=1)
    cfg.head_init, cfg.inner_lr = "prototypes", 1e-12
    learner = _learner(cfg)
    task = _tasks(labels, cfg, 1)[0]
    images = lambda i: x[torch.as_tensor(i)]  # noqa: E731
    net = learner.backbone

    head = prototype_head(net(images(task.support)), support_labels(task), 3)
    loss = F.cross_entropy(F.linear(net(images(task.query)), *head), query_labels(task))
    protonet = torch.autograd.grad(loss, [net.fc.weight, net.fc.bias])

    g = maml_gradient(net, images, [task], cfg)
    torch.testing.assert_close(g["fc.weight"], protonet[0])
    torch.testing.assert_close(g["fc.bias"], protonet[1])
    cfg.head_init = "zero"  # a zero head carries no gradient to theta through its start
    assert not torch.allclose(maml_gradient(net, images, [task], cfg)["fc.weight"], protonet[0])
