"""The whole training-to-device pipeline as resumable stages (issue 9).

    pretrain -> meta (SS + HT) -> metatest -> export -> bench

`run_pipeline(recipe, out, stages, resume)` runs the asked stages in that order inside the run
folder RUN:

- every stage works in RUN/<stage>/ and, once finished, writes RUN/<stage>/done.json (its outputs:
  checkpoint and bundle paths, accuracies). With `resume`, a stage whose marker exists is skipped
  and its outputs are read back; an unfinished stage is called again with `resume=True` and
  continues from its own last checkpoint. A failing stage leaves the earlier stages' folders and
  markers untouched, so a lost machine costs one stage, not the run;
- RUN/stages.json (written atomically after every stage) records per stage: status, wall time,
  images processed, images/s, peak memory (`torch.cuda.max_memory_allocated` on a GPU, the
  process's peak RSS on the CPU), the training FLOPs and the achieved FLOP/s against a matrix
  rate measured on the same machine in the same run (bf16 on a GPU, fp32 on the CPU);
- RUN/report/ holds the final accuracy table (accuracy.json, accuracy.md) and the learning
  curves (curves.png) drawn from the stages' metrics JSON lines.

The recipe is one TOML file. Its `[pipeline]` table (see `PipelineSettings`) belongs to this
module; every other table is the training stack's recipe (`mtl_edge.train.config`), passed on
to pre-training and meta-training unchanged. The stage functions call the training, export and
benchmark modules through their public functions; one that is missing makes its stage fail with
a one-line message naming it, never a stand-in result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib import import_module
from pathlib import Path
from typing import Any

from mtl_edge.atomicio import atomic_write, atomic_write_bytes, atomic_write_json
from mtl_edge.errors import ConfigError, MtlEdgeError, UnavailableError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

#: The stages, in the order they run.
STAGES: tuple[str, ...] = ("pretrain", "meta", "metatest", "export", "bench")

DONE = "done.json"
STAGES_FILE = "stages.json"


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineSettings:
    """The `[pipeline]` table of a recipe.

    Attributes:
        seed: seed of the test episodes (the same episodes for every head and precision).
        ways, shots, queries: the test tasks (5-way, 1- and 5-shot, 15 queries per class).
        episodes: number of fixed test episodes.
        heads: meta-test heads (`mtl_edge.train.metatest.HEAD_NAMES`: "mtl", "centroid",
            "logreg", "finetune" (alias "ft") = fine-tune everything).
        ft_episodes: the first this many episodes for "finetune" (each is a full fine-tuning
            run of the backbone).
        test_split: the split the meta-test and benchmark draw episodes from.
        with_and_without_ht: also meta-test the meta-model trained without HT when the meta
            stage trained both.
        int8: export the INT8 variants (int8 for TensorRT, int8-cpu for onnxruntime).
        bench_precisions: the bundle variants `bench accuracy` compares (fp32 first).
        bench_episodes: episodes for the benchmark (defaults to `episodes`).
        flops_reference: measure a dense matrix rate for the FLOP/s report.
    """

    seed: int = 0
    ways: int = 5
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    episodes: int = 2000
    heads: tuple[str, ...] = ("mtl", "centroid", "logreg", "finetune")
    ft_episodes: int = 200
    test_split: str = "test"
    with_and_without_ht: bool = True
    int8: bool = True
    bench_precisions: tuple[str, ...] = ("fp32", "int8-cpu")
    bench_episodes: int | None = None
    flops_reference: bool = True

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str) -> PipelineSettings:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: [pipeline] has unknown key(s) {unknown}; known: {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for key, value in table.items():
            default = getattr(cls, key)
            values[key] = tuple(value) if isinstance(default, tuple) else value
        settings = cls(**values)
        if settings.episodes < 1 or settings.queries < 1 or settings.ways < 2:
            raise ConfigError(
                f"{source}: [pipeline] needs episodes >= 1, queries >= 1 and ways >= 2"
            )
        return settings


@dataclass(frozen=True)
class Recipe:
    """A pipeline recipe: the file, its parsed tables with overrides applied, the overrides."""

    path: Path
    doc: dict[str, Any]
    overrides: tuple[str, ...]
    settings: PipelineSettings

    @property
    def training(self) -> dict[str, Any]:
        """The recipe without the `[pipeline]` table: the training stack's part."""
        return {k: v for k, v in self.doc.items() if k != "pipeline"}


