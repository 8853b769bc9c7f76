"""The batched engine of the joint method (train/joint_batched.py, train/joint_graphs.py)
against the per-task loop of train/joint.py, the exact composition of the BatchNorm running
averages, the CUDA-graph wrapper with a CPU stand-in, the time limit of a run, and
`mtl-edge bench joint` on tiny settings."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.errors import ConfigError
from mtl_edge.train.backbones import Backbone, create_backbone
from mtl_edge.train.joint import JointLearner, maml_gradient, reptile_gradient
from mtl_edge.train.joint_batched import (
    Batched,
    TaskBatch,
    batch_reason,
    compose_running_stats,
    grouped_twin,
)
from mtl_edge.train.joint_graphs import GraphedGradients
from mtl_edge.train.stage_config import JointConfig

VARIANTS = [  # (meta, head_init, second_order)
    ("reptile", "zero", False),
    ("reptile", "prototypes", False),
    ("maml", "zero", False),
    ("maml", "prototypes", False),  # fo-Proto-MAML: the gradient through the start too
    ("maml", "zero", True),
    ("maml", "prototypes", True),
]


def _data(dtype: torch.dtype, classes: int = 8, per_class: int = 10, size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(classes), per_class)
    x = torch.randn(len(labels), 3, size, size, generator=gen).to(dtype)
    by_class = [np.flatnonzero(labels == c) for c in range(classes)]
    return (lambda i: x[torch.as_tensor(i)]), by_class


def _net(kind: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = (
        create_backbone("conv4", width=4)
        if kind == "conv4"
        else create_backbone("resnet12", widths=[4, 4, 6, 8])
    )
    return net.to(dtype).train()


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _tasks(by_class, ways=3, shots=2, queries=3, n=4, seed=1) -> list[Episode]:
    return EpisodeSampler(by_class, ways, shots, queries, seed=seed).episodes(n)


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
@pytest.mark.parametrize(("meta", "head_init", "second_order"), VARIANTS)
def test_batched_meta_gradient_equals_the_loop_in_float64(
    backbone: str, meta: str, head_init: str, second_order: bool
) -> None:
    """Same gradient (to 1e-10) and same BatchNorm buffers, running averages and counts, as
    the loop over tasks, for Reptile, first-order MAML (with the prototype start) and
    second-order MAML; a large inner step so that a wrong step would show."""
    images, by_class = _data(torch.float64)
    cfg = JointConfig(meta=meta, head_init=head_init, second_order=second_order, ways=3)
    cfg.shots, cfg.queries, cfg.inner_steps, cfg.inner_lr, cfg.beta = 2, 3, 3, 0.3, 1.0
    tasks = _tasks(by_class)
    net = _net(backbone, torch.float64)
    ref = copy.deepcopy(net)
    loop = (reptile_gradient if meta == "reptile" else maml_gradient)(ref, images, tasks, cfg)
    engine = Batched(net, cfg)
    batch = TaskBatch.gather(images, tasks)
    batched = engine.reptile(batch) if meta == "reptile" else engine.maml(batch)
    assert set(batched) == set(loop)
    assert _rel(_flat(loop), _flat(batched)) < 1e-10
    for k, v in ref.state_dict().items():  # parameters untouched, buffers moved alike
        torch.testing.assert_close(net.state_dict()[k], v, rtol=1e-10, atol=1e-12)
    assert int(net.state_dict()[next(k for k in ref.state_dict() if "num_batches" in k)]) > 0


@pytest.mark.parametrize(("meta", "head_init", "second_order"), VARIANTS[:4])
def test_batched_meta_gradient_equals_the_loop_in_float32(
    meta: str, head_init: str, second_order: bool
) -> None:
    """In float32 at the recipes' inner learning rate: equal within float rounding."""
    images, by_class = _data(torch.float32)
    cfg = JointConfig(meta=meta, head_init=head_init, second_order=second_order, ways=3)
    cfg.shots, cfg.queries, cfg.inner_steps, cfg.inner_lr, cfg.beta = 2, 3, 4, 0.01, 1.0
    tasks = _tasks(by_class, n=5)
    net = _net("conv4", torch.float32, seed=3)
    ref = copy.deepcopy(net)
    loop = (reptile_gradient if meta == "reptile" else maml_gradient)(ref, images, tasks, cfg)
    engine = Batched(net, cfg)
    batch = TaskBatch.gather(images, tasks)
    batched = engine.reptile(batch) if meta == "reptile" else engine.maml(batch)
    assert _rel(_flat(loop), _flat(batched)) < 1e-4
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("meta", "beta"), [("reptile", 0.5), ("maml", 0.5), ("reptile", 0.0)])
def test_learner_steps_are_the_same_with_either_engine(meta: str, beta: float) -> None:
    """Three meta-iterations (meta step, transfer step, Adam, the mix) from the same weights on
    the same tasks: the batched and the loop learners end with the same backbone (weights and
    BatchNorm buffers) and the same base-class head."""
    images, by_class = _data(torch.float64, classes=8, per_class=12)
    cfg = JointConfig(meta=meta, beta=beta, ways=3, shots=2, queries=3, inner_steps=2)
    cfg.head_init, cfg.meta_batch = "prototypes", 3
    learners = {}
    for batched in (True, False):
        cfg.batched = batched
        learners[batched] = JointLearner(_net("conv4", torch.float64), 8, copy.deepcopy(cfg))
        learners[batched].transfer_head.double()
        torch.manual_seed(5)
        learners[batched].transfer_head.reset_parameters()
    assert learners[True].engine == "batched" and learners[False].engine == "loop"
    sampler = EpisodeSampler(by_class, 3, 2, 3, seed=2)
    for it in range(3):
        tasks = sampler.episodes(3, start=3 * it)
        stats = {b: learner.step(images, tasks) for b, learner in learners.items()}
        assert stats[True].keys() == stats[False].keys()
        for key in stats[True]:
            assert stats[True][key] == pytest.approx(stats[False][key], rel=1e-8)
    a, b = learners[True], learners[False]
    for k, v in b.backbone.state_dict().items():
        torch.testing.assert_close(a.backbone.state_dict()[k], v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a.transfer_head.weight, b.transfer_head.weight)


