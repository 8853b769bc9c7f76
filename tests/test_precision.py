"""Training precision: the run-time choice, its FP32 fallback, and bf16 / channels-last training
paths of pre-training, meta-transfer and the joint method on a tiny model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_recipe import tiny_recipe

from mtl_edge.errors import ConfigError
from mtl_edge.train import precision
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import read_checkpoint
from mtl_edge.train.meta_train import meta_train
from mtl_edge.train.meta_transfer import MetaTransferLearner
from mtl_edge.train.precision import cpu_bf16_support, resolve_precision
from mtl_edge.train.pretrain import pretrain

HAS_BF16, WHY = cpu_bf16_support()


def no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (False, "test CPU has no bf16"))


def test_auto_falls_back_to_fp32_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    no_bf16(monkeypatch)
    with caplog.at_level(logging.INFO, logger="mtl_edge.train.precision"):
        prec = resolve_precision("auto", "auto", "cpu")
    assert prec.dtype is None and not prec.channels_last and prec.name == "fp32"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "fp32" in lines[0] and "test CPU has no bf16" in lines[0]
    with torch.autocast("cpu", enabled=False), prec.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_auto_picks_bf16_and_channels_last_where_supported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "test CPU has amx_bf16"))
    prec = resolve_precision("auto", "auto", "cpu")
    assert prec.dtype is torch.bfloat16 and prec.channels_last and prec.name == "bf16+cl"
    assert resolve_precision("auto", False, "cpu").name == "bf16"
    assert resolve_precision("none", "auto", "cpu").name == "fp32"
    assert resolve_precision("none", True, "cpu").name == "fp32+cl"


def test_the_detection_reads_the_cpu_flags() -> None:
    from mtl_edge.sysinfo import cpu_info

    flags = cpu_info()["flags"]
    assert bool(flags["amx_bf16"] or flags["avx512_bf16"]) == HAS_BF16
    assert resolve_precision("auto", "auto", "cpu").name == ("bf16+cl" if HAS_BF16 else "fp32")


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"runtime.amp='fp8'.*auto, bf16, fp16, none"):
        resolve_precision("fp8", "auto", "cpu")
    with pytest.raises(ConfigError, match="runtime.amp=fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "auto", "cpu")
    with pytest.raises(ConfigError, match="runtime.channels_last='yes'"):
        resolve_precision("none", "yes", "cpu")


def test_bf16_forced_runs_autocast_and_channels_last() -> None:
    prec = resolve_precision("bf16", "auto", "cpu")
    net = prec.model(create_backbone("conv4", width=8))
    conv = net.layers[0].conv.weight
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)
    x = prec.images(torch.randn(4, 3, 16, 16))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with prec.autocast():
        out = net(x)
    if HAS_BF16:
        assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert conv.grad is not None and conv.grad.dtype == torch.float32


def test_meta_encoder_runs_in_bf16_and_the_fc_loop_in_fp32() -> None:
    learner = MetaTransferLearner(create_backbone("conv4", width=8), 5, inner_steps=2)
    prec = resolve_precision("bf16", "auto", "cpu")
    learner.autocast = prec.autocast
    prec.model(learner.encoder)
    feats = learner.encode(prec.images(torch.randn(5, 3, 16, 16)))
    assert feats.dtype == torch.float32 and feats.shape == (5, 8)
    weight, bias = learner.adapt(feats, torch.arange(5))
    assert weight.dtype == torch.float32 and bias.dtype == torch.float32


def tiny(amp: str, **runtime: object) -> dict[str, object]:
    recipe = tiny_recipe(
        pretrain={"epochs": 2, "batch_size": 16, "val_episodes": 5, "val_queries": 5},
        meta={"iterations": 4, "epoch_length": 2, "queries": 3, "inner_steps": 2,
              "test_steps": 3, "val_episodes": 3},
    )  # fmt: skip
    recipe["runtime"] |= {"amp": amp, **runtime}
    return recipe


@pytest.mark.parametrize("amp", ["bf16", "none"])
def test_pretrain_and_meta_train_in_each_precision(tmp_path: Path, amp: str) -> None:
    pre = pretrain(tiny(amp), tmp_path / "pre")
    meta = meta_train(tiny(amp), tmp_path / "meta", init=pre["checkpoint"])
    for path in (pre["checkpoint"], meta["checkpoint"]):
        state = read_checkpoint(path)["state_dict"]
        floats = [v for v in state.values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)
    rows = [json.loads(x) for x in (tmp_path / "meta" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and 0 <= r["val_acc"] <= 100 for r in rows)


def test_pretrain_fallback_path_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_bf16(monkeypatch)
    result = pretrain(tiny("auto"), tmp_path / "pre")
    rows = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert Path(result["checkpoint"]).is_file()


def test_switches_are_recipe_keys_and_cli_overrides(tmp_path: Path) -> None:
    from mtl_edge.settings import to_toml
    from mtl_edge.train.config import as_recipe, load_recipe

    cfg = as_recipe(tiny("none", compile=True))
    assert cfg.runtime.compile is True and cfg.runtime.amp == "none"
    assert as_recipe(tiny_recipe()).runtime.amp == "auto"
    path = tmp_path / "r.toml"
    path.write_text(to_toml(tiny_recipe()))
    off = load_recipe(path, ["runtime.amp=none", "runtime.channels_last=false"])
    assert resolve_precision(off.runtime.amp, off.runtime.channels_last, "cpu").name == "fp32"


def test_joint_method_trains_under_bf16(tmp_path: Path) -> None:
    from mtl_edge.train.joint_train import train_joint

    recipe = tiny_recipe(
        data={"kind": "synthetic", "options": {"size": 16, "per_class": 8, "train_classes": 6}},
        joint={"meta": "maml", "head_init": "prototypes", "ways": 3, "shots": 2, "queries": 1,
               "meta_batch": 2, "inner_steps": 2, "iterations": 2},
        runtime={"amp": "bf16", "threads": 1},
    )  # fmt: skip
    ckpt = read_checkpoint(train_joint(recipe, tmp_path / "joint"))
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
