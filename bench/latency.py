"""`mtl-edge bench latency`: per-batch latency of every (backend, precision, mode) of a model.

Each (backend, precision) runs in its own worker process (`latency_worker.py`), because torch's
and onnxruntime's thread pools spin after each call and fight over the cores when they share
one (DESIGN.md). With `order="batch"` (the default, for shared CPUs) the parent drives the
workers round-robin: for each batch size, R rounds, and in each round every worker measures its
share of the time budget while the others wait idle, so a neighbour's load burst hits all
backends alike and the ratios to PyTorch eager FP32 are taken within the run. With
`order="setting"` (the GPU plan) each worker is started, runs all its batches and modes, and is
closed before the next one starts: its GPU memory is freed, and a `deadline_s` that is reached
skips only the settings at the end of the list (listed with the reason, never dropped).

GPU settings (`onnxruntime-cuda`, `torch-cuda`, `torch-cuda-graphs`, `torch-compile`) are timed
in modes "compute" and/or "copies" (see `latency_worker.py`); with them the run also measures
the GPU's matrix rates and bandwidths (`gpu_peak.py`) and, with `parity_episodes`, GPU against
CPU features (`gpu_parity.py`), all in the same command. `dry_run` runs the GPU settings' code
on the CPU, to check a plan before a GPU machine is lent.

The reference "torch" backend runs the checkpoint's network (or, for a bundle of a registry
backbone, the bundle's own weights) with SS and BatchNorm folded into the convolutions, i.e.
the same graph the ONNX file holds; the ratios thus compare runtimes, not folding. `--random`
builds a randomly initialised registry backbone and exports it (`random_model.py`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

from mtl_edge.bench.latency_worker import TORCH_GPU, Worker
from mtl_edge.bench.timing import TimingBudget
from mtl_edge.errors import ConfigError
from mtl_edge.stats import latency_summary

log = logging.getLogger(__name__)

#: Backends `bench latency` knows. "torch" is CPU eager FP32 (the reference); the torch GPU
#: backends are in `latency_torch_gpu.py`; the rest go through `create_backend`.
BENCH_BACKENDS = (
    "torch",
    *TORCH_GPU,
    "onnxruntime",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "tensorrt",
)
GPU_BACKENDS = (*TORCH_GPU, "onnxruntime-cuda")
TORCH_GPU_PRECISIONS = ("fp32", "fp16", "bf16")
GPU_MODES = ("compute", "copies")
REFERENCE = ("torch", "fp32", "host")


@dataclass(frozen=True)
class Setting:
    """One (backend, precision) worker, the modes it is timed in and, when not all of the
    run's, its batch sizes."""

    backend: str
    precision: str
    modes: tuple[str, ...]
    batches: tuple[int, ...] = ()

    def batch_sizes(self, default: Sequence[int]) -> list[int]:
        return list(self.batches or default)


@dataclass
class LatencyConfig:
    """What one `bench latency` run measures.

    Attributes:
        bundle: model bundle folder (None with `random`: exported into the run folder).
        checkpoint: checkpoint for the torch settings (None: the bundle's weights when it is a
            registry backbone; with `random`, the one written).
        backbone, random, seed: build a random-weight registry backbone instead.
        backbone_args, image_size: its keyword options and input size (84 for miniImageNet).
        backends, precisions: the matrix; torch runs fp32 only, the torch GPU backends fp32,
            fp16 and bf16 (autocast).
        settings: explicit "backend:precision[:mode+mode]" entries instead of the matrix.
        gpu_modes: modes of GPU settings given through the matrix.
        batch_sizes: images per call.
        threads: intra-op threads of every backend (None: each library's default).
        budget: per (backend, precision, mode, batch) warm-up and timing.
        rounds: interleaved rounds the timing budget is split into (order "batch").
        order: "batch" (round-robin, shared CPUs) or "setting" (one worker at a time).
        deadline_s: stop starting new measurements this many seconds after the start.
        parity_episodes: with GPU settings, GPU vs CPU features on this many episodes (0: off).
        pipeline_images: JPEGs for the decode/GPU overlap measurement of the first
            onnxruntime-cuda setting (0: off).
        dry_run: run GPU settings on the CPU (checks a plan; the figures mean nothing).
        calib: calibration images for the int8 export of `random` (None: synthetic images).
    """

    bundle: Path | None = None
    checkpoint: Path | None = None
    backbone: str | None = None
    random: bool = False
    seed: int = 0
    backends: Sequence[str] = ("torch", "onnxruntime")
    precisions: Sequence[str] = ("fp32", "int8-cpu")
    settings: Sequence[str] = ()
    gpu_modes: Sequence[str] = ("compute",)
    batch_sizes: Sequence[int] = (1, 5, 25, 75, 128)
    threads: int | None = None
    budget: TimingBudget = field(default_factory=TimingBudget)
    rounds: int = 3
    order: str = "batch"
    deadline_s: float | None = None
    parity_episodes: int = 0
    pipeline_images: int = 0
    dry_run: bool = False
    calib: Path | None = None
    measure_peak: bool = True
    backbone_args: dict[str, Any] = field(default_factory=dict)
    image_size: int = 84


