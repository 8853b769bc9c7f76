"""Does the exported graph compute what PyTorch computes? Tensor and episode-level checks.

Tensor parity: onnxruntime (CPU) against PyTorch on the same random inputs at several batch
sizes: max abs difference and the smallest per-row cosine. Episode parity: nearest-centroid
5-way predictions from both feature sets on the same seeded episodes must be identical. The
same episodes measure the accuracy change of the INT8 / FP16 variants with the bundle's own
head and the centroid head, through the one evaluation loop of `mtl_edge.fewshot.evaluate`.
torch is imported only by `torch_features` (the device's `export check` runs without it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import MtlEdgeError
from mtl_edge.fewshot.evaluate import evaluate_episodes
from mtl_edge.fewshot.heads import CentroidHead, HeadFactory
from mtl_edge.preprocess import Preprocess, preprocess_image

log = logging.getLogger(__name__)

MAX_ABS_TOL = 1e-4
COSINE_TOL = 0.9999
PARITY_BATCHES = (1, 7, 32)
PARITY_EPISODES = 200


def ort_session(path: str | Path, threads: int | None = None, optimized_path: Path | None = None):  # noqa: ANN201
    """An onnxruntime CPU session for `path` (all graph optimisations on).

    Args:
        threads: intra-op threads; None uses the usable cores.
        optimized_path: also write the optimised graph there (to count the kernels that run).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_features(session: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Features of `images` (N, C, H, W) float32 with an onnxruntime session -> (N, D) float32."""
    name = session.get_inputs()[0].name
    out = [
        session.run(None, {name: np.ascontiguousarray(images[i : i + batch_size])})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def torch_features(model: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Features of `images` (N, C, H, W) float32 with `model.forward_features` -> (N, D)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
            out.append(model.forward_features(x).float().numpy())
    return np.concatenate(out)


def compare_features(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """max_abs and the smallest per-row cosine similarity between (N, D) feature arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    dots = (a64 * b64).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), dots / (na * nb), 0.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)  # two zero rows are identical
    return {"max_abs": float(np.abs(a64 - b64).max()), "cosine_min": float(cos.min())}


def tensor_parity(
    model: Any,
    onnx_path: str | Path,
    input_shape: tuple[int, int, int],
    batches: Sequence[int] = PARITY_BATCHES,
    seed: int = 0,
    session: Any = None,
) -> dict[str, Any]:
    """onnxruntime against PyTorch on random inputs of shape (batch, *input_shape).

    Returns:
        {"batches": {"1": {"max_abs", "cosine_min"}, ...}, "max_abs", "cosine_min", "pass"}.
    """
    session = session or ort_session(onnx_path)
    rng = np.random.default_rng(seed)
    per: dict[str, dict[str, float]] = {}
    for batch in batches:
        x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        per[str(batch)] = compare_features(
            torch_features(model, x, batch), ort_features(session, x, batch)
        )
    worst_abs = max(v["max_abs"] for v in per.values())
    worst_cos = min(v["cosine_min"] for v in per.values())
    return {
        "batches": per,
        "max_abs": worst_abs,
        "cosine_min": worst_cos,
        "tolerance": {"max_abs": MAX_ABS_TOL, "cosine_min": COSINE_TOL},
        "pass": worst_abs <= MAX_ABS_TOL and worst_cos >= COSINE_TOL,
    }


def split_images(split: ImageSplit, preprocess: Preprocess) -> np.ndarray:
    """Every image of `split` through `preprocess` -> float32 (N, C, H, W)."""
    if len(split) == 0:
        raise MtlEdgeError(f"{split.name}: no images")
    return np.stack([preprocess_image(split.image(i), preprocess) for i in range(len(split))])


def check_episodes(
    split: ImageSplit, count: int, shots: int, ways: int = 5, queries: int = 15, seed: int = 0
) -> list[Episode]:
    """Episodes 0..count-1 of `EpisodeSampler.for_split(split, ways, shots, queries', seed)`,
    queries' = queries lowered to what the split's smallest class allows (export's checks run
    on a few images per class)."""
    smallest = int(split.class_counts().min())
    queries = min(queries, smallest - shots)
    if queries < 1:
        raise MtlEdgeError(
            f"{split.name}: classes of {smallest} images cannot give {shots}-shot episodes with "
            "queries; use evaluation data with more images per class"
        )
    return EpisodeSampler.for_split(split, ways, shots, queries, seed).episodes(count)


def episode_agreement(
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray,
    episodes: Sequence[Episode],
    head: HeadFactory = CentroidHead,
) -> dict[str, Any]:
    """How often two feature sets of one split ((N, D) each) give the same predictions of the
    same head on the same episodes.

    Returns:
        {"episodes", "identical_episodes", "query_agreement", "accuracy_reference",
        "accuracy_candidate", "pass" (all episodes identical)}.
    """
    identical, agree, total = 0, 0, 0
    for e in episodes:
        preds = []
        for feats in (reference, candidate):
            h = head()
            h.fit(feats[e.support], e.support_labels())
            preds.append(np.asarray(h.predict(feats[e.query])).argmax(axis=1))
        same = preds[0] == preds[1]
        identical += bool(same.all())
        agree += int(same.sum())
        total += len(same)
    acc = {
        name: evaluate_episodes(feats, labels, episodes, {"h": head})["h"].mean
        for name, feats in (("reference", reference), ("candidate", candidate))
    }
    return {
        "episodes": len(episodes),
        "identical_episodes": identical,
        "query_agreement": agree / max(total, 1),
        "accuracy_reference": acc["reference"],
        "accuracy_candidate": acc["candidate"],
        "pass": identical == len(episodes),
    }


def accuracy_change(
    reference: np.ndarray,
    candidate: np.ndarray,
    split: ImageSplit,
    heads: dict[str, HeadFactory],
    episodes: int = 600,
    seed: int = 0,
    shots: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """5-way accuracy of two feature sets of `split` ((N, D) each) with every head on the same
    episodes, and the paired change (candidate - reference), in percent.

    Returns:
        {"data", "max_abs", "cosine_min", "5way_<k>shot": {head: {"reference", "candidate",
        "ci95", "change", "change_ci95", "episodes", "queries_per_class"}}}.
    """
    out: dict[str, Any] = {"data": split.name, **compare_features(reference, candidate)}
    for k in shots:
        eps = check_episodes(split, episodes, k, seed=seed)
        ref = evaluate_episodes(reference, split.labels, eps, heads)
        got = evaluate_episodes(candidate, split.labels, eps, heads)
        table = {}
        for name in heads:
            change, change_ci = got[name].minus(ref[name])
            table[name] = {
                "reference": ref[name].mean,
                "candidate": got[name].mean,
                "ci95": got[name].ci95,
                "change": change,
                "change_ci95": change_ci,
                "episodes": len(eps),
                "queries_per_class": eps[0].queries,
            }
        out[f"5way_{k}shot"] = table
    return out


def features_parity(
    model: Any,
    session: Any,
    split: ImageSplit,
    images: np.ndarray,
    episodes: int = PARITY_EPISODES,
    seed: int = 0,
) -> dict[str, Any]:
    """Episode-level parity on real (preprocessed) images of `split`: feature differences and
    identical 5-way 1-shot nearest-centroid predictions on `episodes` fixed episodes."""
    ref = torch_features(model, images)
    got = ort_features(session, images)
    report: dict[str, Any] = {"data": split.name, "images": len(images)}
    report.update(compare_features(ref, got))
    eps = check_episodes(split, episodes, 1, seed=seed)
    report["episodes"] = episode_agreement(ref, got, split.labels, eps)
    return report
