"""`mtl-edge demo`: the pipeline on built-in synthetic data plus a device stage, in CPU minutes.

    pretrain -> meta (SS + hard tasks) -> metatest (5-way 1/5-shot, every head)
    -> export (ONNX bundle with INT8) -> device (enroll 5 held-out classes from files,
    classify the rest, on onnxruntime, FP32 and INT8)
    -> builtin (the installed mini-cpu bundle enrolls 5 miniImageNet test classes x 5 photos
    from the data root when present, else the synthetic test classes, and classifies other
    photos of them: what a user gets before training anything)

The first four are the pipeline's stages (`mtl_edge.workflows.pipeline`) on the `demo` recipe,
run by the one stage runner; the device stage goes through the application API
(`mtl_edge.enroller.Enroller`) as a user would. The demo folder is made afresh on every run.
`--quick` shrinks every setting (for tests); the numbers it prints then only show that the
stages run, not what the method reaches.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mtl_edge.bundles import builtin_bundle
from mtl_edge.data.folders import read_class_folders
from mtl_edge.data.registry import data_root
from mtl_edge.data.split import ImageSplit
from mtl_edge.data.synthetic import write_class_folders
from mtl_edge.enroller import Enroller
from mtl_edge.train.config import load_recipe, recipe_source
from mtl_edge.train.torchdata import open_recipe_split
from mtl_edge.workflows.pipeline import stage_export, stage_meta, stage_metatest, stage_pretrain
from mtl_edge.workflows.stages import (
    STAGES_FILE,
    StageContext,
    StageFn,
    StageResult,
    finished,
    run_stages,
)

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
    "export.calib_images=64",
    "export.parity_episodes=10",
    "export.quant_episodes=20",
    "export.eval_per_class=10",
]


#: Photos per class enrolled, and classified afterwards, by the device stages.
SHOTS = 5
QUERIES = 20


def _class_folders(split: ImageSplit, root: Path) -> Path:
    """`split` as `<root>/<class>/<file>`: the original files copied when it has paths (real
    photos stay byte for byte what they were), PNGs of the pixels otherwise."""
    if split.paths is None:
        return write_class_folders(split, root, True)
    shutil.rmtree(root, ignore_errors=True)
    for c, indices in enumerate(split.indices_by_class()):
        folder = root / split.class_names[c]
        folder.mkdir(parents=True)
        for i in indices:
            shutil.copy2(split.paths[i], folder / split.paths[i].name)
    return root


def _enroll_and_classify(
    bundle: Path, split: ImageSplit, workdir: Path, queries: int | None = None
) -> dict[str, Any]:
    """Put SHOTS enrollment photos and up to `queries` (None: all the rest) other photos per
    class of `split` in class folders, enroll them with `bundle` on onnxruntime, FP32 and
    INT8, and classify the others (no rejection). Returns {"classes", "shots", precision:
    {accuracy, images}}."""
    by_class = split.indices_by_class()
    rest = [c[SHOTS:] if queries is None else c[SHOTS : SHOTS + queries] for c in by_class]
    enroll = _class_folders(
        split.take([i for c in by_class for i in c[:SHOTS]], "enroll"), workdir / "enroll"
    )
    query = _class_folders(split.take([i for c in rest for i in c], "query"), workdir / "query")
    files = [(d.name, f) for d in sorted(query.iterdir()) for f in sorted(d.iterdir())]
    out: dict[str, Any] = {"classes": len(by_class), "shots": SHOTS}
    for precision in ("fp32", "int8-cpu"):
        gallery = workdir / f"{precision}.gallery"
        enroller = Enroller(bundle, gallery, backend="onnxruntime-cpu", precision=precision)
        enroller.enroll_folder(enroll)
        preds = enroller.predict([f for _, f in files], threshold=0.0)
        hits = sum(p.label == name for (name, _), p in zip(files, preds, strict=True))
        out[precision] = {"accuracy": 100.0 * hits / len(files), "images": len(files)}
    return out


def stage_device(ctx: StageContext) -> StageResult:
    """Enroll 5 held-out classes from image files on onnxruntime and classify the rest."""
    test = open_recipe_split(ctx.recipe.data, ctx.recipe.data.test_split, "RGB")
    out = _enroll_and_classify(
        ctx.path("export", "bundle"), test.subset(list(range(5)), name="device"), ctx.dir
    )
    return StageResult(out, 2 * out["fp32"]["images"] + 2 * SHOTS * out["classes"])


def stage_builtin(ctx: StageContext) -> StageResult:
    """The built-in bundle on real photos: 5 miniImageNet test classes x SHOTS photos enrolled
    (the first classes and photos in name order), QUERIES other photos each classified; the
    demo's synthetic test classes stand in where the data root has no miniImageNet."""
    bundle = builtin_bundle()
    if bundle is None:
        return StageResult({"skipped": "this installation has no built-in bundle"}, 0)
    root = data_root() / "miniimagenet" / "test"
    if root.is_dir():
        photos = read_class_folders(root, None, color_mode="RGB")
        source = f"miniImageNet test photos ({root})"
    else:
        photos = open_recipe_split(ctx.recipe.data, ctx.recipe.data.test_split, "RGB")
        source = "synthetic test classes (no miniImageNet under the data root)"
    split = photos.subset(list(range(5)), name="builtin")
    out = {"source": source, **_enroll_and_classify(bundle, split, ctx.dir, QUERIES)}
    return StageResult(out, 2 * out["fp32"]["images"] + 2 * SHOTS * out["classes"])