def parse_list(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{option} {text!r}: give a comma-separated list")
    return items


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(t) for t in parse_list(text, option)]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give comma-separated whole numbers") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{option} {text!r}: every value must be at least 1")
    return values


def _check(backend: str, precision: str, modes: tuple[str, ...]) -> Setting:
    from mtl_edge.backends.select import PRECISIONS

    if backend not in BENCH_BACKENDS:
        raise ConfigError(f"--backends {backend!r}: use some of {', '.join(BENCH_BACKENDS)}")
    allowed = dict.fromkeys(TORCH_GPU, TORCH_GPU_PRECISIONS)
    allowed["onnxruntime-cuda"] = ("fp32", "fp16")
    if precision not in allowed.get(backend, PRECISIONS):
        choices = ", ".join(allowed.get(backend, PRECISIONS))
        raise ConfigError(f"{backend}: precision {precision!r}; use one of {choices}")
    want = GPU_MODES if backend in GPU_BACKENDS else ("host",)
    if not modes or any(m not in want for m in modes):
        raise ConfigError(f"{backend}: modes {'+'.join(modes)!r}; use {' or '.join(want)}")
    return Setting(backend, precision, modes)


def parse_settings(entries: Sequence[str]) -> list[Setting]:
    """Settings from "backend:precision[:mode+mode][@b/b/...]" entries, e.g.
    "onnxruntime-cuda:fp16:compute+copies" or "torch-compile:bf16:compute@1/256" (that
    setting at batch 1 and 256 only).

    Raises:
        ConfigError: a malformed entry, unknown name, or a mode that does not apply.
    """
    out = []
    for entry in entries:
        spec, _, at = entry.partition("@")
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(f"--settings {entry!r}: write backend:precision[:modes][@b/b]")
        backend, precision = parts[0], parts[1]
        default = ("compute",) if backend in GPU_BACKENDS else ("host",)
        modes = tuple(parts[2].split("+")) if len(parts) == 3 else default
        batches = tuple(parse_ints(at.replace("/", ","), f"--settings {entry!r}")) if at else ()
        out.append(Setting(*astuple(_check(backend, precision, modes))[:3], batches))
    return out


