"""`mtl-edge demo`: the whole method on built-in synthetic data, in a few CPU minutes.

The demo is a list of stage functions (`STAGES`) run in order on one `DemoContext`:

    pretrain -> meta (SS + hard tasks) -> metatest (5-way 1/5-shot, every head)
    -> export (ONNX bundle with INT8, when the export stack is installed)
    -> device (enroll 5 held-out classes from files, classify the rest, on onnxruntime)

Each stage returns a JSON-able dict stored under its name in `ctx.results`; later stages read
the earlier ones (e.g. the meta checkpoint). To add a stage, append `(name, function)`.
`--quick` shrinks every setting (for tests); the numbers it prints then only show that the
stages run, not what the method reaches.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)

QUICK_OVERRIDES = [
    "data.options={size = 16, per_class = 30, train_classes = 12, val_classes = 5, "
    "test_classes = 6}",
    "model.args={width = 16}",
    "model.preprocess={size = 16}",
    "pretrain.epochs=8",
    "pretrain.batch_size=32",
    "pretrain.lr=0.1",
    "pretrain.val_episodes=20",
    "pretrain.val_every=4",
    "pretrain.val_queries=5",
    "meta.iterations=6",
    "meta.epoch_length=3",
    "meta.queries=5",
    "meta.inner_steps=5",
    "meta.test_steps=20",
    "meta.val_episodes=10",
    "eval.episodes=40",
    "eval.heads=['mtl', 'centroid']",
]


@dataclass
class DemoContext:
    """What the stages share.

    Attributes:
        out: the demo folder (one sub-folder per stage).
        cfg: the training recipe (`mtl_edge.train.config.TrainConfig`).
        quick: tiny settings for tests.
        results: stage name -> the stage's result.
    """

    out: Path
    cfg: Any
    quick: bool = False
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


StageFn = Callable[[DemoContext], dict[str, Any]]


def stage_pretrain(ctx: DemoContext) -> dict[str, Any]:
    """Phase 1 on the synthetic train classes."""
    from mtl_edge.train.pretrain import pretrain

    r = pretrain(ctx.cfg, ctx.out / "pretrain", source="demo")
    return {"checkpoint": r["checkpoint"], "val_centroid_1shot": r["best_val"]}


def stage_meta(ctx: DemoContext) -> dict[str, Any]:
    """Phase 2: SS meta-transfer with the hard-task meta-batch."""
    from mtl_edge.train.meta_train import meta_train

    init = ctx.results["pretrain"]["checkpoint"]
    r = meta_train(ctx.cfg, ctx.out / "meta", init=init, source="demo")
    return {
        "checkpoint": r["checkpoint"],
        "val_mtl_1shot": r["best_val"],
        "hard_tasks": r["hard_tasks"],
    }


def stage_metatest(ctx: DemoContext) -> dict[str, Any]:
    """5-way 1- and 5-shot on the held-out test classes, every head, same episodes."""
    from mtl_edge.commands.train import evaluate_checkpoint

    e = ctx.cfg.eval
    r = evaluate_checkpoint(
        ctx.results["meta"]["checkpoint"],
        e.ways,
        list(e.shots),
        e.episodes,
        list(e.heads),
        e.queries,
        e.seed,
        split=ctx.cfg.data.test_split,
    )
    return r


def stage_export(ctx: DemoContext) -> dict[str, Any]:
    """The meta-trained model as a verified ONNX bundle with an INT8 variant."""
    from mtl_edge.export.api import export_checkpoint

    bundle, report = export_checkpoint(
        ctx.results["meta"]["checkpoint"],
        ctx.out / "bundle",
        int8=True,
        force=True,
        seed=0,
        calib_images=64 if ctx.quick else 200,
        parity_episodes=10 if ctx.quick else 100,
        quant_episodes=20 if ctx.quick else 200,
        eval_per_class=10 if ctx.quick else 20,
    )
    return {"bundle": str(ctx.out / "bundle"), "model_id": bundle.model_id}


def stage_device(ctx: DemoContext) -> dict[str, Any]:
    """Enroll 5 held-out classes from image files on onnxruntime and classify the rest."""
    from mtl_edge.data.synthetic import write_class_folders
    from mtl_edge.enroller import Enroller
    from mtl_edge.train.torchdata import open_recipe_split

    test = open_recipe_split(ctx.cfg.data, ctx.cfg.data.test_split, "RGB")
    split = test.subset(list(range(5)), name="device")
    shots = 5
    by_class = split.indices_by_class()
    root = ctx.out / "device"
    enroll = write_class_folders(
        split.take([i for c in by_class for i in c[:shots]], "enroll"), root / "enroll", True
    )
    query = write_class_folders(
        split.take([i for c in by_class for i in c[shots:]], "query"), root / "query", True
    )
    files = [(d.name, f) for d in sorted(query.iterdir()) for f in sorted(d.glob("*.png"))]
    out: dict[str, Any] = {"classes": len(by_class), "shots": shots}
    for precision in ("fp32", "int8-cpu"):
        gallery = root / f"gallery-{precision}.npz"
        gallery.unlink(missing_ok=True)
        enroller = Enroller(
            ctx.results["export"]["bundle"], gallery, backend="onnxruntime-cpu", precision=precision
        )
        enroller.enroll_folder(enroll)
        preds = enroller.predict([f for _, f in files], threshold=0.0)
        hits = sum(p.label == name for (name, _), p in zip(files, preds, strict=True))
        out[precision] = {"accuracy": 100.0 * hits / len(files), "images": len(files)}
    return out


def default_stages() -> list[tuple[str, StageFn]]:
    """The demo's stages; export and device only when their modules are installed."""
    stages: list[tuple[str, StageFn]] = [
        ("pretrain", stage_pretrain),
        ("meta", stage_meta),
        ("metatest", stage_metatest),
    ]
    if find_spec("mtl_edge.export.api") is not None and find_spec("onnxruntime") is not None:
        stages += [("export", stage_export), ("device", stage_device)]
    return stages


