"""`mtl-edge bench latency`: per-batch latency of every (backend, precision) of a model.

Each backend runs in its own worker process, because torch's and onnxruntime's thread pools
spin after each call and fight over the cores when they share one (DESIGN.md). The parent
drives the workers round-robin: for each batch size, R rounds, and in each round every worker
measures its share of the time budget while the others wait idle on their stdin. Each
setting's figures therefore come from interleaved slices of the same run, so a neighbour's
load burst on a shared VM hits all backends alike, and the ratios to PyTorch eager FP32 are
taken within the run.

The reference "torch" backend runs the checkpoint's network with SS and BatchNorm folded into
the convolutions (`mtl_edge.export.fold`), i.e. the same graph the ONNX file holds; the ratios
thus compare runtimes, not folding. `--random` builds a randomly initialised registry backbone,
writes it as a checkpoint and exports it (fp32 + int8 variants) with `export_checkpoint`, so
torch and onnxruntime run the same weights.

Worker protocol (one JSON object per line): the worker prints {"ready": ...} or {"error": ...}
after set-up, then answers each {"batch": B, "budget": {...}, "warm": bool} from stdin with
{"times": [...], "device_times": [...] | null}; an empty line or EOF ends it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.bench.timing import TimingBudget, measure
from mtl_edge.errors import ConfigError, MtlEdgeError
from mtl_edge.stats import latency_summary

log = logging.getLogger(__name__)

#: Backends `bench latency` knows. "torch" is CPU eager FP32 (the reference); "torch-cuda"
#: runs fp32 eager and fp16 with CUDA graphs; the rest go through `create_backend`.
BENCH_BACKENDS = (
    "torch",
    "torch-cuda",
    "onnxruntime",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "tensorrt",
)
REFERENCE = ("torch", "fp32")


@dataclass
class LatencyConfig:
    """What one `bench latency` run measures.

    Attributes:
        bundle: model bundle folder (None with `random`: exported into the run folder).
        checkpoint: checkpoint for the torch reference (None with `random`: the one written).
        backbone, random, seed: build a random-weight registry backbone instead.
        backbone_args, image_size: its keyword options and input size (84 for miniImageNet).
        backends, precisions: the matrix; torch runs fp32 only (torch-cuda fp32 and fp16).
        batch_sizes: images per call.
        threads: intra-op threads of every backend (None: each library's default).
        budget: per (backend, precision, batch) warm-up and timing.
        rounds: interleaved rounds the timing budget is split into.
        calib: calibration images for the int8 export of `random` (None: synthetic images).
    """

    bundle: Path | None = None
    checkpoint: Path | None = None
    backbone: str | None = None
    random: bool = False
    seed: int = 0
    backends: Sequence[str] = ("torch", "onnxruntime")
    precisions: Sequence[str] = ("fp32", "int8-cpu")
    batch_sizes: Sequence[int] = (1, 5, 25, 75, 128)
    threads: int | None = None
    budget: TimingBudget = field(default_factory=TimingBudget)
    rounds: int = 3
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


def settings_matrix(backends: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
    """(backend, precision) pairs to measure, the torch reference first.

    Raises:
        ConfigError: an unknown backend or precision name.
    """
    from mtl_edge.backends.select import PRECISIONS

    for b in backends:
        if b not in BENCH_BACKENDS:
            raise ConfigError(f"--backends {b!r}: use some of {', '.join(BENCH_BACKENDS)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"--precisions {p!r}: use some of {', '.join(PRECISIONS)}")
    pairs: list[tuple[str, str]] = []
    for b in backends:
        if b == "torch":
            pairs.append(("torch", "fp32"))
        elif b == "torch-cuda":
            pairs += [("torch-cuda", p) for p in ("fp32", "fp16") if p in precisions or p == "fp32"]
        elif b == "tensorrt":
            pairs += [(b, "int8" if p == "int8-cpu" else p) for p in precisions]
        else:
            pairs += [(b, p) for p in precisions]
    seen: list[tuple[str, str]] = []
    for pair in pairs:
        if pair not in seen:
            seen.append(pair)
    return sorted(seen, key=lambda pair: pair != REFERENCE)


# ---------------------------------------------------------------------------------------------
# Worker side


class _Runner:
    """One (backend, precision) set up for timing: `run(batch)` times calls on random images."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.backend, self.precision = spec["backend"], spec["precision"]
        self.shape = tuple(spec["shape"])
        self.info: dict[str, Any] = {}
        self.cuda_graphs: dict[int, Any] = {}
        threads = spec.get("threads")
        if self.backend.startswith("torch"):
            self._setup_torch(spec, threads)
        else:
            from mtl_edge.backends.select import create_backend
            from mtl_edge.bundle import Bundle

            bundle = Bundle.load(spec["bundle"])
            self.extractor = create_backend(
                self.backend, bundle, self.precision, threads=threads, batch_size=spec["max_batch"]
            )
            self.info = {
                "provider": self.extractor.provider,
                "variant": self.extractor.precision,
                "threads": threads,
            }

    def _setup_torch(self, spec: dict[str, Any], threads: int | None) -> None:
        import torch

        from mtl_edge.bench.machine import torch_flops_per_image
        from mtl_edge.errors import UnavailableError
        from mtl_edge.train.checkpoint import load_checkpoint
        from mtl_edge.train.fuse import fuse_model

        if self.backend == "torch-cuda" and not torch.cuda.is_available():
            raise UnavailableError("torch-cuda: torch sees no CUDA GPU here")
        if threads:
            torch.set_num_threads(threads)
        path = Path(spec["checkpoint"])
        model = fuse_model(load_checkpoint(path).backbone).eval()
        self.device = torch.device("cuda" if self.backend == "torch-cuda" else "cpu")
        self.flops = torch_flops_per_image(model, self.shape)
        model = model.to(self.device)
        if self.precision == "fp16":
            model = model.half()
        self.model = model
        self.info = {
            "provider": f"torch {torch.__version__} eager on {self.device.type}"
            + (" (fp16, CUDA graphs)" if self.precision == "fp16" else ""),
            "variant": self.precision,
            "threads": torch.get_num_threads(),
            "flops_per_image": self.flops,
            "torch_model": "folded (SS and BN folded into the convs)",
        }

    def _torch_call(self, x: np.ndarray) -> Any:
        import torch

        fwd = getattr(self.model, "forward_features", self.model)
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device)
            if self.precision == "fp16":
                t = t.half()
            return fwd(t).float().cpu().numpy()

    def _cuda_graph_call(self, x: np.ndarray) -> Any:
        """Copy in, replay the graph captured for this batch size, copy out."""
        import torch

        n = len(x)
        if n not in self.cuda_graphs:
            fwd = getattr(self.model, "forward_features", self.model)
            static_in = torch.zeros((n, *self.shape), device=self.device, dtype=torch.float16)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):
                    fwd(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = fwd(static_in)
            self.cuda_graphs[n] = (graph, static_in, static_out)
        graph, static_in, static_out = self.cuda_graphs[n]
        static_in.copy_(torch.from_numpy(x).to(self.device, non_blocking=False).half())
        graph.replay()
        return static_out.float().cpu().numpy()

    def run(self, batch: int, budget: TimingBudget, warm: bool) -> dict[str, Any]:
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, *self.shape), dtype=np.float32)
        if self.backend == "torch-cuda":
            return self._run_cuda(x, budget, warm)
        call = self._torch_call if self.backend == "torch" else self.extractor.extract
        return {"times": measure(lambda: call(x), budget, warm), "device_times": None}

    def _run_cuda(self, x: np.ndarray, budget: TimingBudget, warm: bool) -> dict[str, Any]:
        """End-to-end host latency (copy in, run, copy out) and, separately, CUDA-event device
        time of the network alone on a resident input."""
        import torch

        call = self._cuda_graph_call if self.precision == "fp16" else self._torch_call
        times = measure(lambda: call(x), budget, warm)
        fwd = getattr(self.model, "forward_features", self.model)
        dev_in = torch.from_numpy(x).to(self.device)
        if self.precision == "fp16":
            dev_in = dev_in.half()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        device_times = []
        with torch.inference_mode():
            for _ in range(max(10, min(len(times), 200))):
                start.record()
                if self.precision == "fp16":
                    graph, static_in, _ = self.cuda_graphs[len(x)]
                    static_in.copy_(dev_in)
                    graph.replay()
                else:
                    fwd(dev_in)
                end.record()
                end.synchronize()
                device_times.append(start.elapsed_time(end) / 1e3)
        return {"times": times, "device_times": device_times}


