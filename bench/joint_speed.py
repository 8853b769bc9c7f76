"""`mtl-edge bench joint`: one meta-iteration of the joint method (Eshratifar et al.) with the
per-task loop against the batched engine (`mtl_edge.train.joint_batched`) and, on a GPU, its
CUDA-graph replay, on synthetic images of the setting's shape.

Per setting and engine: seconds per meta-iteration (`rounds` timed steps, the engines taking turns
on the same tasks, after `warmup` steps each), the speed-up over the loop as the ratio of the
medians measured in this one run, the operators dispatched per iteration (non-view ATen operators,
counted with a `TorchDispatchMode`: on a GPU about one kernel launch each; a replayed graph counts
as the operators outside it), the FLOPs an iteration does (convolutions and linear layers, forward x
3 for a training pass) and the rate reached. Before timing, every engine takes the same `check`
steps from the same weights on the same tasks, and the report gives the largest relative difference
of what it learned (parameters and BatchNorm running averages moved) from the loop's: the engines
must compute the same thing (on a GPU with TF32 off for the check).

A report is the bench JSON envelope (`mtl_edge.bench.report`, kind "joint-speed") with
`results.settings`, written as joint-speed.json / .md / .png.
"""

from __future__ import annotations

import copy
import datetime as dt
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mtl_edge.atomicio import atomic_write_bytes, atomic_write_json
from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.errors import ConfigError
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.joint import JointLearner
from mtl_edge.train.stage_config import JointConfig

KIND = "joint-speed"
ENGINES = ("loop", "batched", "cuda-graphs")


@dataclass
class SpeedSetting:
    """The shape of a meta-iteration (the `joint` table's task keys, image size and width)."""

    name: str
    size: int = 84
    ways: int = 5
    shots: int = 15
    queries: int = 0
    meta_batch: int = 5
    inner_steps: int = 10
    meta: str = "reptile"
    beta: float = 0.5
    head_init: str = "prototypes"
    second_order: bool = False
    width: int = 32

    def joint(self) -> JointConfig:
        return JointConfig(
            meta=self.meta, beta=self.beta, ways=self.ways, shots=self.shots,
            queries=self.queries, meta_batch=self.meta_batch, inner_steps=self.inner_steps,
            head_init=self.head_init, second_order=self.second_order,
        )  # fmt: skip


#: Named settings: the lease recipe's joint model (recipes/joint-gpu.toml), the CPU
#: reproduction's (recipes/joint-cpu-repro.toml), fo-Proto-MAML on 1-shot tasks, and a small
#: overhead-bound one (where launches, not arithmetic, dominate, as on a GPU).
SETTINGS: dict[str, SpeedSetting] = {
    "paper-84": SpeedSetting("paper-84"),
    "cpu-repro-32": SpeedSetting("cpu-repro-32", 32, shots=10, meta_batch=4, inner_steps=5),
    "maml-1shot-84": SpeedSetting(
        "maml-1shot-84", 84, shots=1, queries=15, meta_batch=4, inner_steps=5, meta="maml"
    ),  # fmt: skip
    "small-16": SpeedSetting("small-16", 16, shots=1, queries=5, inner_steps=5),
}


def parse_setting(spec: str) -> SpeedSetting:
    """ "NAME" or "NAME:key=value:key=value" (keys of `SpeedSetting`), e.g. "paper-84:beta=1".

    Raises:
        ConfigError: unknown name or key, or a value of the wrong kind.
    """
    name, _, rest = spec.partition(":")
    if name not in SETTINGS:
        raise ConfigError(f"--settings {name!r}: use one of {', '.join(SETTINGS)}")
    setting = SETTINGS[name]
    kinds = {f.name: f.type for f in fields(SpeedSetting)}
    for item in filter(None, rest.split(":")):
        key, _, value = item.partition("=")
        if key not in kinds or key == "name":
            raise ConfigError(f"--settings {spec!r}: unknown key {key!r}")
        cast = {"int": int, "float": float, "bool": lambda v: v.lower() == "true"}.get(
            str(kinds[key]), str
        )
        try:
            setting = replace(setting, **{key: cast(value)})
        except ValueError:
            raise ConfigError(
                f"--settings {spec!r}: {key}={value!r} is not a {kinds[key]}"
            ) from None
    setting.joint()  # the joint table validates the combination
    return replace(setting, name=spec)


