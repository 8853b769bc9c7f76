"""The whole training-to-device pipeline as resumable stages (`mtl-edge train pipeline`).

    pretrain -> meta (SS + HT) -> metatest -> export -> bench

Each stage is a thin call into its layer: pre-training and meta-transfer (`mtl_edge.train`),
meta-test with every head on fixed seeded episodes (`mtl_edge.train.metatest`), the verified
bundle with INT8 variants (`mtl_edge.export.api`), and onnxruntime FP32 vs INT8 on the same
episodes (`mtl_edge.bench.accuracy`). The runner (`mtl_edge.workflows.stages`) records timings
and writes RUN/report/. One recipe drives every stage (`mtl_edge.train.config.Recipe`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mtl_edge.atomicio import atomic_write_json
from mtl_edge.bench.accuracy import AccuracyConfig, run_accuracy
from mtl_edge.bundle import Bundle
from mtl_edge.data.decode import default_cache_dir
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError
from mtl_edge.export.api import export_checkpoint
from mtl_edge.jsonfile import json_safe
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.checkpoint import load_checkpoint, read_checkpoint
from mtl_edge.train.config import Recipe
from mtl_edge.train.flops import stage_flops
from mtl_edge.train.gpu_data import DeviceDataset, default_device
from mtl_edge.train.meta_train import meta_train
from mtl_edge.train.metatest import extract_features, meta_test
from mtl_edge.train.pretrain import pretrain
from mtl_edge.train.torchdata import open_recipe_split
from mtl_edge.workflows.stages import StageContext, StageFn, StageResult, parse_stages, run_stages


def _metrics_files(ctx: StageContext) -> list[str]:
    return sorted(ctx.rel(p) for p in ctx.dir.rglob("*.jsonl"))


def _training_result(ctx: StageContext, result: Mapping[str, Any]) -> StageResult:
    """Outputs of a training call: {"checkpoint", "images", optional "checkpoints" and
    "snapshots" by name, "best_val", "hard_tasks", "flops" (by part)}; the training FLOPs count
    only the work done (`mtl_edge.train.flops.stage_flops`: no backward of first-order support
    images, no input gradient of the first conv)."""
    outputs: dict[str, Any] = {"checkpoint": ctx.rel(result["checkpoint"])}
    outputs |= {k: result[k] for k in ("best_val", "hard_tasks") if result.get(k) is not None}
    for key in ("checkpoints", "snapshots"):
        for label, path in dict(result.get(key, {})).items():
            outputs.setdefault(key, {})[label] = ctx.rel(path)
    images = int(result.get("images", 0))
    flops = None
    if images:
        ckpt = read_checkpoint(result["checkpoint"])
        shape = Preprocess.from_dict(dict(ckpt["preprocess"])).input_shape
        args = {k: v for k, v in dict(ckpt["model_args"]).items() if k != "ss_shortcut"}
        counted = stage_flops(
            ctx.name, str(ckpt["model"]), args, ctx.recipe, shape, dict(result.get("work", {}))
        )
        outputs["flops"] = counted
        flops = counted["total"]
    return StageResult(outputs, images, flops, _metrics_files(ctx))


def stage_pretrain(ctx: StageContext) -> StageResult:
    """Phase 1: the backbone as a classifier over the base classes."""
    result = pretrain(ctx.recipe, ctx.dir, resume=ctx.resume, source=ctx.source)
    return _training_result(ctx, result)


def stage_meta(ctx: StageContext) -> StageResult:
    """Phase 2: SS meta-transfer (with the HT meta-batch as the recipe says)."""
    init = ctx.path("pretrain", "checkpoint")
    result = meta_train(ctx.recipe, ctx.dir, init=init, resume=ctx.resume, source=ctx.source)
    return _training_result(ctx, result)


def meta_models(ctx: StageContext) -> dict[str, Path]:
    """The meta stage's checkpoints by label: "with_ht" or "without_ht" first, then the
    second model when the meta stage trained both and the recipe asks for it."""
    main = "with_ht" if ctx.recipe.meta.hard_tasks else "without_ht"
    models = {main: ctx.path("meta", "checkpoint")}
    if ctx.recipe.pipeline.with_and_without_ht:
        for label, path in ctx.previous["meta"]["outputs"].get("checkpoints", {}).items():
            models[label] = ctx.run / path
    return models


def stage_metatest(ctx: StageContext) -> StageResult:
    """Fixed seeded test episodes, every head of [eval], with and without HT.

    Features of the test split are extracted once per model on the training device and every
    feature head runs on the same episodes; the fine-tune-everything head on the first
    `eval.ft_episodes` of them."""
    dev = default_device()
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    images = 0
    for label, checkpoint in meta_models(ctx).items():
        loaded = load_checkpoint(checkpoint)
        loaded.backbone.to(dev)
        split = open_recipe_split(
            ctx.recipe.data, ctx.recipe.data.test_split, loaded.preprocess.color_mode
        )
        data = DeviceDataset.from_split(
            split, loaded.preprocess, dev, cache_dir=default_cache_dir()
        )
        feats = extract_features(loaded.backbone, data.eval_batch, len(split), 256, dev, split.name)
        images += len(split)
        result = meta_test(loaded, split, ctx.recipe.eval, dev, feats, data.eval_batch)
        atomic_write_json(ctx.dir / f"{label}.json", result)
        results[label] = result
        for shots, table in result["results"].items():
            for head, acc in table.items():
                rows.append(
                    {"model": label, "head": head, "precision": "torch-fp32", "shots": int(shots)}
                    | {"mean": acc["mean"], "ci95": acc["ci95"], "episodes": acc["episodes"]}
                )
    return StageResult({"accuracy": rows, "results": results}, images)


def stage_export(ctx: StageContext) -> StageResult:
    """The meta-trained model (SS and BN folded) as a verified bundle with INT8 variants."""
    e = ctx.recipe.export
    bundle_dir = ctx.dir / "bundle"
    bundle, report = export_checkpoint(
        ctx.path("meta", "checkpoint"),
        bundle_dir,
        int8=e.int8,
        fp16=e.fp16,
        force=True,
        seed=ctx.recipe.eval.seed,
        calib_images=e.calib_images,
        parity_episodes=e.parity_episodes,
        quant_episodes=e.quant_episodes,
        eval_per_class=e.eval_per_class,
    )
    atomic_write_json(ctx.dir / "export_report.json", json_safe(report))
    return StageResult({"bundle": ctx.rel(bundle_dir), "model_id": bundle.model_id})


def split_as_folders(split: ImageSplit, dest: Path) -> Path:
    """Write a split as class folders `dest/<split>/<class>/<index>.<ext>` for readers that take
    folders only (`bench accuracy`): image files as they are (hard links when possible), shard
    blobs as their original bytes, in-memory arrays as lossless PNG. Returns `dest`.

    Raises:
        ConfigError: a split with rotated samples (their rotation would be lost).
    """
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
    r, s = ctx.recipe, ctx.recipe.eval
    bundle_dir = ctx.path("export", "bundle")
    preprocess = Bundle.load(bundle_dir).preprocess
    split = open_recipe_split(r.data, r.data.test_split, preprocess.color_mode)
    data = ctx.dir / "data"
    shutil.rmtree(data, ignore_errors=True)
    split_as_folders(split, data)
    cfg = AccuracyConfig(
        bundle=bundle_dir,
        data=data,
        split=split.name.rstrip("/").split("/")[-1] or "test",
        ways=(s.ways,),
        shots=tuple(s.shots),
        queries=s.queries,
        episodes=r.pipeline.bench_episodes or s.episodes,
        seed=s.seed,
        precisions=tuple(r.pipeline.bench_precisions),
        cache=default_cache_dir(),
    )
    result = run_accuracy(cfg)
    shutil.rmtree(data, ignore_errors=True)
    atomic_write_json(ctx.dir / "bench.json", json_safe(result))
    rows = []
    for row in result["rows"]:
        base = {"model": "bundle", "head": f"{result['head']} ({row['backend']})"}
        rows.append(
            base
            | {"precision": row["precision"], "shots": row["shots"]}
            | {"mean": row["accuracy"], "ci95": row["ci95"], "episodes": result["episodes"]}
        )
        if "diff_vs_reference" in row:
            rows.append(
                base
                | {"precision": f"{row['precision']} - {result['reference'][1]}"}
                | {"shots": row["shots"], "mean": row["diff_vs_reference"]}
                | {"ci95": row["diff_ci95"], "episodes": result["episodes"], "kind": "paired"}
            )
    images = int(result.get("images", 0)) * len(r.pipeline.bench_precisions)
    return StageResult({"accuracy": rows}, images)


#: The pipeline's stages, in run order.
STAGE_FNS: dict[str, StageFn] = {
    "pretrain": stage_pretrain,
    "meta": stage_meta,
    "metatest": stage_metatest,
    "export": stage_export,
    "bench": stage_bench,
}
STAGES = tuple(STAGE_FNS)


def run_pipeline(
    recipe: Recipe,
    source: str,
    out: str | Path,
    stages: Sequence[str] | str | None = None,
    resume: bool = False,
    stage_fns: Mapping[str, StageFn] | None = None,
) -> dict[str, Any]:
    """Run pipeline stages in order in the run folder `out` (see `mtl_edge.workflows.stages`).

    Args:
        stages: the stages to run (names or "a,b"); None runs all five.
        stage_fns: stage functions by name (default `STAGE_FNS`; tests replace some).

    Returns:
        the stages record (the content of RUN/stages.json).
    """
    fns = dict(STAGE_FNS if stage_fns is None else stage_fns)
    names = parse_stages(stages, list(fns))
    return run_stages(recipe, source, out, names, fns, resume, recipe.pipeline.flops_reference)