def settings_matrix(
    backends: Sequence[str],
    precisions: Sequence[str],
    gpu_modes: Sequence[str] = ("compute",),
) -> list[Setting]:
    """Settings to measure from the backend x precision matrix, the torch reference first.

    Raises:
        ConfigError: an unknown backend or precision name.
    """
    from mtl_edge.backends.select import PRECISIONS

    for p in precisions:
        if p not in PRECISIONS and p not in TORCH_GPU_PRECISIONS:
            raise ConfigError(f"--precisions {p!r}: use some of {', '.join(PRECISIONS)} or bf16")
    pairs: list[tuple[str, str]] = []
    for b in backends:
        if b not in BENCH_BACKENDS:
            raise ConfigError(f"--backends {b!r}: use some of {', '.join(BENCH_BACKENDS)}")
        if b == "torch":
            pairs.append(("torch", "fp32"))
        elif b in TORCH_GPU:
            pairs += [(b, p) for p in precisions if p in TORCH_GPU_PRECISIONS] or [(b, "fp32")]
        elif b == "onnxruntime-cuda":
            pairs += [(b, p) for p in precisions if p in ("fp32", "fp16")]
        elif b == "tensorrt":
            pairs += [(b, "int8" if p == "int8-cpu" else p) for p in precisions if p != "bf16"]
        else:
            pairs += [(b, p) for p in precisions if p != "bf16"]
    unique = list(dict.fromkeys(pairs))
    unique.sort(key=lambda pair: pair != REFERENCE[:2])
    modes = tuple(gpu_modes)
    return [_check(b, p, modes if b in GPU_BACKENDS else ("host",)) for b, p in unique]


def settings_of(cfg: LatencyConfig) -> list[Setting]:
    """The settings `cfg` measures (explicit `settings`, else the matrix)."""
    if cfg.settings:
        return parse_settings(cfg.settings)
    return settings_matrix(cfg.backends, cfg.precisions, cfg.gpu_modes)


def run_latency(cfg: LatencyConfig, workdir: Path | None = None) -> dict[str, Any]:
    """Measure every setting of `cfg`; the `results` section of a latency report.

    Returns:
        {"settings": [...], "skipped": [...], "peak": {...}, "model": {...}} and, with GPU
        settings, "gpu_peak" and "parity"; each setting has backend, precision, mode,
        provider and batch results (summary, ratio to torch fp32, achieved FLOP/s, % of peak).

    Raises:
        ConfigError: unknown names, no model given, nothing that could run.
    """
    if cfg.rounds < 1:
        raise ConfigError(f"--rounds {cfg.rounds}: must be at least 1")
    if cfg.order not in ("batch", "setting"):
        raise ConfigError(f"--order {cfg.order!r}: use batch or setting")
    settings = settings_of(cfg)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if cfg.random:
        from mtl_edge.bench.random_model import prepare_random

        if not cfg.backbone:
            raise ConfigError("--random needs --backbone NAME (e.g. resnet12-wide)")
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="mtl-edge-bench.")
            workdir = Path(tmp.name)
        precisions = sorted({s.precision for s in settings})
        cfg.bundle, cfg.checkpoint = prepare_random(cfg, workdir, precisions)
    if cfg.bundle is None and cfg.checkpoint is None:
        raise ConfigError("bench latency: pass --bundle B (and --checkpoint C), or --random")
    try:
        return _run(cfg, settings)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _input_shape(cfg: LatencyConfig) -> tuple[int, int, int]:
    if cfg.bundle is not None:
        from mtl_edge.bundle import Bundle

        return tuple(Bundle.load(cfg.bundle).preprocess.input_shape)  # type: ignore[return-value]
    from mtl_edge.train.checkpoint import load_checkpoint

    assert cfg.checkpoint is not None
    return tuple(load_checkpoint(cfg.checkpoint).preprocess.input_shape)  # type: ignore[return-value]