@dataclass
class JointSpeedConfig:
    """What `run_joint_speed` measures.

    Attributes:
        settings: SpeedSetting objects or specs for `parse_setting`.
        engines: of ENGINES; "cuda-graphs" only runs on CUDA (skipped elsewhere).
        rounds, warmup, check: timed steps, untimed steps first, and steps of the check.
        threads: torch CPU threads (0: leave as is); device: "auto", "cpu", "cuda[:i]".
        base_classes, per_class: the synthetic split the tasks come from.
        deadline_s: skip what is left after this many seconds (0: none).
    """

    settings: Sequence[SpeedSetting | str] = ("cpu-repro-32", "small-16")
    engines: Sequence[str] = ENGINES
    rounds: int = 3
    warmup: int = 1
    check: int = 3
    threads: int = 0
    device: str = "auto"
    seed: int = 0
    base_classes: int = 64
    per_class: int = 20
    deadline_s: float = 0.0
    resolved: list[SpeedSetting] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        bad = [e for e in self.engines if e not in ENGINES]
        if bad:
            raise ConfigError(f"--engines {','.join(bad)}: use {', '.join(ENGINES)}")
        if self.rounds < 1 or self.warmup < 0 or self.check < 1:
            raise ConfigError("--rounds and --check must be >= 1, --warmup >= 0")
        self.resolved = [
            s if isinstance(s, SpeedSetting) else parse_setting(s) for s in self.settings
        ]


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.n += not func.is_view  # views launch no kernel
        return func(*args, **(kwargs or {}))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _learner(
    s: SpeedSetting, engine: str, base: torch.nn.Module, classes: int, optimizer: str = "adam"
) -> JointLearner:
    cfg = replace(s.joint(), batched=engine != "loop", cuda_graphs=engine == "cuda-graphs")
    cfg.optimizer = optimizer
    learner = JointLearner(copy.deepcopy(base), classes, cfg)
    torch.manual_seed(1)
    learner.transfer_head.reset_parameters()
    return learner


def _state(learner: JointLearner) -> torch.Tensor:
    state = [v for v in learner.backbone.state_dict().values() if v.is_floating_point()]
    return torch.cat([v.detach().double().flatten().cpu() for v in state])


def flops_per_iteration(s: SpeedSetting, per_image: float) -> float:
    """Convolution + linear FLOPs of one meta-iteration: a training pass of an image counts
    3 forward passes; the loop and the batched engine do the same arithmetic."""
    cfg, n_all = s.joint(), s.ways * (s.shots + s.queries)
    passes = 0.0
    if cfg.uses_meta:
        inner = s.ways * (s.shots if s.meta == "maml" else s.shots + s.queries)
        passes += 3 * s.inner_steps * inner + (s.ways * s.queries * 3 if s.meta == "maml" else 0)
        passes += inner * (3 if s.meta == "maml" else 1) if s.head_init == "prototypes" else 0
    if cfg.uses_transfer:
        passes += 3 * n_all
    return passes * s.meta_batch * per_image


def _check(
    s: SpeedSetting,
    cfg: JointSpeedConfig,
    engines: list[str],
    base: torch.nn.Module,
    images: Callable[[np.ndarray], torch.Tensor],
    sampler: EpisodeSampler,
) -> dict[str, torch.Tensor]:
    """`cfg.check` steps of every engine from the same weights on the same tasks, in exact
    float32 (TF32 off); what each learned: the change of its float state (weights, buffers).
    With SGD for both steps: Adam turns the rounding noise of a zero gradient (a conv bias
    before BatchNorm) into a full-size step of random sign."""
    learners = {e: _learner(s, e, base, cfg.base_classes, "sgd") for e in engines}
    start = _state(learners[engines[0]])
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i in range(cfg.check):
            tasks = sampler.episodes(s.meta_batch, start=i * s.meta_batch)
            for learner in learners.values():
                learner.step(images, tasks, stats=False)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {e: _state(learner) - start for e, learner in learners.items()}