def test_composing_per_task_running_averages_equals_updating_them_in_turn() -> None:
    """The formula of `compose_running_stats` against u BatchNorm updates per task applied
    task after task to one module (momentum 0.3, T = 4 tasks, u = 3)."""
    gen = torch.Generator().manual_seed(0)
    seq, net = nn.BatchNorm2d(5, momentum=0.3), nn.BatchNorm2d(5, momentum=0.3)
    for m in (seq, net):
        m.running_mean.copy_(torch.linspace(-1, 1, 5))
        m.running_var.fill_(2.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = torch.randn(4, 3, 6, 5, 2, 2, generator=gen) * 3 + 1  # (T, u, n, C, H, W)
    per_task = {"running_mean": [], "running_var": []}
    for t in range(4):
        own = copy.deepcopy(net)  # every task from the same buffers
        for u in range(3):
            seq(batches[t, u])
            own(batches[t, u])
        per_task["running_mean"].append(own.running_mean)
        per_task["running_var"].append(own.running_var)
    stacked = {k: torch.stack(v) for k, v in per_task.items()}
    compose_running_stats(net, before, stacked, {"num_batches_tracked": torch.tensor(3)})
    torch.testing.assert_close(net.running_mean, seq.running_mean)
    torch.testing.assert_close(net.running_var, seq.running_var)
    assert int(net.num_batches_tracked) == int(seq.num_batches_tracked) == 12


class _SyncWatch(TorchDispatchMode):
    """Records operators that wait for the device (they would break a CUDA-graph capture)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "one_hot", "bincount", "item", "unique")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("meta", "head_init", "second_order"), VARIANTS)
def test_the_batched_gradients_never_wait_for_the_device(
    meta: str, head_init: str, second_order: bool
) -> None:
    """No .item(), nonzero, one_hot or bincount inside one meta-iteration's gradients (meta +
    transfer): what a CUDA graph holds must not need the host."""
    images, by_class = _data(torch.float32)
    cfg = JointConfig(meta=meta, head_init=head_init, second_order=second_order, beta=0.5)
    cfg.ways, cfg.shots, cfg.queries, cfg.inner_steps = 3, 2, 3, 2
    learner = JointLearner(_net("conv4", torch.float32), 8, cfg)
    batch = TaskBatch.gather(images, _tasks(by_class))
    learner._batched_gradients(batch)  # the twin is built outside the watch
    with _SyncWatch() as watch:
        learner._batched_gradients(batch)
    assert watch.seen == []


class _Mixed(Backbone):
    """A registered-style backbone with a Linear layer inside: not batchable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 4)
        self._describe(3, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_batch_reason_and_the_fallback_to_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    assert batch_reason(create_backbone("conv4", width=4)) is None
    assert "not a registered backbone" in batch_reason(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert "neither Conv2d nor BatchNorm2d" in batch_reason(_Mixed())
    net = create_backbone("conv4", width=4)
    net.layers[1].bn.momentum = None
    assert "cumulative average" in batch_reason(net)
    _, by_class = _data(torch.float32)
    mixed = [*_tasks(by_class, shots=2), *_tasks(by_class, shots=1)]
    assert "differ" in batch_reason(create_backbone("conv4", width=4), mixed)
    with caplog.at_level(logging.WARNING, logger="mtl_edge.train.joint"):
        learner = JointLearner(net, 8, JointConfig())
    assert learner.engine == "loop" and "cumulative average" in caplog.text
    with pytest.raises(ConfigError, match="needs the batched engine"):
        learner.enable_graphs()
    assert JointLearner(net, 8, JointConfig(batched=False)).engine == "loop"


def test_the_grouped_twin_draws_nothing_from_the_random_stream() -> None:
    net = create_backbone("conv4", width=4)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    twin = grouped_twin(net, 5)
    assert torch.equal(torch.rand(1), expected)
    conv = twin.layers[1].conv
    assert (conv.in_channels, conv.out_channels, conv.groups) == (20, 20, 5)
    assert twin.layers[1].bn.num_features == 20 and conv.weight.is_meta


class _StandInGraph:
    """`torch.cuda.CUDAGraph` on the CPU: a capture records `fn` and runs it once with the
    module's state put back afterwards (a real capture runs nothing); a replay runs it again
    and writes the results into the captured output tensors, as a graph writes its outputs."""

    captures = 0

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def capture(self, fn):  # noqa: ANN001, ANN201
        _StandInGraph.captures += 1
        saved = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.fn, self.out = fn, fn()
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                v.copy_(saved[k])
        return self.out

    def replay(self) -> None:
        fresh = tree_leaves(self.fn())
        with torch.no_grad():
            for old, new in zip(tree_leaves(self.out), fresh, strict=True):
                old.copy_(new)


def test_graph_replay_learns_exactly_what_the_eager_engine_learns() -> None:
    """Warm-up calls, one capture per task shape, then replays with the new images copied in:
    five iterations end where the eager batched learner ends (weights, buffers, head)."""
    images, by_class = _data(torch.float64, classes=8, per_class=12)
    cfg = JointConfig(ways=3, shots=2, queries=3, inner_steps=2, head_init="prototypes")
    learners = [JointLearner(_net("conv4", torch.float64), 8, copy.deepcopy(cfg)) for _ in "ab"]
    for learner in learners:
        learner.transfer_head.double()
        torch.manual_seed(5)
        learner.transfer_head.reset_parameters()
    graphed, eager = learners
    _StandInGraph.captures = 0
    graphed.enable_graphs(
        warmup=1, make_graph=lambda: _StandInGraph(graphed.backbone), eager=lambda f: f()
    )
    assert graphed.engine == "batched+cuda-graphs"
    sampler = EpisodeSampler(by_class, 3, 2, 3, seed=2)
    for it in range(5):
        meta_batch = 3 if it < 3 else 2  # a new shape at iteration 4: captured anew
        tasks = sampler.episodes(meta_batch, start=3 * it)
        for learner in learners:
            learner.step(images, tasks, stats=False)
    assert _StandInGraph.captures == 2
    for k, v in eager.backbone.state_dict().items():
        torch.testing.assert_close(graphed.backbone.state_dict()[k], v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(graphed.transfer_head.bias, eager.transfer_head.bias)


def test_a_failed_capture_falls_back_to_eager(caplog: pytest.LogCaptureFixture) -> None:
    class Refusing:
        def capture(self, fn):  # noqa: ANN001, ANN201
            raise RuntimeError("operation not permitted when stream is capturing\ndetails")

        def replay(self) -> None:
            raise AssertionError("never replayed")

    calls = []

    def fn(batch: TaskBatch) -> list[torch.Tensor]:
        calls.append(batch)
        return [batch.x.sum()]

    graphed = GraphedGradients(fn, warmup=1, make_graph=Refusing, eager=lambda f: f())
    images, by_class = _data(torch.float32)
    batch = TaskBatch.gather(images, _tasks(by_class))
    with caplog.at_level(logging.WARNING, logger="mtl_edge.train.joint_graphs"):
        for _ in range(3):
            assert torch.equal(graphed(batch)[0], batch.x.sum())
    assert graphed.failed == "RuntimeError: operation not permitted when stream is capturing"
    assert len(calls) == 3 and caplog.text.count("capture failed") == 1


def test_a_time_limit_stops_the_run_and_saves_where_it_got(tmp_path: Path) -> None:
    from tiny_recipe import tiny_recipe

    from mtl_edge.train.joint_train import train_joint

    joint = {"ways": 3, "shots": 2, "queries": 1, "meta_batch": 2, "inner_steps": 2}
    joint |= {"iterations": 10_000, "log_every": 1000, "checkpoint_every": 0}
    final = train_joint(tiny_recipe(joint=joint), tmp_path / "run", time_limit_s=1e-9)
    ckpt = torch.load(final, weights_only=True)
    assert ckpt["metrics"]["iteration"] == 1 and ckpt["metrics"]["stopped"] == "time limit"
    assert ckpt["metrics"]["engine"] == "batched"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["iteration"] for ln in lines] == [1]


def test_bench_joint_reports_the_speedup_the_operators_and_the_check(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", "bench", "joint", "--settings",
         "small-16:width=4:meta_batch=3:inner_steps=2,small-16:width=4:meta=maml:beta=1",
         "--rounds", "1", "--warmup", "0", "--check", "2", "--threads", "1", "--device", "cpu",
         "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["kind"] == "joint-speed" and report["results"]["device"] == "cpu"
    assert {p.name for p in out.iterdir()} == {
        "joint-speed.json",
        "joint-speed.md",
        "joint-speed.png",
    }
    assert report["results"]["skipped"] == [{"engine": "cuda-graphs", "reason": "needs CUDA"}]
    for s in report["results"]["settings"]:
        loop, batched = s["engines"]["loop"], s["engines"]["batched"]
        assert batched["engine"] == "batched" and loop["engine"] == "loop"
        assert batched["rel_diff_vs_loop"] < 1e-4 and loop["rel_diff_vs_loop"] == 0.0
        assert batched["ops_per_iteration"] < loop["ops_per_iteration"]
        ratio = loop["median_s"] / batched["median_s"]
        assert batched["speedup_vs_loop"] == pytest.approx(ratio)
        assert s["flops_per_iteration"] > 0
    assert "speed-up vs loop" in (out / "joint-speed.md").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", "bench", "joint", "--settings", "nope"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "--settings 'nope': use one of" in bad.stderr
