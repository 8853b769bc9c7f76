"""FLOP accounting of the training stages: a hand count on a small net, and the work that
torch's own FLOP counter sees in real pre-training and meta-transfer steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mtl_edge.train.config import as_recipe
from mtl_edge.train.flops import layer_costs, meta_encoder, pretrain_network, stage_flops
from mtl_edge.train.meta_transfer import MetaTransferLearner, Task

ARGS = {"width": 2, "in_channels": 1}  # conv4, 1 input channel, 2 filters, 16x16 inputs
SHAPE = (1, 16, 16)
# Conv-4 by hand: 3x3 convs (padding 1) at 16, 8, 4 and 2 pixels, each followed by a 2x2 pool.
MACS = [16 * 16 * 2 * (1 * 9), 8 * 8 * 2 * (2 * 9), 4 * 4 * 2 * (2 * 9), 2 * 2 * 2 * (2 * 9)]
FWD = 2.0 * sum(MACS)  # 15,264 FLOPs
LATER = 2.0 * sum(MACS[1:])  # the convs whose input requires grad (not the image's)


def _recipe(**meta: object):
    return as_recipe({"model": {"backbone": "conv4", "args": ARGS, "preprocess": {
        "size": 16, "color_mode": "L", "mean": [0.5], "std": [0.5]}}, "meta": meta})  # fmt: skip


def test_hand_count_pretrain_and_meta() -> None:
    cfg = _recipe(ways=3, shots=1, queries=2, inner_steps=4)
    pre = stage_flops("pretrain", "conv4", ARGS, cfg, SHAPE, {"train_images": 10, "classes": 3})
    fc = 2.0 * 2 * 3  # the classifier: 2 features x 3 classes
    assert pre["forward_per_image"] == FWD + fc
    # backward: input gradients of every layer but the first conv, weight gradients of all
    assert pre["train_per_image"] == (FWD + fc) + (LATER + fc) + (FWD + fc)
    assert pre["total"] == 10 * pre["train_per_image"]
    work = {"tasks": 2, "support_images": 6, "query_images": 12, "eval_images": 5}
    meta = stage_flops("meta", "conv4", ARGS, cfg, SHAPE, work)
    # SS convs: W frozen, but dL/dW' (W' = W * Phi_S1) is computed for Phi_S1's gradient
    assert meta["train_per_image"] == FWD + LATER + FWD
    loop = 4 * (4.0 * 3 * 3 * 2) + 2.0 * 6 * 3 * 2  # T x (2 products of n_s x ways x D) + logits
    assert meta["support"] == 6 * FWD  # first order: support forward only
    assert meta["query"] == 12 * meta["train_per_image"]
    assert meta["inner_loop"] == 2 * loop and meta["eval"] == 5 * FWD
    second = stage_flops("meta", "conv4", ARGS, _recipe(ways=3, shots=1, queries=2,
                         inner_steps=4, second_order=True), SHAPE, work)  # fmt: skip
    assert second["support"] == 6 * meta["train_per_image"] and second["inner_loop"] == 3 * 2 * loop
    plain = [c for c in layer_costs(meta_encoder("resnet12", {"widths": [2, 2, 2, 2]},
             _recipe(ss_shortcut=False)), (3, 16, 16)) if not c.weight_grad]  # fmt: skip
    assert plain and all(c.name.endswith("shortcut.conv") for c in plain)  # frozen plain 1x1


def _conv_flops(counter: FlopCounterMode) -> float:
    counts = counter.get_flop_counts()["Global"]
    return float(sum(v for k, v in counts.items() if "convolution" in str(k)))


def test_counts_match_torchs_flop_counter_on_real_steps() -> None:
    torch.manual_seed(0)
    net = pretrain_network("conv4", ARGS, 3)
    costs = layer_costs(net, SHAPE)
    x, y = torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 0])
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    conv_only = [c for c in costs if c.name != "1"]
    assert _conv_flops(counter) == pytest.approx(4 * sum(
        c.forward * (1 + c.input_grad + c.weight_grad) for c in conv_only))  # fmt: skip
    learner = MetaTransferLearner(meta_encoder("conv4", ARGS, _recipe()), 3, inner_steps=2)
    task = Task(torch.randn(3, *SHAPE), torch.arange(3), torch.randn(6, *SHAPE),
                torch.arange(3).repeat_interleave(2), np.arange(3))  # fmt: skip
    opt = learner.make_optimizer()
    with FlopCounterMode(display=False) as counter:
        learner.meta_step([task, task], opt)
    enc = layer_costs(learner.encoder, SHAPE)
    want = stage_flops("meta", "conv4", ARGS, _recipe(ways=3, shots=1, queries=2), SHAPE,
                       {"support_images": 6, "query_images": 12})  # fmt: skip
    assert _conv_flops(counter) == pytest.approx(want["support"] + want["query"])
    assert want["support"] == 6 * sum(c.forward for c in enc)


def test_a_training_stage_reports_the_counted_flops(tmp_path) -> None:
    from model_fixtures import tiny_checkpoint

    from mtl_edge.workflows.pipeline import _training_result
    from mtl_edge.workflows.stages import StageContext

    path = tiny_checkpoint(tmp_path / "meta" / "best.pt", size=16)
    cfg = _recipe(ways=5, shots=1, queries=2, inner_steps=3)
    ctx = StageContext("meta", cfg, "test", tmp_path, tmp_path / "meta", False, {})
    work = {"tasks": 4, "support_images": 20, "query_images": 40, "eval_images": 10}
    got = _training_result(ctx, {"checkpoint": str(path), "images": 60, "work": work})
    ckpt = torch.load(path, weights_only=False)
    args = {k: v for k, v in ckpt["model_args"].items() if k != "ss_shortcut"}
    want = stage_flops("meta", "resnet12", args, cfg, (3, 16, 16), work)
    assert got.train_flops == want["total"] > 0 and got.outputs["flops"] == want
    assert got.images == 60 and got.outputs["checkpoint"] == "meta/best.pt"
