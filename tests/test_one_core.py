"""One few-shot core: the same head on the same episodes gives the same number through
meta-test, the joint grid, export's parity check and `bench accuracy`.

Each entry point extracts its own features (torch for meta-test and the grid, onnxruntime for
export's check and the bench) and then calls the one evaluation loop. The test records what
reaches that loop from each of them: the episodes must be identical, and the accuracies equal
up to the rare query whose prediction the ~1e-6 torch/onnxruntime feature difference flips.
"""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import tiny_checkpoint

from mtl_edge.bench import accuracy as bench_accuracy
from mtl_edge.data.folders import read_class_folders
from mtl_edge.data.synthetic import make_synthetic_split, write_class_folders
from mtl_edge.export import parity
from mtl_edge.export.api import export_checkpoint
from mtl_edge.fewshot import evaluate as core
from mtl_edge.fewshot.heads import feature_head
from mtl_edge.settings import from_dict
from mtl_edge.train import grid, metatest
from mtl_edge.train.checkpoint import load_checkpoint
from mtl_edge.train.config import EvalConfig

WAYS, SHOTS, QUERIES, EPISODES, SEED = 5, 1, 15, 40, 0
HEADS = ("mtl", "centroid", "logreg")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("core")
    write_class_folders(make_synthetic_split(7, 20, 20, seed=3), root / "data" / "test")
    split = read_class_folders(root / "data", "test")
    ckpt = tiny_checkpoint(root / "meta.pt", size=20)
    bundle, _ = export_checkpoint(ckpt, root / "bundle", parity_episodes=10)
    return root, split, load_checkpoint(ckpt), bundle


def _recording(monkeypatch: pytest.MonkeyPatch, module: object, calls: list) -> None:
    """Record every call of the evaluation loop made from `module`."""
    real = core.evaluate_episodes

    def record(inputs, labels, episodes, heads, *args, **kwargs):  # noqa: ANN001, ANN202
        result = real(inputs, labels, episodes, heads, *args, **kwargs)
        calls.append(([e.to_json() for e in episodes], result))
        return result

    monkeypatch.setattr(module, "evaluate_episodes", record)


def test_the_same_head_gives_the_same_number_everywhere(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, split, loaded, bundle = setup
    seen: dict[str, dict[str, tuple[list, list[float]]]] = {}
    for head in HEADS:
        calls: dict[str, list] = {name: [] for name in ("metatest", "grid", "parity", "bench")}
        for name, module in (
            ("metatest", metatest),
            ("grid", grid),
            ("parity", parity),
            ("bench", bench_accuracy),
        ):
            _recording(monkeypatch, module, calls[name])
        protocol = {"ways": WAYS, "shots": [SHOTS], "queries": QUERIES, "episodes": EPISODES}
        protocol |= {"seed": SEED, "heads": [head]}
        metatest.meta_test(loaded, split, from_dict(EvalConfig, protocol))
        model = grid.grid_model(loaded, [f"kind={head}"])
        grid.evaluate_grid([model], split, (WAYS,), (SHOTS,), EPISODES, QUERIES, SEED)
        ort = parity.ort_features(parity.ort_session(bundle.variant_path("fp32")),
                                  parity.split_images(split, bundle.preprocess))  # fmt: skip
        factory = {head: feature_head(head, bundle.head, bundle.meta_init())}
        parity.accuracy_change(ort, ort, split, factory, EPISODES, SEED, shots=(SHOTS,))
        cfg = bench_accuracy.AccuracyConfig(
            bundle=bundle.root, data=root / "data", split="test", ways=(WAYS,), shots=(SHOTS,),
            queries=QUERIES, episodes=EPISODES, seed=SEED, precisions=("fp32",), head=head,
        )  # fmt: skip
        bench_accuracy.run_accuracy(cfg)
        seen[head] = {}
        for name, recorded in calls.items():
            episodes, result = recorded[0]
            (accuracies,) = [r.accuracies for r in result.values()]
            seen[head][name] = (episodes, accuracies)
    for head, by_caller in seen.items():
        reference_episodes, reference = by_caller["metatest"]
        for name, (episodes, accuracies) in by_caller.items():
            assert episodes == reference_episodes, (head, name)  # the same seeded episodes
            flips = np.abs(np.asarray(accuracies) - np.asarray(reference))
            assert flips.max() <= 100.0 / (WAYS * QUERIES) + 1e-9, (head, name)  # one query
            assert abs(np.mean(accuracies) - np.mean(reference)) < 0.25, (head, name)
    # The heads differ from each other, so the agreement above is not a coincidence.
    means = {h: np.mean(seen[h]["metatest"][1]) for h in HEADS}
    assert len({round(m, 6) for m in means.values()}) == len(HEADS), means
