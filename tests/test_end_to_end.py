"""Train -> export -> enroll and predict through the device CLI, against the training stack.

The device path (onnxruntime features, numpy FC head fitted from the bundle's head recipe, the
gallery) must reach the same accuracy as the training stack's own meta-test of the same model
(the MTL head in PyTorch) on the same episodes, within 0.5 points (issue 5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

WAYS, SHOTS, EPISODES = 5, 5, 3


def run_cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_device_cli_matches_training_meta_test(tmp_path: Path) -> None:
    from mtl_edge.data.episodes import Episode
    from mtl_edge.data.synthetic import write_class_folders
    from mtl_edge.fewshot.evaluate import evaluate_episodes
    from mtl_edge.fewshot.heads import feature_head
    from mtl_edge.train.checkpoint import load_checkpoint
    from mtl_edge.train.config import load_recipe
    from mtl_edge.train.metatest import extract_features, image_loader
    from mtl_edge.train.torchdata import open_recipe_split
    from mtl_edge.workflows.demo import QUICK_OVERRIDES
    from mtl_edge.workflows.pipeline import stage_export, stage_meta, stage_pretrain
    from mtl_edge.workflows.stages import finished, run_stages

    cfg = load_recipe("demo", QUICK_OVERRIDES)
    fns = {"pretrain": stage_pretrain, "meta": stage_meta, "export": stage_export}
    run = tmp_path / "demo"
    run_stages(cfg, "demo --quick", run, list(fns), fns, flops_reference=False)
    done = finished(run, list(fns))
    checkpoint = run / done["meta"]["outputs"]["checkpoint"]
    bundle = str(run / done["export"]["outputs"]["bundle"])
    held_out = open_recipe_split(cfg.data, cfg.data.test_split, "RGB").subset(list(range(WAYS)))
    by_class = held_out.indices_by_class()

    # Episode e: shots e*SHOTS .. (e+1)*SHOTS of every class are the support, the rest queries.
    episodes = []
    for e in range(EPISODES):
        support = [c[e * SHOTS : (e + 1) * SHOTS] for c in by_class]
        query = [
            np.setdiff1d(c, s, assume_unique=True) for c, s in zip(by_class, support, strict=True)
        ]
        episodes.append(Episode(np.arange(WAYS), np.concatenate(support), np.concatenate(query)))

    loaded = load_checkpoint(checkpoint)
    load = image_loader(held_out, loaded.preprocess)
    features = extract_features(loaded.backbone, load, len(held_out))
    head = feature_head("mtl", loaded.head, loaded.meta_init)
    training = evaluate_episodes(features, held_out.labels, episodes, {"mtl": head})
    training_accuracy = float(np.mean(training["mtl"].accuracies))

    hits = total = 0
    for e, episode in enumerate(episodes):
        enroll = write_class_folders(
            held_out.take(episode.support, "enroll"), tmp_path / f"enroll{e}"
        )
        queries = write_class_folders(held_out.take(episode.query, "query"), tmp_path / f"query{e}")
        files = sorted(queries.glob("*/*.png"))
        gallery = tmp_path / f"g{e}.gallery"
        common = ["--bundle", bundle, "--gallery", str(gallery), "--backend", "onnxruntime-cpu"]
        run_cli("enroll", *common, "--from-folder", str(enroll))
        rows = json.loads(
            run_cli("predict", *common, "--threshold", "0", "--json", *map(str, files))
        )
        hits += sum(row["label"] == Path(row["image"]).parent.name for row in rows)
        total += len(rows)
    device_accuracy = 100.0 * hits / total

    print(f"device {device_accuracy:.2f}% vs training {training_accuracy:.2f}% on {total} queries")
    assert training_accuracy > 30.0, "the quick model should beat chance (20%) clearly"
    assert abs(device_accuracy - training_accuracy) <= 0.5, (device_accuracy, training_accuracy)
