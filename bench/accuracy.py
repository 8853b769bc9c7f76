"""`mtl-edge bench accuracy`: few-shot accuracy of every (backend, precision) on ONE seeded
episode list, with paired differences against the FP32 reference.

Every setting (ways, shots) draws its episodes from `EpisodeSampler(seed)` over the split, so
all backends and precisions see exactly the same tasks. Each (backend, precision) extracts the
features of the union of images any episode needs once (cached as .npy under `cache`, keyed by
the model, variant, backend and split), and every setting reuses them. The difference of a
precision against FP32 is the mean of per-episode accuracy differences, whose interval is much
narrower than either accuracy's because the episode difficulty cancels.

Heads are the few-shot core's (`mtl_edge.fewshot.heads`, through the one evaluation loop):
"mtl" (alias "fc") fits the bundle's head recipe from its meta-learned init, as the device
does; "centroid" classifies by the cosine nearest class mean (no training, isolates the
features); "logreg" is RFS-simple. The same head on the same episodes gives the same number
here as in meta-test, the grid and export's checks.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.atomicio import atomic_write_bytes
from mtl_edge.bundle import Bundle
from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, DatasetError, MtlEdgeError
from mtl_edge.fewshot.evaluate import EvalResult, evaluate_episodes
from mtl_edge.fewshot.heads import FEATURE_HEADS, canonical_heads, feature_head

log = logging.getLogger(__name__)

DATASETS = ("folders",)
ACCURACY_BACKENDS = ("onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "auto")


@dataclass
class AccuracyConfig:
    """What one `bench accuracy` run measures (see the module docstring)."""

    bundle: Path
    data: Path
    split: str | None = "test"
    dataset: str = "folders"
    ways: Sequence[int] = (5,)
    shots: Sequence[int] = (1, 5)
    queries: int = 15
    episodes: int = 2000
    seed: int = 0
    backends: Sequence[str] = ("onnxruntime",)
    precisions: Sequence[str] = ("fp32", "int8-cpu")
    head: str = "mtl"
    cache: Path | None = None
    threads: int | None = None
    batch_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict)


def read_split(cfg: AccuracyConfig) -> ImageSplit:
    from mtl_edge.data.folders import read_class_folders

    if cfg.dataset not in DATASETS:
        raise ConfigError(f"--dataset {cfg.dataset!r}: use one of {', '.join(DATASETS)}")
    return read_class_folders(cfg.data, cfg.split)


def draw_episodes(cfg: AccuracyConfig, split: ImageSplit) -> dict[tuple[int, int], list[Episode]]:
    """The fixed episode list of every (ways, shots) setting.

    Raises:
        DatasetError: the split has too few classes or images for a setting.
    """
    out = {}
    for ways in cfg.ways:
        if ways > split.num_classes:
            raise DatasetError(
                f"{cfg.data}: split {cfg.split!r} has {split.num_classes} classes, fewer than "
                f"--ways {ways}; lower --ways or use a split with more classes"
            )
        for shots in cfg.shots:
            sampler = EpisodeSampler.for_split(split, ways, shots, cfg.queries, cfg.seed)
            out[(ways, shots)] = sampler.episodes(cfg.episodes)
    return out


def needed_indices(episodes: dict[tuple[int, int], list[Episode]]) -> np.ndarray:
    """Sorted union of the sample indices any episode uses, shape (M,)."""
    parts = [np.concatenate([e.support, e.query]) for eps in episodes.values() for e in eps]
    return np.unique(np.concatenate(parts))


def _cache_path(cache: Path, bundle: Bundle, backend: str, variant: str, key: str) -> Path:
    h = hashlib.sha256(f"{bundle.model_id}|{variant}|{backend}|{key}".encode()).hexdigest()
    return cache / f"features-{h[:24]}.npy"


def extract_features(
    split: ImageSplit,
    indices: np.ndarray,
    bundle: Bundle,
    pairs: Sequence[tuple[str, str]],
    cfg: AccuracyConfig,
) -> tuple[dict[tuple[str, str], np.ndarray], dict[tuple[str, str], dict[str, Any]], list]:
    """Features of split samples `indices` (shape (M,)) for every (backend, precision).

    Each image is decoded and preprocessed once and fed to every extractor that has no cached
    features (read from / written to `cfg.cache` when set).

    Returns:
        (features {pair: (M, D) float32}, info {pair: provider, variant, cached},
        skipped [{backend, precision, reason}] for pairs whose extractor could not be made).
    """
    from mtl_edge.backends.select import create_backend
    from mtl_edge.preprocess import preprocess_image

    key = hashlib.sha256(split.fingerprint().encode() + indices.tobytes()).hexdigest()
    feats: dict[tuple[str, str], np.ndarray] = {}
    info: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    pending: dict[tuple[str, str], tuple[Any, Path | None]] = {}
    for backend, precision in pairs:
        try:
            extractor = create_backend(
                backend, bundle, precision, threads=cfg.threads, batch_size=cfg.batch_size
            )
        except MtlEdgeError as e:
            log.warning("skipped %s %s: %s", backend, precision, e)
            skipped.append({"backend": backend, "precision": precision, "reason": str(e)})
            continue
        meta = {"provider": extractor.provider, "variant": extractor.precision}
        path = None
        if cfg.cache is not None:
            path = _cache_path(cfg.cache, bundle, backend, extractor.precision, key)
            if path.is_file():
                log.info("features of %s %s from %s", backend, precision, path)
                feats[(backend, precision)] = np.load(path, allow_pickle=False)
                info[(backend, precision)] = {**meta, "cached": True}
                continue
        info[(backend, precision)] = {**meta, "cached": False}
        pending[(backend, precision)] = (extractor, path)
    chunks: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in pending}
    pre = bundle.preprocess
    for start in range(0, len(indices) if pending else 0, cfg.batch_size):
        batch = indices[start : start + cfg.batch_size]
        x = np.stack([preprocess_image(split.image(int(i)), pre) for i in batch])
        for k, (extractor, _) in pending.items():
            chunks[k].append(extractor.extract(x).astype(np.float32))
    for k, (_, path) in pending.items():
        feats[k] = np.concatenate(chunks[k])
        if path is not None:
            buf = io.BytesIO()
            np.save(buf, feats[k], allow_pickle=False)
            atomic_write_bytes(path, buf.getvalue())
    return feats, info, skipped


def run_accuracy(cfg: AccuracyConfig) -> dict[str, Any]:
    """Accuracy rows of every (backend, precision, ways, shots); the `results` of a report.

    Returns:
        {"rows": [{backend, precision, provider, ways, shots, accuracy, ci95,
        diff_vs_reference, diff_ci95}], "reference": [backend, precision], "skipped": [...],
        split, seed, episodes, queries, head}. Accuracies are in percent.

    Raises:
        ConfigError / DatasetError: bad names, a split too small for the settings.
    """
    (head_name,) = canonical_heads([cfg.head], FEATURE_HEADS)
    if cfg.episodes < 1:
        raise ConfigError(f"--episodes {cfg.episodes}: must be at least 1")
    from mtl_edge.backends.select import PRECISIONS

    for b in cfg.backends:
        if b not in ACCURACY_BACKENDS:
            raise ConfigError(f"--backends {b!r}: use some of {', '.join(ACCURACY_BACKENDS)}")
    for p in cfg.precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"--precisions {p!r}: use some of {', '.join(PRECISIONS)}")
    bundle = Bundle.load(cfg.bundle)
    heads = {head_name: feature_head(head_name, bundle.head, bundle.meta_init())}
    split = read_split(cfg)
    episodes = draw_episodes(cfg, split)
    indices = needed_indices(episodes)
    log.info(
        "%d images needed by %d settings x %d episodes", len(indices), len(episodes), cfg.episodes
    )
    pairs = [(b, p) for b in cfg.backends for p in cfg.precisions]
    features, info, skipped = extract_features(split, indices, bundle, pairs, cfg)
    per_episode: dict[tuple[str, str], dict[tuple[int, int], EvalResult]] = {}
    for pair in pairs:
        if pair not in features:
            continue
        table = np.zeros((len(split), features[pair].shape[1]), dtype=np.float32)
        table[indices] = features[pair]
        per_episode[pair] = {
            setting: evaluate_episodes(table, split.labels, eps, heads)[head_name]
            for setting, eps in episodes.items()
        }
    if not per_episode:
        raise ConfigError(
            "bench accuracy: no backend could run: "
            + "; ".join(f"{s['backend']} {s['precision']}: {s['reason']}" for s in skipped)
        )
    reference = next((k for k in per_episode if k[1] == "fp32"), next(iter(per_episode)))
    rows = []
    for key, by_setting in per_episode.items():
        for (ways, shots), acc in by_setting.items():
            row: dict[str, Any] = {
                "backend": key[0], "precision": key[1], **info[key],
                "ways": ways, "shots": shots, "accuracy": acc.mean, "ci95": acc.ci95,
            }  # fmt: skip
            if key != reference:
                diff, dci = acc.minus(per_episode[reference][(ways, shots)])
                row["diff_vs_reference"], row["diff_ci95"] = diff, dci
            rows.append(row)
    return {
        "rows": rows,
        "reference": list(reference),
        "skipped": skipped,
        "split": f"{cfg.data.name}/{cfg.split}" if cfg.split else cfg.data.name,
        "split_fingerprint": split.fingerprint(),
        "images": int(len(indices)),
        "seed": cfg.seed,
        "episodes": cfg.episodes,
        "queries": cfg.queries,
        "head": head_name,
    }