def _measure(s: SpeedSetting, cfg: JointSpeedConfig, device: torch.device) -> dict[str, Any]:
    from mtl_edge.bench.machine import torch_flops_per_image

    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.base_classes * max(cfg.per_class, s.shots + s.queries)
    labels = np.repeat(np.arange(cfg.base_classes), n // cfg.base_classes)
    x = torch.randn(len(labels), 3, s.size, s.size, generator=gen).to(device)
    by_class = [np.flatnonzero(labels == c) for c in range(cfg.base_classes)]
    sampler = EpisodeSampler(by_class, s.ways, s.shots, s.queries, seed=cfg.seed)

    def images(idx: np.ndarray) -> torch.Tensor:
        return x[torch.as_tensor(idx, device=device)]

    torch.manual_seed(cfg.seed)
    base = create_backbone("conv4", width=s.width)
    per_image = torch_flops_per_image(copy.deepcopy(base).eval(), (3, s.size, s.size))
    base = base.to(device)
    engines = [e for e in cfg.engines if e != "cuda-graphs" or device.type == "cuda"]
    moved = _check(s, cfg, engines, base, images, sampler)
    reference = moved.get("loop")
    # fresh learners for the timing: the check's graphs were captured with TF32 off
    learners = {e: _learner(s, e, base, cfg.base_classes) for e in engines}
    warm = cfg.warmup + (3 if "cuda-graphs" in engines else 0)  # 2 eager calls, a capture
    seconds: dict[str, list[float]] = {e: [] for e in engines}
    ops: dict[str, int] = {}
    for r in range(warm + cfg.rounds + 1):
        tasks = sampler.episodes(s.meta_batch, start=(cfg.check + r) * s.meta_batch)
        for e, learner in learners.items():
            if r == warm + cfg.rounds:  # last: count the operators of one step
                with _Count() as count:
                    learner.step(images, tasks, stats=False)
                ops[e] = count.n
                continue
            _sync(device)
            t0 = time.perf_counter()
            learner.step(images, tasks, stats=False)
            _sync(device)
            if r >= warm:
                seconds[e].append(time.perf_counter() - t0)
    flops = flops_per_iteration(s, per_image)
    out: dict[str, Any] = {"setting": asdict(s), "flops_per_iteration": flops, "engines": {}}
    for e, learner in learners.items():
        median = statistics.median(seconds[e])
        diff = None
        if reference is not None:
            diff = float((moved[e] - reference).norm() / reference.norm())
        out["engines"][e] = {
            "engine": learner.engine,
            "seconds": [round(t, 6) for t in seconds[e]],
            "median_s": median,
            "iterations_per_s": 1.0 / median,
            "gflops_per_s": flops / median / 1e9,
            "ops_per_iteration": ops[e],
            "rel_diff_vs_loop": diff,
        }
        if "loop" in seconds and e != "loop":
            out["engines"][e]["speedup_vs_loop"] = statistics.median(seconds["loop"]) / median
    return out


def run_joint_speed(cfg: JointSpeedConfig, progress: Callable[[str], None] = print) -> dict:
    """Measure every setting (see the module docstring); the report's `results`."""
    device = _device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does
    t0 = time.perf_counter()
    results: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    results |= {"settings": [], "skipped": []}
    for s in cfg.resolved:
        if cfg.deadline_s and time.perf_counter() - t0 > cfg.deadline_s:
            results["skipped"].append({"setting": s.name, "reason": "deadline"})
            continue
        progress(f"bench joint: {s.name} on {device}")
        results["settings"].append(_measure(s, cfg, device))
    if device.type == "cpu" and "cuda-graphs" in cfg.engines:
        results["skipped"].append({"engine": "cuda-graphs", "reason": "needs CUDA"})
    return results


def make_report(cfg: JointSpeedConfig, results: dict[str, Any]) -> dict[str, Any]:
    """The bench report envelope (`mtl_edge.bench.report`) of kind "joint-speed"."""
    from mtl_edge.bench.report import SCHEMA, VERSION, environment

    config = asdict(cfg) | {"settings": [s.name for s in cfg.resolved]}
    config.pop("resolved")
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "kind": KIND,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "config": config,
        "results": results,
    }


def to_markdown(report: dict[str, Any]) -> str:
    from mtl_edge.bench.report import environment_lines

    res = report["results"]
    lines = ["# Joint method: per-task loop vs batched meta-iteration", ""]
    lines += environment_lines(report["environment"])
    lines += [f"- device {res['device']}, {res['threads']} torch threads", ""]
    lines += [
        "| setting | engine | s / iteration | iterations / s | speed-up vs loop | "
        "operators / iteration | GFLOP/s | rel. diff vs loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in res["settings"]:
        for name, e in s["engines"].items():
            up = e.get("speedup_vs_loop")
            diff = e["rel_diff_vs_loop"]
            lines.append(
                f"| {s['setting']['name']} | {name} | {e['median_s']:.4f} | "
                f"{e['iterations_per_s']:.2f} | {f'{up:.2f}x' if up else '-'} | "
                f"{e['ops_per_iteration']} | {e['gflops_per_s']:.1f} | "
                f"{'-' if diff is None else f'{diff:.1e}'} |"
            )
    for skip in res.get("skipped", []):
        lines.append(f"- skipped {skip.get('setting') or skip.get('engine')}: {skip['reason']}")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Iterations per second (log scale) per setting, one bar per engine."""
    from mtl_edge.bench.plots import _pyplot, save_figure

    plt = _pyplot()
    settings = report["results"]["settings"]
    engines = sorted({e for s in settings for e in s["engines"]}, key=ENGINES.index)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    width = 0.8 / max(len(engines), 1)
    for i, e in enumerate(engines):
        rates = [s["engines"].get(e, {}).get("iterations_per_s", 0.0) for s in settings]
        ax.bar(np.arange(len(settings)) + i * width, rates, width, label=e)
    ax.set_xticks(np.arange(len(settings)) + width * (len(engines) - 1) / 2)
    ax.set_xticklabels([s["setting"]["name"] for s in settings], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("meta-iterations / s")
    ax.set_title(f"joint method on {report['results']['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    """joint-speed.json, .md and .png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{KIND}.json", out / f"{KIND}.md"]
    atomic_write_json(paths[0], report)
    atomic_write_bytes(paths[1], to_markdown(report).encode())
    if report["results"]["settings"]:
        paths.append(plot(report, out / f"{KIND}.png"))
    return paths