def worker_main(spec_json: str) -> None:
    """Entry of a worker process (see the module docstring for the protocol)."""
    spec = json.loads(spec_json)
    try:
        runner = _Runner(spec)
    except MtlEdgeError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return
    except Exception as e:  # noqa: BLE001 - any set-up failure is reported as a skip reason
        print(json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0]}), flush=True)
        return
    print(json.dumps({"ready": runner.info}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        res = runner.run(int(req["batch"]), TimingBudget(**req["budget"]), bool(req["warm"]))
        print(json.dumps(res), flush=True)


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtl_edge.bench.latency", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        tail = (err.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited ({tail})"}

    def request(self, batch: int, budget: TimingBudget, warm: bool) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(
            json.dumps({"batch": batch, "budget": budget.to_dict(), "warm": warm}) + "\n"
        )
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Parent side


def write_random_checkpoint(
    name: str,
    preprocess: dict[str, Any],
    seed: int,
    out: Path,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint of registry backbone `name` with random weights (seed) for latency runs."""
    import torch

    from mtl_edge.fewshot.fc import HeadRecipe
    from mtl_edge.train.backbones import create_backbone
    from mtl_edge.train.checkpoint import deploy_section, save_checkpoint

    torch.manual_seed(seed)
    model = create_backbone(name, **(model_args or {}))
    ckpt = {
        "model": name,
        "model_args": dict(getattr(model, "model_args", model_args or {})),
        "state_dict": model.state_dict(),
        "stage": "pretrain",
        "preprocess": preprocess,
        "config": {},
        "deploy": deploy_section(HeadRecipe(), {"kind": "centroid"}),
    }
    save_checkpoint(out, ckpt)
    return out


def prepare_random(cfg: LatencyConfig, workdir: Path) -> tuple[Path, Path]:
    """Write a random checkpoint and export it to a bundle with int8 variants; (bundle, ckpt).

    The int8 calibration uses `cfg.calib` or, by default, synthetic images: the weights are
    random, so the quantization only has to be of the right form for the kernels to run.
    """
    from mtl_edge.data.synthetic import synthetic_split, write_class_folders
    from mtl_edge.export.api import export_checkpoint
    from mtl_edge.preprocess import Preprocess

    assert cfg.backbone is not None
    pre = Preprocess(size=cfg.image_size)
    ckpt = write_random_checkpoint(
        cfg.backbone, pre.to_dict(), cfg.seed, workdir / "random.pt", cfg.backbone_args
    )
    calib = cfg.calib
    if calib is None and any(p.startswith("int8") for p in cfg.precisions):
        split = synthetic_split(
            "train", seed=cfg.seed, size=cfg.image_size, train_classes=8, per_class=8
        )
        calib = write_class_folders(split, workdir / "calib", force=True)
    int8 = any(p.startswith("int8") for p in cfg.precisions)
    log.info("exporting random-weight %s (seed %d) to a bundle", cfg.backbone, cfg.seed)
    bundle, _ = export_checkpoint(
        ckpt,
        workdir / "bundle",
        int8=int8,
        calib=calib if int8 else None,
        fp16="fp16" in cfg.precisions,
        force=True,
        seed=cfg.seed,
        calib_images=64,
        parity_episodes=20,
        quant_episodes=20,
        eval_per_class=10,
    )
    return bundle.root, ckpt


def run_latency(cfg: LatencyConfig, workdir: Path | None = None) -> dict[str, Any]:
    """Measure every setting of `cfg`; the `results` section of a latency report.

    Returns:
        {"settings": [...], "skipped": [...], "peak": {...}, "model": {...}}; each setting has
        backend, precision, provider, batch results (summary, ratio to torch fp32, achieved
        FLOP/s and percent of peak).

    Raises:
        ConfigError: unknown names, no model given, nothing that could run.
    """
    if cfg.rounds < 1:
        raise ConfigError(f"--rounds {cfg.rounds}: must be at least 1")
    pairs = settings_matrix(cfg.backends, cfg.precisions)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if cfg.random:
        if not cfg.backbone:
            raise ConfigError("--random needs --backbone NAME (e.g. resnet12-wide)")
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="mtl-edge-bench.")
            workdir = Path(tmp.name)
        cfg.bundle, cfg.checkpoint = prepare_random(cfg, workdir)
    if cfg.bundle is None and cfg.checkpoint is None:
        raise ConfigError("bench latency: pass --bundle B (and --checkpoint C), or --random")
    try:
        return _run(cfg, pairs)
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


def _run(cfg: LatencyConfig, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    shape = _input_shape(cfg)
    skipped: list[dict[str, str]] = []
    peak = measure_peak_or_skip(cfg)
    workers: dict[tuple[str, str], _Worker] = {}
    info: dict[tuple[str, str], dict[str, Any]] = {}
    for backend, precision in pairs:
        if backend.startswith("torch") and cfg.checkpoint is None:
            skipped.append(_skip(backend, precision, "needs --checkpoint C (or --random)"))
            continue
        if not backend.startswith("torch") and cfg.bundle is None:
            skipped.append(_skip(backend, precision, "needs --bundle B"))
            continue
        spec = {
            "backend": backend,
            "precision": precision,
            "bundle": str(cfg.bundle) if cfg.bundle else None,
            "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
            "threads": cfg.threads,
            "shape": list(shape),
            "max_batch": max(cfg.batch_sizes),
        }
        # Start one at a time so that set-up (export checks, sessions) does not overlap.
        w = _Worker(spec)
        first = w.read()
        if "error" in first:
            skipped.append(_skip(backend, precision, first["error"]))
            w.close()
            continue
        workers[(backend, precision)] = w
        info[(backend, precision)] = first["ready"]
    if not workers:
        raise ConfigError(
            "bench latency: no backend could run here: "
            + "; ".join(f"{s['backend']} {s['precision']}: {s['reason']}" for s in skipped)
        )
    flops = _flops(cfg, info, shape)
    times: dict[tuple[str, str, int], list[float]] = {}
    device: dict[tuple[str, str, int], list[float]] = {}
    share = cfg.budget.split(cfg.rounds)
    try:
        for batch in cfg.batch_sizes:
            for r in range(cfg.rounds):
                for key, w in list(workers.items()):
                    log.info("latency %s %s batch %d round %d", *key, batch, r + 1)
                    res = w.request(batch, share, warm=r == 0)
                    if "error" in res:
                        skipped.append(_skip(*key, res["error"]))
                        w.close()
                        del workers[key]
                        continue
                    times.setdefault((*key, batch), []).extend(res["times"])
                    if res.get("device_times"):
                        device.setdefault((*key, batch), []).extend(res["device_times"])
    finally:
        for w in workers.values():
            w.close()
    settings = _summaries(cfg, info, times, device, flops, peak)
    return {
        "settings": settings,
        "skipped": skipped,
        "peak": peak,
        "model": {"input_shape": list(shape), "flops_per_image": flops},
    }


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


def _skip(backend: str, precision: str, reason: str) -> dict[str, str]:
    log.warning("skipped %s %s: %s", backend, precision, reason)
    return {"backend": backend, "precision": precision, "reason": reason}


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
    info: dict[tuple[str, str], dict[str, Any]],
    times: dict[tuple[str, str, int], list[float]],
    device: dict[tuple[str, str, int], list[float]],
    flops: float | None,
    peak: dict[str, Any],
) -> list[dict[str, Any]]:
    settings = []
    for key, meta in info.items():
        rows = []
        for batch in cfg.batch_sizes:
            k = (key[0], key[1], batch)
            if k not in times:
                continue
            row: dict[str, Any] = {"batch": batch, **latency_summary(times[k], batch)}
            if k in device:
                dev = latency_summary(device[k], batch)
                row["device"] = {k: v for k, v in dev.items() if k != "runs"}
            ref = times.get((*REFERENCE, batch))
            if ref is not None:
                ref_median = latency_summary(ref, batch)["median_ms"]
                row["speedup_vs_torch_fp32"] = ref_median / row["median_ms"]
            if flops:
                achieved = flops * row["throughput_ips"]
                row["achieved_flops_per_s"] = achieved
                peak_key = "int8" if key[1].startswith("int8") else "fp32"
                rate = peak.get(peak_key, {}).get("ops_per_s")
                if rate:
                    row["percent_of_peak"] = 100.0 * achieved / rate
                    row["peak_used"] = peak_key
            rows.append(row)
        settings.append({"backend": key[0], "precision": key[1], **meta, "batches": rows})
    return settings


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    else:
        sys.exit("usage: python -m mtl_edge.bench.latency --worker SPEC_JSON")