class _Collector:
    """Times and set-up info gathered from the workers, keyed by (backend, precision, mode)."""

    def __init__(self, cfg: LatencyConfig, shape: tuple[int, int, int]) -> None:
        self.cfg, self.shape, self.start = cfg, shape, time.monotonic()
        self.info: dict[tuple[str, str], dict[str, Any]] = {}
        self.times: dict[tuple[str, str, str, int], list[float]] = {}
        self.device: dict[tuple[str, str, str, int], list[float]] = {}
        self.skipped: list[dict[str, str]] = []
        self.deadline_hit = False

    def late(self) -> bool:
        limit = self.cfg.deadline_s
        self.deadline_hit |= limit is not None and time.monotonic() - self.start > limit
        return self.deadline_hit

    def skip(self, backend: str, precision: str, reason: str) -> None:
        log.warning("skipped %s %s: %s", backend, precision, reason)
        self.skipped.append({"backend": backend, "precision": precision, "reason": reason})

    def spec(self, s: Setting, first_cuda: bool) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "backend": s.backend,
            "precision": s.precision,
            "bundle": str(cfg.bundle) if cfg.bundle else None,
            "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
            "threads": cfg.threads,
            "shape": list(self.shape),
            "max_batch": max(s.batch_sizes(cfg.batch_sizes)),
            "batch_sizes": s.batch_sizes(cfg.batch_sizes),
            "dry_run": cfg.dry_run,
            "probe": s.backend in GPU_BACKENDS,
            "pipeline": cfg.pipeline_images if first_cuda else 0,
        }

    def start_worker(self, s: Setting, first_cuda: bool) -> Worker | None:
        if s.backend == "torch" and self.cfg.checkpoint is None and self.cfg.bundle is None:
            self.skip(s.backend, s.precision, "needs --checkpoint C (or --random)")
            return None
        if s.backend not in ("torch", *TORCH_GPU) and self.cfg.bundle is None:
            self.skip(s.backend, s.precision, "needs --bundle B")
            return None
        w = Worker(self.spec(s, first_cuda))
        first = w.read()
        if "error" in first:
            reason = first["error"]
            if s.backend == "torch" and self.cfg.checkpoint is None:
                reason = f"needs --checkpoint C (or a bundle of a registry backbone): {reason}"
            self.skip(s.backend, s.precision, reason)
            w.close()
            return None
        self.info[(s.backend, s.precision)] = first["ready"]
        return w

    def measure(self, w: Worker, s: Setting, batch: int, mode: str, share: Any, warm: bool) -> bool:
        """One request; False when the worker failed (it is then skipped)."""
        log.info("latency %s %s %s batch %d", s.backend, s.precision, mode, batch)
        res = w.request(batch, mode, share, warm)
        if "error" in res:
            self.skip(s.backend, s.precision, f"{mode} batch {batch}: {res['error']}")
            return False
        key = (s.backend, s.precision, mode, batch)
        self.times.setdefault(key, []).extend(res["times"])
        if res.get("device_times"):
            self.device.setdefault(key, []).extend(res["device_times"])
        return True


def _by_setting(col: _Collector, settings: list[Setting]) -> None:
    first_cuda = True
    for s in settings:
        if col.late():
            col.skip(s.backend, s.precision, f"deadline of {col.cfg.deadline_s:.0f} s reached")
            continue
        w = col.start_worker(s, first_cuda and s.backend == "onnxruntime-cuda")
        first_cuda &= s.backend != "onnxruntime-cuda"
        if w is None:
            continue
        try:
            for batch in s.batch_sizes(col.cfg.batch_sizes):
                for mode in s.modes:
                    if col.late():
                        col.skip(s.backend, s.precision, f"{mode} batch {batch}: deadline")
                    elif not col.measure(w, s, batch, mode, col.cfg.budget, warm=True):
                        break
        finally:
            w.close()


def _by_batch(col: _Collector, settings: list[Setting]) -> None:
    workers: dict[Setting, Worker] = {}
    for s in settings:  # started one at a time so that set-up does not overlap
        w = col.start_worker(s, s.backend == "onnxruntime-cuda" and not workers)
        if w is not None:
            workers[s] = w
    share = col.cfg.budget.split(col.cfg.rounds)
    try:
        for batch in col.cfg.batch_sizes:
            for r in range(col.cfg.rounds):
                for s, w in list(workers.items()):
                    for mode in s.modes if batch in s.batch_sizes(col.cfg.batch_sizes) else ():
                        if col.late():
                            col.skip(s.backend, s.precision, f"batch {batch} on: deadline")
                        elif col.measure(w, s, batch, mode, share, r == 0):
                            continue
                        w.close()
                        del workers[s]
                        break
    finally:
        for w in workers.values():
            w.close()


