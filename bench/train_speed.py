"""`mtl-edge bench train`: training steps per second in FP32 eager, bf16 autocast, bf16 +
channels-last and (optionally) torch.compile, measured in one process run.

Every mode trains its own copy of the same randomly initialised network on the same random
batch, so the modes differ only in precision, memory format and compilation. The modes are
timed in interleaved rounds (mode A, B, C, A, B, C, ...): a neighbour's load burst on a shared
machine hits every mode alike, and the ratios to FP32 eager are taken round by round (the
median of the per-round ratios is reported), which is what stays meaningful across machines.

Steps:

- "pretrain": one SGD (Nesterov momentum) step of the backbone + a linear classifier over
  `classes` outputs on a batch of `batch` images, cross-entropy in FP32;
- "meta": one meta-transfer step (`MetaTransferLearner.meta_step`) on a meta-batch of
  `meta_batch` 5-way `shots`-shot tasks with 15 queries per class: SS encoder forward under the
  precision (compiled with "+compile"), the FC inner loop in FP32, batched over the tasks with
  its closed-form gradient; "+loop" runs the per-task autograd inner loop instead (the
  reference, `meta.inner_loop = "autograd"`), so `--modes fp32,fp32+loop` measures what the
  batched loop gains, as a ratio in one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mtl_edge.errors import ConfigError

MODES = ("fp32", "fp32+cl", "bf16", "bf16+cl", "bf16+cl+compile", "fp32+loop", "bf16+cl+loop")
STEPS = ("pretrain", "meta")


@dataclass
class TrainSpeedConfig:
    """What one `bench train` run measures.

    Attributes:
        backbone, backbone_args: the registry network (e.g. resnet12, {"widths": [...]}).
        image_size: input side (pixels); in_channels come from backbone_args (default 3).
        batch: images per pre-training step.
        step: "pretrain" or "meta".
        shots, inner_steps, meta_batch: the meta step's tasks and FC inner loop (step "meta").
        classes: outputs of the pre-training classifier.
        modes: subset of `MODES`, in timing order; "fp32" (the reference) is added if missing.
        rounds, steps_per_round: interleaved rounds and timed steps of each mode per round.
        warmup: untimed steps per mode before the first round (compile: its compilation).
        threads: torch intra-op threads (None = torch's default).
        seed: weights and batch.
    """

    backbone: str = "resnet12"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    image_size: int = 84
    batch: int = 64
    step: str = "pretrain"
    shots: int = 1
    inner_steps: int = 20
    meta_batch: int = 1
    classes: int = 64
    modes: list[str] = field(default_factory=lambda: ["fp32", "bf16", "bf16+cl"])
    rounds: int = 3
    steps_per_round: int = 3
    warmup: int = 2
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"--modes {','.join(bad)}: use some of {', '.join(MODES)}")
        if self.step not in STEPS:
            raise ConfigError(f"--step {self.step!r}: use pretrain or meta")
        if min(self.batch, self.rounds, self.steps_per_round, self.image_size, self.meta_batch) < 1:
            raise ConfigError(
                "--batch, --rounds, --steps, --image-size and --meta-batch must be >= 1"
            )
        if self.step == "pretrain" and any("loop" in m for m in self.modes):
            raise ConfigError("--modes ...+loop: the inner loop is a --step meta mode")
        if "fp32" not in self.modes:
            self.modes = ["fp32", *self.modes]


def _parse_mode(mode: str) -> tuple[bool, bool, bool]:
    """mode name -> (bf16, channels_last, compile); "loop" is read by the meta step."""
    parts = mode.split("+")
    return parts[0] == "bf16", "cl" in parts, "compile" in parts


def _pretrain_step(cfg: TrainSpeedConfig, mode: str) -> tuple[Callable[[], None], int]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mtl_edge.train.backbones import create_backbone
    from mtl_edge.train.precision import Precision

    bf16, cl, compiled = _parse_mode(mode)
    prec = Precision("cpu", torch.bfloat16 if bf16 else None, cl, mode)
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.backbone, **cfg.backbone_args)
    net = prec.model(nn.Sequential(backbone, nn.Linear(backbone.feature_dim, cfg.classes)))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, backbone.in_channels, cfg.image_size, cfg.image_size)
    x = prec.images(torch.randn(shape, generator=gen))
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=gen)
    model: Any = torch.compile(net) if compiled else net

    def step() -> None:
        with prec.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, cfg.batch


def _meta_step(cfg: TrainSpeedConfig, mode: str) -> tuple[Callable[[], None], int]:
    import numpy as np
    import torch

    from mtl_edge.train.backbones import create_backbone
    from mtl_edge.train.meta_transfer import MetaTransferLearner, Task
    from mtl_edge.train.precision import Precision

    bf16, cl, compiled = _parse_mode(mode)
    prec = Precision("cpu", torch.bfloat16 if bf16 else None, cl, mode)
    torch.manual_seed(cfg.seed)
    learner = MetaTransferLearner(
        create_backbone(cfg.backbone, **cfg.backbone_args),
        5,
        inner_steps=cfg.inner_steps,
        inner_loop="autograd" if "loop" in mode.split("+") else "batched",
    )
    learner.autocast = prec.autocast
    learner.compile = compiled
    prec.model(learner.encoder)
    opt = learner.make_optimizer()
    gen = torch.Generator().manual_seed(cfg.seed)
    c, s = learner.encoder.in_channels, cfg.image_size  # type: ignore[attr-defined]
    tasks = [
        Task(
            support_x=prec.images(torch.randn(5 * cfg.shots, c, s, s, generator=gen)),
            support_y=torch.arange(5).repeat_interleave(cfg.shots),
            query_x=prec.images(torch.randn(75, c, s, s, generator=gen)),
            query_y=torch.arange(5).repeat_interleave(15),
            classes=np.arange(5),
        )
        for _ in range(cfg.meta_batch)
    ]

    def step() -> None:
        learner.meta_step(tasks, opt)

    return step, 5 * (cfg.shots + 15) * cfg.meta_batch


def run_train_speed(cfg: TrainSpeedConfig) -> dict[str, Any]:
    """Time every mode of `cfg` in interleaved rounds.

    Returns:
        {"step", "input_shape", "bf16": {"supported", "reason"}, "threads", "modes": [{"mode",
         "images_per_step", "warmup_s", "step_s" (median), "images_per_s" (median over
         rounds), "ratio_vs_fp32" (median of per-round ratios), "rounds_images_per_s"}],
         "errors": {mode: reason}}.
    """
    import torch

    from mtl_edge.train.precision import cpu_bf16_support

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    make = _pretrain_step if cfg.step == "pretrain" else _meta_step
    steps: dict[str, tuple[Callable[[], None], int]] = {}
    warm: dict[str, float] = {}
    errors: dict[str, str] = {}
    for mode in cfg.modes:
        try:
            fn, n = make(cfg, mode)
            t0 = time.perf_counter()
            for _ in range(cfg.warmup + (2 if "compile" in mode else 0)):
                fn()
            warm[mode] = time.perf_counter() - t0
            steps[mode] = (fn, n)
        except Exception as e:  # noqa: BLE001 - compile failures are a result, not a crash
            if mode == "fp32":
                raise
            errors[mode] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    per_round: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(cfg.rounds):
        for mode, (fn, _n) in steps.items():
            t0 = time.perf_counter()
            for _ in range(cfg.steps_per_round):
                fn()
            per_round[mode].append((time.perf_counter() - t0) / cfg.steps_per_round)
    ok, reason = cpu_bf16_support()
    modes = []
    for mode, times in per_round.items():
        n = steps[mode][1]
        ratios = [ref / t for ref, t in zip(per_round["fp32"], times, strict=True)]
        modes.append(
            {
                "mode": mode,
                "images_per_step": n,
                "warmup_s": warm[mode],
                "step_s": statistics.median(times),
                "images_per_s": statistics.median(n / t for t in times),
                "ratio_vs_fp32": statistics.median(ratios),
                "rounds_images_per_s": [n / t for t in times],
            }
        )
    channels = int(cfg.backbone_args.get("in_channels", 3))
    batch = cfg.batch if cfg.step == "pretrain" else 5 * (cfg.shots + 15) * cfg.meta_batch
    return {
        "step": cfg.step,
        "backbone": cfg.backbone,
        "input_shape": [batch, channels, cfg.image_size, cfg.image_size],
        "bf16": {"supported": ok, "reason": reason},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "modes": modes,
        "errors": errors,
    }


def train_speed_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per mode."""
    from mtl_edge.bench.report import environment_lines

    res, conf = report["results"], report["config"]
    lines = ["# Training speed", "", *environment_lines(report["environment"]), ""]
    lines.append(
        f"- {res['step']} step of {res['backbone']} {conf.get('backbone_args') or ''}, input "
        f"{res['input_shape']}, {res['threads']} threads, torch {res['torch']}; bf16 units: "
        f"{res['bf16']['supported']} ({res['bf16']['reason']})"
    )
    lines.append(
        f"- {conf['rounds']} interleaved rounds x {conf['steps_per_round']} steps per mode; "
        "img/s is the median over rounds, the ratio the median of per-round ratios to fp32"
    )
    lines += ["", "| mode | img/s | step s | x fp32 | warm-up s |", "|---|---|---|---|---|"]
    for m in res["modes"]:
        lines.append(
            f"| {m['mode']} | {m['images_per_s']:.1f} | {m['step_s']:.3f} | "
            f"{m['ratio_vs_fp32']:.2f} | {m['warmup_s']:.1f} |"
        )
    for mode, why in res.get("errors", {}).items():
        lines.append(f"\n- {mode} failed: {why}")
    return "\n".join(lines) + "\n"
