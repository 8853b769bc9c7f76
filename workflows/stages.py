"""The stage runner: named stages run in order inside one run folder, each resumable.

`run_stages(recipe, out, stages, fns, resume)` runs the asked stages in the order of `fns`:

- every stage works in RUN/<stage>/ and, once finished, writes RUN/<stage>/done.json (its
  outputs: checkpoint and bundle paths, accuracies). With `resume`, a stage whose marker exists
  is skipped and its outputs are read back; an unfinished stage is called again with
  `resume=True` and continues from its own last checkpoint. A failing stage leaves the earlier
  stages' folders and markers untouched, so a lost machine costs one stage, not the run;
- RUN/stages.json (written atomically after every stage) records per stage: status, wall time,
  images processed, images/s, peak memory, the training FLOPs and the achieved FLOP/s against
  a matrix rate measured on the same machine in the same run (`mtl_edge.bench.machine`);
- RUN/report/ is written at the end (`mtl_edge.bench.run_report`).

The pipeline and the demo are lists of stage functions run by this one runner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl_edge.atomicio import atomic_write_bytes, atomic_write_json
from mtl_edge.bench.machine import matmul_rate, peak_memory, reset_peak_memory
from mtl_edge.bench.run_report import write_report
from mtl_edge.errors import ConfigError, MtlEdgeError
from mtl_edge.jsonfile import json_safe
from mtl_edge.settings import config_to_dict
from mtl_edge.train.config import Recipe

log = logging.getLogger(__name__)

DONE = "done.json"
STAGES_FILE = "stages.json"


@dataclass
class StageContext:
    """What a stage function gets.

    Attributes:
        name: the stage's name.
        recipe: the resolved recipe; source: how to name it in records and messages.
        run: the run folder RUN.
        dir: the stage's own folder RUN/<name>/ (created).
        resume: continue from the stage's last checkpoint in `dir` when there is one.
        previous: the outputs (done.json) of the stages that finished before, by name.
    """

    name: str
    recipe: Recipe
    source: str
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

    def path(self, stage: str, key: str) -> Path:
        """An earlier stage's output path, made absolute."""
        return self.run / self.output(stage, key)

    def rel(self, path: str | Path) -> str:
        """`path` relative to RUN (as outputs store them)."""
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.run.resolve()))
        except ValueError:
            return str(p)


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


def parse_stages(text: str | Sequence[str] | None, order: Sequence[str]) -> list[str]:
    """Stage names from "pretrain,meta" (or a list), in run order; None means all.

    Raises:
        ConfigError: an unknown stage name.
    """
    if text is None:
        return list(order)
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    names = [s for s in names if s]
    unknown = [s for s in names if s not in order]
    if unknown or not names:
        raise ConfigError(f"--stages {text!r}: use a comma list of {', '.join(order)}")
    return [s for s in order if s in names]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MtlEdgeError(f"{path}: unreadable ({e}); delete it to run that stage again") from None


def read_stages(run: str | Path) -> dict[str, Any]:
    """RUN/stages.json, or an empty record when the run has none yet."""
    path = Path(run) / STAGES_FILE
    return _read_json(path) if path.is_file() else {"stages": {}}


def finished(run: Path, order: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The done.json markers of the finished stages, by name."""
    return {s: _read_json(run / s / DONE) for s in order if (run / s / DONE).is_file()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def run_stages(
    recipe: Recipe,
    source: str,
    out: str | Path,
    names: Sequence[str],
    fns: Mapping[str, StageFn],
    resume: bool = False,
    flops_reference: bool = True,
) -> dict[str, Any]:
    """Run stages `names` (a subset of `fns`, in the order of `fns`) in the run folder `out`.

    Args:
        recipe, source: the resolved recipe and its name (file and overrides).
        fns: every stage function of the workflow, in run order.
        resume: skip finished stages and continue unfinished ones from their checkpoints.
            Without it, a run folder that already holds a finished stage is refused.
        flops_reference: measure a dense matrix rate for the FLOP/s report.

    Returns:
        the stage record (the content of RUN/stages.json).

    Raises:
        MtlEdgeError: the first failing stage's error, after recording it in stages.json.
    """
    order = list(fns)
    run = Path(out)
    done = finished(run, order)
    if done and not resume:
        raise MtlEdgeError(
            f"{run}: holds finished stages ({', '.join(done)}); pass --resume to continue it "
            "or --out a new folder"
        )
    run.mkdir(parents=True, exist_ok=True)
    record = read_stages(run)
    doc = config_to_dict(recipe)
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    if done and record.get("recipe_sha256", digest) != digest:
        raise MtlEdgeError(
            f"{run}: was started with another recipe or --set values (see "
            f"{run / 'recipe.resolved.json'}); resume with the same ones or use a new --out"
        )
    record.update(recipe_sha256=digest, recipe=source)
    atomic_write_bytes(run / "recipe.resolved.json", json.dumps(doc, indent=2).encode())
    if flops_reference and "matmul" not in record:
        record["matmul"] = matmul_rate()
    atomic_write_json(run / STAGES_FILE, record)
    for name in (n for n in order if n in names):
        if name in done:
            log.info("stage %s: finished before, skipped", name)
            continue
        stage_dir = run / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(name, recipe, source, run, stage_dir, resume, dict(done))
        reset_peak_memory()
        start = time.perf_counter()
        entry: dict[str, Any] = {"status": "running", "started": time.time()}
        record["stages"][name] = entry
        atomic_write_json(run / STAGES_FILE, record)
        log.info("stage %s: running", name)
        try:
            result = fns[name](ctx)
        except BaseException as e:
            # A KeyboardInterrupt is the GPU script's time limit (SIGINT): resumable, not broken.
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            entry.update(status=status, wall_s=time.perf_counter() - start, error=_first_line(e))
            atomic_write_json(run / STAGES_FILE, json_safe(record))
            write_report(run, record, done, order)
            raise
        wall = time.perf_counter() - start
        peak, peak_kind = peak_memory()
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
        atomic_write_json(stage_dir / DONE, json_safe(marker))
        done[name] = marker
        atomic_write_json(run / STAGES_FILE, json_safe(record))
        log.info("stage %s: done in %.1f s", name, wall)
    write_report(run, record, done, order)
    return record