def _run(cfg: LatencyConfig, settings: list[Setting]) -> dict[str, Any]:
    from mtl_edge.bench import gpu_report

    shape = _input_shape(cfg)
    col = _Collector(cfg, shape)
    gpu = any(s.backend in GPU_BACKENDS for s in settings)
    extra: dict[str, Any] = {}
    if gpu:
        extra.update(gpu_report.measure_gpu_side(cfg))
    peak = measure_peak_or_skip(cfg)
    (_by_setting if cfg.order == "setting" else _by_batch)(col, settings)
    if not col.info:
        raise ConfigError(
            "bench latency: no backend could run here: "
            + "; ".join(f"{s['backend']} {s['precision']}: {s['reason']}" for s in col.skipped)
        )
    flops = _flops(cfg, col.info, shape)
    results = {
        "settings": _summaries(cfg, settings, col, flops, peak),
        "skipped": col.skipped,
        "peak": peak,
        "model": {"input_shape": list(shape), "flops_per_image": flops},
        "deadline": {"s": cfg.deadline_s, "hit": col.deadline_hit},
        **extra,
    }
    if gpu:
        gpu_report.annotate(results)
    return results


def measure_peak_or_skip(cfg: LatencyConfig) -> dict[str, Any]:
    from mtl_edge.bench.machine import measure_peaks

    if not cfg.measure_peak:
        return {"error": "not measured (--no-peak)"}
    budget = TimingBudget(
        warmup_s=cfg.budget.warmup_s,
        warmup_runs=min(cfg.budget.warmup_runs, 3),
        min_time_s=min(cfg.budget.min_time_s, 1.0),
        min_runs=min(cfg.budget.min_runs, 5),
    )
    return measure_peaks(budget, cfg.threads)


def _flops(
    cfg: LatencyConfig, info: dict[tuple[str, str], dict[str, Any]], shape: tuple[int, int, int]
) -> float | None:
    for entry in info.values():
        if entry.get("flops_per_image"):
            return float(entry["flops_per_image"])
    if cfg.bundle is not None:
        try:
            from mtl_edge.bench.machine import onnx_flops_per_image
            from mtl_edge.bundle import Bundle

            return onnx_flops_per_image(str(Bundle.load(cfg.bundle).variant_path("fp32")), shape)
        except Exception as e:  # noqa: BLE001 - FLOPs are an extra; say why they are missing
            log.warning("FLOPs per image not counted: %s", e)
    return None


def _summaries(
    cfg: LatencyConfig,
    settings: list[Setting],
    col: _Collector,
    flops: float | None,
    peak: dict[str, Any],
) -> list[dict[str, Any]]:
    out = []
    for s in settings:
        meta = col.info.get((s.backend, s.precision))
        if meta is None:
            continue
        for mode in s.modes:
            rows = []
            for batch in s.batch_sizes(cfg.batch_sizes):
                k = (s.backend, s.precision, mode, batch)
                if k not in col.times:
                    continue
                row: dict[str, Any] = {"batch": batch, **latency_summary(col.times[k], batch)}
                if k in col.device:
                    dev = latency_summary(col.device[k], batch)
                    row["device"] = {k: v for k, v in dev.items() if k != "runs"}
                ref = col.times.get((*REFERENCE, batch))
                if ref is not None and s.backend not in GPU_BACKENDS:  # CPU torch: no GPU ref
                    ref_median = latency_summary(ref, batch)["median_ms"]
                    row["speedup_vs_torch_fp32"] = ref_median / row["median_ms"]
                if flops:
                    row["achieved_flops_per_s"] = flops * row["throughput_ips"]
                    peak_key = "int8" if s.precision.startswith("int8") else "fp32"
                    rate = peak.get(peak_key, {}).get("ops_per_s")
                    if rate and s.backend not in GPU_BACKENDS:
                        row["percent_of_peak"] = 100.0 * row["achieved_flops_per_s"] / rate
                        row["peak_used"] = peak_key
                rows.append(row)
            if rows:
                out.append({"backend": s.backend, "precision": s.precision, "mode": mode,
                            **meta, "batches": rows})  # fmt: skip
    return out
