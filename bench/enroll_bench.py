"""`mtl-edge bench enroll`: time to enroll N classes x K shots from image files, split into
decode, preprocess, feature extraction and head fit, and the end-to-end latency of predicting
one image (decode + preprocess + extract + head)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.bench.timing import TimingBudget, measure
from mtl_edge.bundle import Bundle
from mtl_edge.errors import DatasetError
from mtl_edge.stats import latency_summary


@dataclass
class EnrollConfig:
    bundle: Path
    images: Path
    classes: int = 5
    shots: int = 5
    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    batch_size: int = 32
    budget: TimingBudget = TimingBudget(min_time_s=1.0, min_runs=20)


def pick_images(root: Path, classes: int, shots: int) -> list[tuple[str, list[Path]]]:
    """The first `classes` class folders of `root` (sorted) and their first `shots` images.

    Raises:
        DatasetError: too few class folders or images.
    """
    from mtl_edge.data.folders import read_class_folders

    if classes < 2 or shots < 1:
        raise DatasetError(f"--classes {classes} --shots {shots}: need classes >= 2, shots >= 1")
    split = read_class_folders(root)
    if split.num_classes < classes:
        raise DatasetError(
            f"{root}: has {split.num_classes} class folders, fewer than --classes {classes}; "
            "lower --classes or add class folders"
        )
    assert split.paths is not None
    out = []
    for c, idx in enumerate(split.indices_by_class()[:classes]):
        if len(idx) < shots:
            raise DatasetError(
                f"{root}/{split.class_names[c]}: has {len(idx)} images, fewer than --shots "
                f"{shots}; lower --shots or add images"
            )
        out.append((split.class_names[c], [split.paths[int(i)] for i in idx[:shots]]))
    return out


def run_enroll(cfg: EnrollConfig) -> dict[str, Any]:
    """Stage timings of one enrollment (seconds) and the one-image predict summary."""
    from mtl_edge.backends.select import create_backend
    from mtl_edge.fewshot.fc import fit_head, predict_proba
    from mtl_edge.preprocess import decode_image, preprocess_image

    bundle = Bundle.load(cfg.bundle)
    picked = pick_images(cfg.images, cfg.classes, cfg.shots)
    pre, recipe = bundle.preprocess, bundle.head
    extractor = create_backend(
        cfg.backend, bundle, cfg.precision, threads=cfg.threads, batch_size=cfg.batch_size
    )
    # One untimed call so that session start-up and first-run allocations are not counted.
    extractor.extract(np.zeros((1, *pre.input_shape), dtype=np.float32))
    paths = [p for _, ps in picked for p in ps]
    labels = np.repeat(np.arange(len(picked)), cfg.shots)
    t0 = time.perf_counter()
    decoded = [decode_image(p, pre.color_mode) for p in paths]
    t1 = time.perf_counter()
    x = np.stack([preprocess_image(img, pre) for img in decoded])
    t2 = time.perf_counter()
    feats = np.concatenate(
        [extractor.extract(x[i : i + cfg.batch_size]) for i in range(0, len(x), cfg.batch_size)]
    )
    t3 = time.perf_counter()
    meta = bundle.meta_init()
    init = recipe.init
    if init == "meta" and (meta is None or meta[0].shape[0] != len(picked)):
        init = "zeros"
    head = fit_head(
        feats, labels, len(picked), recipe.steps, recipe.lr, init, meta, recipe.normalize,
        recipe.weight_decay,
    )  # fmt: skip
    t4 = time.perf_counter()
    stages = {"decode": t1 - t0, "preprocess": t2 - t1, "extract": t3 - t2, "head_fit": t4 - t3}

    def predict_one() -> np.ndarray:
        img = preprocess_image(decode_image(paths[0], pre.color_mode), pre)
        return predict_proba(extractor.extract(img[None]), head)

    times = measure(predict_one, cfg.budget)
    return {
        "backend": cfg.backend,
        "precision": cfg.precision,
        "provider": extractor.provider,
        "variant": extractor.precision,
        "classes": len(picked),
        "shots": cfg.shots,
        "images": len(paths),
        "stages_s": stages,
        "enroll_total_s": t4 - t0,
        "predict": latency_summary(times, 1),
    }