#: The demo's stages, in run order.
STAGE_FNS: dict[str, StageFn] = {
    "pretrain": stage_pretrain,
    "meta": stage_meta,
    "metatest": stage_metatest,
    "export": stage_export,
    "device": stage_device,
    "builtin": stage_builtin,
}


def run_demo(
    out: str | Path, quick: bool = False, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run the demo into `out` (replacing an earlier demo there).

    Returns:
        {"hard_tasks": HT statistics of meta-training, "metatest": the meta-test result,
        "device": {...}, "seconds": {stage: wall}}.
    """
    out = Path(out)
    if (out / STAGES_FILE).is_file():
        shutil.rmtree(out)
    sets = (QUICK_OVERRIDES if quick else []) + list(overrides or [])
    recipe = load_recipe("demo", sets)
    record = run_stages(recipe, recipe_source("demo", sets), out, list(STAGE_FNS), STAGE_FNS)
    outputs = {s: m["outputs"] for s, m in finished(out, list(STAGE_FNS)).items()}
    return {
        "hard_tasks": outputs["meta"].get("hard_tasks"),
        "metatest": outputs["metatest"]["results"]["with_ht"],
        "device": outputs["device"],
        "builtin": outputs["builtin"],
        "seconds": {s: round(e["wall_s"], 1) for s, e in record["stages"].items()},
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The demo's result as text lines."""
    m = result["metatest"]
    lines = [f"meta-test on {m['split']} ({m['episodes']} episodes, {m['ways']}-way):"]
    for shots, table in m["results"].items():
        for head, r in table.items():
            lines.append(f"  {shots}-shot {head:<9} {r['mean']:6.2f} +- {r['ci95']:.2f} %")
    d = result["device"]
    for precision in ("fp32", "int8-cpu"):
        lines.append(
            f"device ({precision}, onnxruntime): {d['classes']} classes enrolled from "
            f"{d['shots']} files each, {d[precision]['accuracy']:.1f} % on "
            f"{d[precision]['images']} other images"
        )
    b = result["builtin"]
    if "skipped" in b:
        lines.append(f"built-in bundle: skipped ({b['skipped']})")
    for precision in () if "skipped" in b else ("fp32", "int8-cpu"):
        lines.append(
            f"built-in bundle ({precision}): {b['classes']} classes enrolled from {b['shots']} "
            f"{b['source']} each, {b[precision]['accuracy']:.1f} % on "
            f"{b[precision]['images']} other photos"
        )
    secs = result.get("seconds", {})
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in secs.items()))
    return lines