def run_demo(
    out: str | Path,
    quick: bool = False,
    stages: list[tuple[str, StageFn]] | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the stages into `out`; returns {stage: result} plus per-stage seconds."""
    from mtl_edge.train.config import TrainConfig, load_config

    sets = (QUICK_OVERRIDES if quick else []) + list(overrides or [])
    cfg = load_config(TrainConfig, "demo", sets)
    ctx = DemoContext(Path(out), cfg, quick)
    ctx.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    for name, fn in stages if stages is not None else default_stages():
        t0 = time.perf_counter()
        log.info("demo stage %s", name)
        ctx.results[name] = fn(ctx)
        seconds[name] = round(time.perf_counter() - t0, 1)
    return {**ctx.results, "seconds": seconds}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The demo's result as text lines."""
    lines = []
    if "metatest" in result:
        m = result["metatest"]
        lines.append(f"meta-test on {m['split']} ({m['episodes']} episodes, {m['ways']}-way):")
        for shots, table in m["results"].items():
            for head, r in table.items():
                lines.append(f"  {shots}-shot {head:<9} {r['mean']:6.2f} +- {r['ci95']:.2f} %")
    if "device" in result:
        d = result["device"]
        for precision in ("fp32", "int8-cpu"):
            if precision in d:
                lines.append(
                    f"device ({precision}, onnxruntime): {d['classes']} classes enrolled from "
                    f"{d['shots']} files each, {d[precision]['accuracy']:.1f} % on "
                    f"{d[precision]['images']} other images"
                )
    secs = result.get("seconds", {})
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in secs.items()))
    return lines


def register(app: typer.Typer, name: str) -> None:
    @app.command(name=name, help="Run the whole pipeline on built-in synthetic data.")
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="Demo folder (created)."),
        quick: bool = typer.Option(False, "--quick", help="Tiny settings (seconds, for tests)."),
        overrides: list[str] = typer.Option(
            [], "--set", help="Override a value of the demo recipe, e.g. pretrain.epochs=5."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    ) -> None:
        result = run_demo(out, quick, overrides=overrides)
        if as_json:
            typer.echo(json.dumps(result, indent=2, default=str))
        else:
            typer.echo("\n".join(summary_lines(result)))