def parse_value(text: str) -> Any:
    """A `--set` value as a TOML literal (numbers, booleans, arrays, quoted strings), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `doc` with `key.sub=value` overrides applied (values parsed as TOML literals).

    Raises:
        ConfigError: an override without "=".
    """
    out = json.loads(json.dumps(doc))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set pretrain.epochs=2")
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a table in the recipe")
        node[leaf] = parse_value(value.strip())
    return out


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a pipeline recipe and apply `--set` overrides.

    Raises:
        ConfigError: missing or malformed file, bad `[pipeline]` table.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe; pass --recipe recipes/<name>.toml")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the file") from None
    doc = apply_overrides(doc, overrides)
    table = doc.get("pipeline", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'pipeline' must be a table ([pipeline])")
    settings = PipelineSettings.from_table(table, str(path))
    return Recipe(path, doc, tuple(overrides), settings)


# ---------------------------------------------------------------------------------------------
# Stage context and results
# ---------------------------------------------------------------------------------------------


@dataclass
class StageContext:
    """What a stage function gets.

    Attributes:
        name: the stage's name.
        recipe: the resolved recipe.
        run: the run folder RUN.
        dir: the stage's own folder RUN/<name>/ (created).
        resume: continue from the stage's last checkpoint in `dir` when there is one.
        previous: the outputs (done.json) of the stages that finished before, by name.
    """

    name: str
    recipe: Recipe
    run: Path
    dir: Path
    resume: bool
    previous: dict[str, dict[str, Any]]

    def output(self, stage: str, key: str) -> Any:
        """Output `key` of an earlier stage; a one-line error when that stage did not run."""
        done = self.previous.get(stage)
        if done is None or key not in done.get("outputs", {}):
            raise MtlEdgeError(
                f"stage {self.name!r} needs {key!r} from stage {stage!r}, which has not finished "
                f"in {self.run}; run it first (--stages {stage},{self.name})"
            )
        return done["outputs"][key]


@dataclass
class StageResult:
    """What a stage function returns.

    Attributes:
        outputs: JSON-able results later stages and the report read (paths relative to RUN).
        images: images processed (forward passes over one image), for images/s.
        train_flops: FLOPs of the training done (forward + backward), or None.
        metrics_files: JSON-lines files of learning curves, relative to RUN.
    """

    outputs: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    train_flops: float | None = None
    metrics_files: list[str] = field(default_factory=list)


StageFn = Callable[[StageContext], StageResult]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _cuda() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def _reset_peak() -> None:
    if _cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): GPU allocator peak, else this process's peak RSS."""
    if _cuda():
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes. The RSS peak is the process's so far, not the stage's.
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def matmul_rate(device: str | None = None, seconds: float = 1.0) -> dict[str, Any]:
    """Measure a dense matrix-product rate on this machine.

    bf16 8192^3 products on a GPU, fp32 1024^3 on the CPU; the mean of the products run in
    about `seconds` after a warm-up.

    Returns:
        {"device", "dtype", "n", "flops_per_s"}.
    """
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    dtype, n = (torch.bfloat16, 8192) if gpu else (torch.float32, 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(dev)

    for _ in range(3):
        a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 5 == 0 or not gpu:
            sync()
            if time.perf_counter() - start >= seconds:
                break
    sync()
    elapsed = time.perf_counter() - start
    return {
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "flops_per_s": 2 * n**3 * reps / elapsed,
    }


def forward_flops(checkpoint: str | Path) -> float:
    """FLOPs of one forward pass of a checkpoint's backbone over one image at its input size.

    Counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mtl_edge.export.api import default_model_factory, read_checkpoint
    from mtl_edge.preprocess import Preprocess

    ckpt = read_checkpoint(checkpoint)
    model = default_model_factory(ckpt["model"], ckpt.get("model_args", {}), ckpt["state_dict"])
    shape = Preprocess.from_dict(ckpt["preprocess"]).input_shape
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(2, *shape))
    return counter.get_total_flops() / 2


def _train_rate(
    model: Any, batch: Callable[[Any], tuple[Any, Any]], data: Any, steps: int, bs: int, seed: int
) -> float:
    """Images/s of `steps` SGD steps on `batch(indices)` (after 3 warm-up steps)."""
    import torch

    from mtl_edge.train.gpu_data import make_generator

    dev = data.device
    gpu = dev.type == "cuda"
    head = torch.nn.Linear(model(batch(torch.arange(2, device=dev))[0]).shape[1], 64).to(dev)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    gen = make_generator(seed, dev)
    order = torch.randint(0, len(data), (steps + 3, bs), generator=gen, device=dev)

    def step(idx: Any) -> None:
        x, y = batch(idx)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
            loss = torch.nn.functional.cross_entropy(head(model(x)), y % 64)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):
        step(order[i])
    if gpu:
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for i in range(3, steps + 3):
        step(order[i])
    if gpu:
        torch.cuda.synchronize(dev)
    return steps * bs / (time.perf_counter() - start)


def compare_input_throughput(
    model_factory: Callable[[], Any],
    data: Any,
    steps: int = 30,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """Training images/s through the device-resident loader against synthetic input.

    The loader run makes every batch from `data` (index the uint8 tensor, random resized crop,
    flip, colour jitter, normalise); the synthetic run feeds one fixed random batch already in
    the network's dtype and memory format, i.e. no loading at all. Both train a fresh model from
    `model_factory` for the same steps on the same device (bf16 autocast on a GPU), so the ratio
    is what the data path costs (issue 9 asks for at least 0.9).

    Args:
        model_factory: builds the backbone (features of shape (B, D)); moved to the device.
        data: a `DeviceDataset` of the real split.

    Returns:
        {"loader_images_per_s", "synthetic_images_per_s", "ratio" (loader / synthetic),
        "steps", "batch_size", "device"}.
    """
    import torch

    from mtl_edge.train.gpu_data import make_generator

    gen = make_generator(seed, data.device)
    fixed = data.augment_batch(torch.arange(batch_size, device=data.device) % len(data), gen)
    fixed_labels = data.labels[torch.arange(batch_size, device=data.device) % len(data)]

    def loader(idx: Any) -> tuple[Any, Any]:
        return data.augment_batch(idx, gen), data.labels[idx]

    def synthetic(idx: Any) -> tuple[Any, Any]:
        return fixed[: len(idx)], fixed_labels[: len(idx)]

    rates = {}
    for label, batch in (("synthetic", synthetic), ("loader", loader)):
        torch.manual_seed(seed)
        model = model_factory().to(data.device)
        if data.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        rates[label] = _train_rate(model, batch, data, steps, batch_size, seed)
    return {
        "loader_images_per_s": rates["loader"],
        "synthetic_images_per_s": rates["synthetic"],
        "ratio": rates["loader"] / rates["synthetic"],
        "steps": steps,
        "batch_size": batch_size,
        "device": str(data.device),
    }


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def parse_stages(text: str | Sequence[str] | None) -> list[str]:
    """Stage names from "pretrain,meta" (or a list), in pipeline order; None means all.

    Raises:
        ConfigError: an unknown stage name.
    """
    if text is None:
        return list(STAGES)
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    names = [s for s in names if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ConfigError(f"--stages {text!r}: use a comma list of {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MtlEdgeError(f"{path}: unreadable ({e}); delete it to run that stage again") from None


def read_stages(run: str | Path) -> dict[str, Any]:
    """RUN/stages.json, or an empty record when the run has none yet."""
    path = Path(run) / STAGES_FILE
    return _read_json(path) if path.is_file() else {"stages": {}}


def _done(run: Path) -> dict[str, dict[str, Any]]:
    return {s: _read_json(run / s / DONE) for s in STAGES if (run / s / DONE).is_file()}


def run_pipeline(
    recipe: Recipe | str | Path,
    out: str | Path,
    stages: Sequence[str] | str | None = None,
    resume: bool = False,
    stage_fns: Mapping[str, StageFn] | None = None,
) -> dict[str, Any]:
    """Run pipeline stages in order in the run folder `out`.

    Args:
        recipe: a `Recipe` or the path of a recipe TOML.
        out: the run folder RUN (created).
        stages: the stages to run (names or "a,b"); None runs all five.
        resume: skip finished stages and continue unfinished ones from their checkpoints.
            Without it, a run folder that already holds a finished stage is refused.
        stage_fns: stage functions by name (defaults to `STAGE_FNS`).

    Returns:
        the stages record (the content of RUN/stages.json).

    Raises:
        MtlEdgeError: the first failing stage's error, after recording it in stages.json.
    """
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    run = Path(out)
    names = parse_stages(stages)
    fns = dict(STAGE_FNS if stage_fns is None else stage_fns)
    done = _done(run)
    if done and not resume:
        raise MtlEdgeError(
            f"{run}: holds finished stages ({', '.join(done)}); pass --resume to continue it "
            "or --out a new folder"
        )
    run.mkdir(parents=True, exist_ok=True)
    record = read_stages(run)
    digest = hashlib.sha256(json.dumps(rec.doc, sort_keys=True).encode()).hexdigest()
    if done and record.get("recipe_sha256", digest) != digest:
        raise MtlEdgeError(
            f"{run}: was started with another recipe or --set values (see "
            f"{run / 'recipe.resolved.json'}); resume with the same ones or use a new --out"
        )
    record.update(
        recipe_sha256=digest,
        recipe=str(rec.path),
        overrides=list(rec.overrides),
        settings=_json_safe(asdict(rec.settings)),
    )
    atomic_write_bytes(run / "recipe.resolved.json", json.dumps(rec.doc, indent=2).encode())
    if rec.settings.flops_reference and "matmul" not in record:
        record["matmul"] = matmul_rate()
    atomic_write_json(run / STAGES_FILE, record)

    for name in names:
        if name in done:
            log.info("stage %s: finished before, skipped", name)
            continue
        stage_dir = run / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(name, rec, run, stage_dir, resume, dict(done))
        _reset_peak()
        start = time.perf_counter()
        entry: dict[str, Any] = {"status": "running", "started": time.time()}
        record["stages"][name] = entry
        atomic_write_json(run / STAGES_FILE, record)
        log.info("stage %s: running", name)
        try:
            result = fns[name](ctx) if name in fns else _missing_stage(name)
        except BaseException as e:
            # A KeyboardInterrupt is the GPU script's time limit (SIGINT): resumable, not broken.
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            entry.update(status=status, wall_s=time.perf_counter() - start, error=_line(e))
            atomic_write_json(run / STAGES_FILE, _json_safe(record))
            write_report(run)
            raise
        wall = time.perf_counter() - start
        peak, peak_kind = _peak_memory()
        entry.update(
            status="done",
            wall_s=wall,
            images=result.images,
            images_per_s=result.images / wall if wall > 0 and result.images else None,
            peak_memory_bytes=peak,
            peak_memory_kind=peak_kind,
            train_flops=result.train_flops,
        )
        if result.train_flops:
            entry["achieved_flops_per_s"] = result.train_flops / wall
            if "matmul" in record:
                entry["fraction_of_matmul_rate"] = (
                    entry["achieved_flops_per_s"] / record["matmul"]["flops_per_s"]
                )
        marker = {"stage": name, "outputs": result.outputs, "metrics_files": result.metrics_files}
        atomic_write_json(stage_dir / DONE, _json_safe(marker))
        done[name] = marker
        atomic_write_json(run / STAGES_FILE, _json_safe(record))
        log.info("stage %s: done in %.1f s", name, wall)
    write_report(run)
    return record


def _missing_stage(name: str) -> StageResult:
    raise UnavailableError(f"stage {name!r} has no implementation in this install")


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def accuracy_rows(done: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The accuracy table: one row per (model, head, precision, shots).

    Rows come from the metatest stage's output "accuracy" and the bench stage's output
    "accuracy"; each is a list of {"model", "head", "precision", "shots", "mean", "ci95",
    "episodes"} (mean and ci95 in %), and the bench's paired differences as
    {"kind": "paired", ...}.
    """
    rows: list[dict[str, Any]] = []
    for stage in ("metatest", "bench"):
        rows.extend(done.get(stage, {}).get("outputs", {}).get("accuracy", []))
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of `accuracy_rows` as a Markdown table (mean +- 95% interval, in %)."""
    lines = [
        "| model | head | precision | shots | accuracy (%) | episodes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['mean']:.2f} ± {r['ci95']:.2f}" if r.get("mean") is not None else "-"
        lines.append(
            f"| {r.get('model', '-')} | {r.get('head', '-')} | {r.get('precision', '-')} | "
            f"{r.get('shots', '-')} | {acc} | {r.get('episodes', '-')} |"
        )
    return "\n".join(lines) + "\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics JSON-lines file (a torn last line is ignored)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_curves(files: Mapping[str, Path], out: Path) -> bool:
    """Learning curves: every numeric series of each metrics file against its step.

    The x axis is the first of "step", "epoch", "iteration" present in a row, else the row
    number. Returns False (and writes nothing) when no file has a numeric series.
    """
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for label, path in files.items():
        for i, row in enumerate(read_metrics(path)):
            x = next((row[k] for k in ("step", "epoch", "iteration") if k in row), i)
            for key, value in row.items():
                if key in ("step", "epoch", "iteration") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    xs, ys = series.setdefault(label, {}).setdefault(key, ([], []))
                    xs.append(float(x))
                    ys.append(float(value))
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (label, curves) in zip(axes[0], series.items(), strict=True):
        for key, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, label=key)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def write_report(run: str | Path) -> Path:
    """RUN/report/: accuracy.json, accuracy.md, stages.md and curves.png (when curves exist)."""
    run = Path(run)
    report = run / "report"
    done = _done(run)
    rows = accuracy_rows(done)
    atomic_write_json(report / "accuracy.json", _json_safe(rows))
    atomic_write_bytes(report / "accuracy.md", markdown_table(rows).encode())
    record = read_stages(run)
    lines = [
        "| stage | status | wall (s) | images/s | peak memory (MiB) | achieved TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    stages = record.get("stages", {})
    for name in sorted(stages, key=lambda n: STAGES.index(n) if n in STAGES else len(STAGES)):
        e = stages[name]
        ips = e.get("images_per_s")
        mem = e.get("peak_memory_bytes")
        fl = e.get("achieved_flops_per_s")
        lines.append(
            f"| {name} | {e.get('status')} | {e.get('wall_s', 0):.1f} | "
            f"{f'{ips:.1f}' if ips else '-'} | {f'{mem / 2**20:.0f}' if mem else '-'} | "
            f"{f'{fl / 1e12:.3g}' if fl else '-'} |"
        )
    if "matmul" in record:
        m = record["matmul"]
        lines.append(
            f"\nmeasured {m['dtype']} {m['n']}^3 matrix rate on {m['device']}: "
            f"{m['flops_per_s'] / 1e12:.3f} TFLOP/s"
        )
    atomic_write_bytes(report / "stages.md", ("\n".join(lines) + "\n").encode())
    files = {
        f"{stage}: {Path(f).name}": run / f
        for stage, d in done.items()
        for f in d.get("metrics_files", [])
        if (run / f).is_file()
    }
    plot_curves(files, report / "curves.png")
    return report


# ---------------------------------------------------------------------------------------------
# Stage functions: thin calls into the training, export and benchmark modules
# ---------------------------------------------------------------------------------------------


def _api(stage: str, module: str, name: str) -> Any:
    """`mtl_edge.<module>.<name>`, or a one-line error naming what is missing."""
    try:
        mod = import_module(f"mtl_edge.{module}")
    except ModuleNotFoundError as e:
        raise UnavailableError(
            f"stage {stage!r} needs mtl_edge.{module} ({e.name} is not installed or not written "
            "yet); install mtl-edge[train] or run the stages that are available (--stages)"
        ) from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise UnavailableError(
            f"stage {stage!r} needs mtl_edge.{module}.{name}, which this version lacks"
        )
    return fn


def _rel(ctx: StageContext, path: str | Path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ctx.run.resolve()))
    except ValueError:
        return str(p)


def _metrics_files(ctx: StageContext) -> list[str]:
    return sorted(_rel(ctx, p) for p in ctx.dir.rglob("*.jsonl"))


def stage_pretrain(ctx: StageContext) -> StageResult:
    """Phase 1: the backbone as a classifier over the base classes."""
    pretrain = _api(ctx.name, "train.pretrain", "pretrain")
    result = pretrain(ctx.recipe.training, ctx.dir, resume=ctx.resume, source=_source(ctx))
    return _training_result(ctx, result)


def stage_meta(ctx: StageContext) -> StageResult:
    """Phase 2: SS meta-transfer (with the HT meta-batch as the recipe says)."""
    meta_train = _api(ctx.name, "train.meta_train", "meta_train")
    init = ctx.run / ctx.output("pretrain", "checkpoint")
    result = meta_train(
        ctx.recipe.training, ctx.dir, init=init, resume=ctx.resume, source=_source(ctx)
    )
    return _training_result(ctx, result)


def _source(ctx: StageContext) -> str:
    over = f" with --set {' '.join(ctx.recipe.overrides)}" if ctx.recipe.overrides else ""
    return f"{ctx.recipe.path}{over}"


def _training_result(ctx: StageContext, result: Mapping[str, Any]) -> StageResult:
    """Outputs of a training call: {"checkpoint", "images", optional "checkpoints" by name}."""
    checkpoint = Path(result["checkpoint"])
    images = int(result.get("images", 0))
    outputs: dict[str, Any] = {"checkpoint": _rel(ctx, checkpoint)}
    for label, path in dict(result.get("checkpoints", {})).items():
        outputs.setdefault("checkpoints", {})[label] = _rel(ctx, path)
    flops = 3 * forward_flops(checkpoint) * images if images else None
    return StageResult(outputs, images, flops, _metrics_files(ctx))


def _device() -> Any:
    from mtl_edge.train.gpu_data import default_device

    return default_device()


def decode_cache() -> Path | None:
    """Where decoded splits are cached between stage processes: $MTL_EDGE_CACHE/decoded (set
    by the GPU script; outside RUN, so results never carry it), else nowhere."""
    root = os.environ.get("MTL_EDGE_CACHE")
    return Path(root) / "decoded" if root else None


def recipe_split(ctx: StageContext, split: str, color_mode: str) -> Any:
    """Split `split` of the recipe's `[data]` table, read as the training stack reads it."""
    from_dict = _api(ctx.name, "train.config", "from_dict")
    train_config = _api(ctx.name, "train.config", "TrainConfig")
    open_recipe_split = _api(ctx.name, "train.torchdata", "open_recipe_split")
    cfg = from_dict(train_config, ctx.recipe.training, _source(ctx))
    return open_recipe_split(cfg.data, split, color_mode)


def load_model(ctx: StageContext, checkpoint: Path) -> tuple[Any, Any]:
    """(model, Preprocess) of a training checkpoint: a backbone, or the meta-transfer learner
    (with its meta-learned FC init) of a meta checkpoint."""
    load_checkpoint = _api(ctx.name, "train.checkpoint", "load_checkpoint")
    loaded = load_checkpoint(checkpoint)
    return loaded.model, loaded.preprocess


_FINETUNE = ("finetune", "ft")


def stage_metatest(ctx: StageContext) -> StageResult:
    """Fixed seeded test episodes, every head, 1- and 5-shot, with and without HT.

    Features of the test split are extracted once per model on the device (the backbone is
    frozen at meta-test) and every feature head runs on the same episodes; the fine-tune-
    everything head ("finetune") runs on the first `ft_episodes` of them.
    """
    meta_test = _api(ctx.name, "train.metatest", "meta_test")
    extract_features = _api(ctx.name, "train.metatest", "extract_features")
    from mtl_edge.train.gpu_data import DeviceDataset

    s = ctx.recipe.settings
    meta_table = ctx.recipe.training.get("meta", {})
    main = "with_ht" if meta_table.get("hard_tasks", True) else "without_ht"
    models = {main: ctx.run / ctx.output("meta", "checkpoint")}
    if s.with_and_without_ht:
        for label, path in ctx.previous["meta"]["outputs"].get("checkpoints", {}).items():
            models[label] = ctx.run / path
    dev = _device()
    rows: list[dict[str, Any]] = []
    images = 0
    for label, checkpoint in models.items():
        model, preprocess = load_model(ctx, checkpoint)
        model = model.to(dev).eval()
        split = recipe_split(ctx, s.test_split, preprocess.color_mode)
        data = DeviceDataset.from_split(split, preprocess, dev, cache_dir=decode_cache())
        feats = extract_features(model, split, 256, dev, load=data.eval_batch)
        images += len(split)
        finetune = [h for h in s.heads if h in _FINETUNE]
        runs = [([h for h in s.heads if h not in _FINETUNE], s.episodes)]
        if finetune:
            runs.append((finetune[:1], min(s.ft_episodes, s.episodes)))
        for heads, episodes in runs:
            if not heads:
                continue
            result = meta_test(
                model,
                split,
                preprocess,
                ways=s.ways,
                shots_list=list(s.shots),
                episodes=episodes,
                queries=s.queries,
                seed=s.seed,
                heads=heads,
                device=dev,
                features=feats,
            )
            atomic_write_json(ctx.dir / f"{label}-{'-'.join(heads)}.json", result)
            for shots, table in result["results"].items():
                for head, acc in table.items():
                    rows.append(
                        {
                            "model": label,
                            "head": head,
                            "precision": "torch-fp32",
                            "shots": int(shots),
                            "mean": acc["mean"],
                            "ci95": acc["ci95"],
                            "episodes": acc["episodes"],
                        }
                    )
    return StageResult({"accuracy": rows}, images)


def stage_export(ctx: StageContext) -> StageResult:
    """The meta-trained model (SS and BN folded) as a verified bundle with INT8 variants."""
    from mtl_edge.export.api import export_checkpoint

    bundle_dir = ctx.dir / "bundle"
    checkpoint = ctx.run / ctx.output("meta", "checkpoint")
    bundle, report = export_checkpoint(
        checkpoint,
        bundle_dir,
        int8=ctx.recipe.settings.int8,
        force=True,
        seed=ctx.recipe.settings.seed,
    )
    atomic_write_json(ctx.dir / "export_report.json", _json_safe(report))
    return StageResult({"bundle": _rel(ctx, bundle_dir), "model_id": bundle.model_id})


def split_as_folders(split: Any, dest: Path) -> Path:
    """Write a split as class folders `dest/<split>/<class>/<index>.<ext>` for readers that take
    folders only (`bench accuracy`): image files as they are (hard links when possible), shard
    blobs as their original bytes, in-memory arrays as lossless PNG. Returns `dest`.

    Raises:
        ConfigError: a split with rotated samples (their rotation would be lost).
    """
    import numpy as np
    from PIL import Image

    if split.rotations is not None and np.any(np.asarray(split.rotations) % 360):
        raise ConfigError(
            f"{split.name}: has rotated samples, which class folders cannot hold; benchmark a "
            "split without rotations"
        )
    part = split.name.rstrip("/").split("/")[-1] or "test"
    for i in range(len(split)):
        folder = dest / part / str(split.class_names[int(split.labels[i])]).replace("/", "__")
        folder.mkdir(parents=True, exist_ok=True)
        if split.paths is not None:
            src = Path(split.paths[i])
            target = folder / f"{i:06d}{src.suffix.lower()}"
            try:
                os.link(src, target)
            except OSError:
                target.write_bytes(src.read_bytes())
        elif split.blobs is not None:
            blob = bytes(split.blobs[i])
            ext = ".png" if blob[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
            (folder / f"{i:06d}{ext}").write_bytes(blob)
        else:
            Image.fromarray(np.asarray(split.arrays[i])).save(folder / f"{i:06d}.png")
    return dest


def stage_bench(ctx: StageContext) -> StageResult:
    """onnxruntime FP32 vs INT8 on the same seeded episodes, with the paired difference.

    `mtl-edge bench accuracy` reads class folders: other layouts (shards, synthetic) are
    written out as folders under RUN/bench/data first (the same image bytes)."""
    accuracy_config = _api(ctx.name, "bench.accuracy", "AccuracyConfig")
    run_accuracy = _api(ctx.name, "bench.accuracy", "run_accuracy")
    import shutil

    s = ctx.recipe.settings
    bundle_dir = ctx.run / ctx.output("export", "bundle")
    from mtl_edge.bundle import Bundle

    preprocess = Bundle.load(bundle_dir).preprocess
    split = recipe_split(ctx, s.test_split, preprocess.color_mode)
    data = ctx.dir / "data"
    shutil.rmtree(data, ignore_errors=True)
    split_as_folders(split, data)
    part = split.name.rstrip("/").split("/")[-1] or "test"
    cfg = accuracy_config(
        bundle=bundle_dir,
        data=data,
        split=part,
        ways=(s.ways,),
        shots=tuple(s.shots),
        queries=s.queries,
        episodes=s.bench_episodes or s.episodes,
        seed=s.seed,
        precisions=tuple(s.bench_precisions),
        cache=decode_cache(),
    )
    result = run_accuracy(cfg)
    shutil.rmtree(data, ignore_errors=True)
    atomic_write_json(ctx.dir / "bench.json", _json_safe(result))
    rows = []
    for r in result["rows"]:
        rows.append(
            {
                "model": "bundle",
                "head": f"{result['head']} ({r['backend']})",
                "precision": r["precision"],
                "shots": r["shots"],
                "mean": r["accuracy"],
                "ci95": r["ci95"],
                "episodes": result["episodes"],
            }
        )
        if "diff_vs_reference" in r:
            rows.append(
                {
                    "model": "bundle",
                    "head": f"{result['head']} ({r['backend']})",
                    "precision": f"{r['precision']} - {result['reference'][1]}",
                    "shots": r["shots"],
                    "mean": r["diff_vs_reference"],
                    "ci95": r["diff_ci95"],
                    "episodes": result["episodes"],
                    "kind": "paired",
                }
            )
    return StageResult({"accuracy": rows}, int(result.get("images", 0)) * len(s.bench_precisions))


#: The default stage functions.
STAGE_FNS: dict[str, StageFn] = {
    "pretrain": stage_pretrain,
    "meta": stage_meta,
    "metatest": stage_metatest,
    "export": stage_export,
    "bench": stage_bench,
}
