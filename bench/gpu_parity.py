"""Do the GPU features equal the CPU features? For `bench latency` with GPU settings.

On a fixed pool of synthetic images at the bundle's input size (20 classes x 20 images, seed
`seed`), the features of onnxruntime CUDA (FP32 and, when the bundle has it, FP16; through
`OrtCudaExtractor`, i.e. IO binding and CUDA graphs) are compared with onnxruntime CPU FP32:
the smallest and mean per-image cosine, the largest absolute difference, and the
nearest-centroid predictions of `episodes` fixed 5-way 1-shot episodes (15 queries), the
export's own parity check (`mtl_edge.export.parity`). FP32 passes at cosine >= 0.9999 with every
episode identical; FP16 at cosine >= the export's FP16 check.

Runs in its own process (`measure_parity`) so that its sessions and GPU memory are gone before
the timing starts.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

#: Pass thresholds on the smallest per-image cosine to the CPU FP32 features.
COSINE_MIN = {"fp32": 0.9999, "fp16": 0.999}
POOL_CLASSES, POOL_PER_CLASS = 20, 20


def parity(
    bundle_dir: str, episodes: int = 200, seed: int = 0, dry_run: bool = False
) -> dict[str, Any]:
    """{"pool", "episodes", "variants": {variant: {cosine_min, cosine_mean, max_abs,
    agreement..., pass}}, "pass"}."""
    from mtl_edge.backends.ort_cuda import OrtCudaExtractor
    from mtl_edge.bundle import Bundle
    from mtl_edge.data.synthetic import synthetic_split
    from mtl_edge.export.parity import (
        check_episodes,
        compare_features,
        episode_agreement,
        ort_features,
        ort_session,
        split_images,
    )

    bundle = Bundle.load(bundle_dir)
    pre = bundle.preprocess
    split = synthetic_split(
        "test",
        seed=seed,
        size=pre.size,
        test_classes=POOL_CLASSES,
        per_class=POOL_PER_CLASS,
        color_mode=pre.color_mode,
    )
    images = split_images(split, pre)
    eps = check_episodes(split, episodes, shots=1, seed=seed)
    reference = ort_features(ort_session(bundle.variant_path("fp32")), images)
    backbone = bundle.manifest["backbone"]
    out: dict[str, Any] = {
        "pool": f"{split.name}: {POOL_CLASSES} classes x {POOL_PER_CLASS} images, seed {seed}",
        "reference": "onnxruntime CPUExecutionProvider, fp32",
        "episodes": len(eps),
        "variants": {},
    }
    for variant in ("fp32", "fp16"):
        if variant not in bundle.variants:
            out["variants"][variant] = {"skipped": "the bundle has no such variant"}
            continue
        ext = OrtCudaExtractor(
            bundle.variant_path(variant),
            bundle.feature_dim,
            precision=variant,
            input_name=backbone.get("input_name", "images"),
            output_name=backbone.get("output_name", "features"),
            batch_size=64,
            device="cpu" if dry_run else "cuda",
            image_shape=pre.input_shape,
        )
        feats = ext.extract(images)
        row: dict[str, Any] = {"provider": ext.provider, "cuda_graphs": ext.cuda_graphs}
        row.update(compare_features(reference, feats))
        a, b = reference.astype(np.float64), feats.astype(np.float64)
        norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        row["cosine_mean"] = float(((a * b).sum(axis=1) / norms).mean())
        row["agreement"] = episode_agreement(reference, feats, split.labels, eps)
        row["pass"] = bool(
            row["cosine_min"] >= COSINE_MIN[variant]
            and (variant != "fp32" or row["agreement"]["pass"])
        )
        row["threshold"] = COSINE_MIN[variant]
        out["variants"][variant] = row
        ext.close()
    out["pass"] = all(v.get("pass", True) for v in out["variants"].values())
    return out


def measure_parity(
    bundle_dir: str, episodes: int, seed: int, dry_run: bool, timeout_s: float = 300.0
) -> dict[str, Any]:
    """`parity` in a fresh process; {"error": reason} when it fails."""
    import subprocess

    spec = {"bundle_dir": bundle_dir, "episodes": episodes, "seed": seed, "dry_run": dry_run}
    args = [sys.executable, "-m", "mtl_edge.bench.gpu_parity", json.dumps(spec)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"parity took over {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"parity failed: {tail}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(parity(**json.loads(sys.argv[1]))))
