"""`mtl-edge export check BUNDLE`: re-verify a bundle on any machine, without torch.

The bundle's hashes are verified on load; then every variant runs on onnxruntime (CPU) over a
few images at the bundle's input size - real ones from a class-folder split when `data` is
given (`--data`), else built-in synthetic ones - and random inputs for the float variants, and
its features are compared with the FP32 file's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.bundle import Bundle
from mtl_edge.data.folders import read_class_folders
from mtl_edge.data.split import ImageSplit
from mtl_edge.data.synthetic import make_synthetic_split
from mtl_edge.errors import BundleError
from mtl_edge.export import parity
from mtl_edge.preprocess import Preprocess

#: Variants compared with fp32: smallest per-image cosine accepted.
CHECK_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98, "int8-cpu": 0.98}


def synthetic_eval_split(preprocess: Preprocess, seed: int = 0) -> ImageSplit:
    """10 classes x 20 images of the built-in synthetic data, drawn at the backbone's input
    size and colour mode (enough for 5-way 5-shot episodes with 15 queries)."""
    size = max(8, preprocess.resize or preprocess.size)
    return make_synthetic_split(
        10, 20, size, seed, preprocess.color_mode, name="synthetic/export-check"
    )


REAL_IMAGES = 20


def check_images(
    preprocess: Preprocess, seed: int, data: str | Path | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The check's images (N, C, H, W) as the device preprocesses them, and where they came
    from: `REAL_IMAGES` spread evenly over the class-folder split `data`
    (`<data>/<class>/<image>`), else 20 of the synthetic split."""
    if data is None:
        split = synthetic_eval_split(preprocess, seed)
        picked = split.take(np.arange(0, len(split), 10))
        return parity.split_images(picked, preprocess), {"kind": "synthetic", "count": len(picked)}
    split = read_class_folders(data, None, preprocess.color_mode)
    rows = np.unique(np.linspace(0, len(split) - 1, min(REAL_IMAGES, len(split))).astype(int))
    picked = split.take(rows)
    return parity.split_images(picked, preprocess), {
        "kind": "real", "split": str(data), "count": len(picked)}  # fmt: skip


def check_bundle(path: str | Path, seed: int = 0, data: str | Path | None = None) -> dict[str, Any]:
    """Verify a bundle's hashes and compare every variant with fp32 on real images of the
    class-folder split `data`, or synthetic ones when None.

    Returns:
        {"bundle", "model_id", "backbone", "variants": {name: {"max_abs", "cosine_min",
        "pass"}}, "engines", "pass"}.

    Raises:
        BundleError: missing, incomplete or tampered bundle.
    """
    bundle = Bundle.load(path)
    preprocess = bundle.preprocess
    images, source = check_images(preprocess, seed, data)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((3, *preprocess.input_shape)).astype(np.float32)
    inputs = np.concatenate([images, noise])
    results: dict[str, Any] = {}
    reference = None
    for name in ["fp32", *[v for v in bundle.variants if v != "fp32"]]:
        try:
            session = parity.ort_session(bundle.variant_path(name))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise BundleError(
                f"{bundle.variant_path(name)}: onnxruntime cannot load it ({first}); export the "
                "bundle again"
            ) from None
        try:
            feats = parity.ort_features(session, inputs, batch_size=7)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise BundleError(
                f"{bundle.variant_path(name)}: onnxruntime fails on inputs of shape "
                f"(7, {', '.join(map(str, preprocess.input_shape))}) ({first}); the graph does "
                "not match the manifest, export the bundle again"
            ) from None
        if feats.shape != (len(inputs), bundle.feature_dim):
            raise BundleError(
                f"{bundle.variant_path(name)}: gives features of shape {feats.shape[1:]}, "
                f"manifest says ({bundle.feature_dim},)"
            )
        if reference is None:
            reference = feats
        # Quantized variants are compared on real images only: noise is outside calibration.
        rows = slice(None) if name in ("fp32", "fp16") else slice(0, len(images))
        cmp = parity.compare_features(reference[rows], feats[rows])
        cmp["pass"] = cmp["cosine_min"] >= CHECK_COSINE.get(name, 0.98)
        results[name] = cmp
    return {
        "bundle": str(bundle.root),
        "model_id": bundle.model_id,
        "backbone": bundle.manifest["backbone"],
        "preprocess": bundle.manifest["preprocess"],
        "head": {k: v for k, v in bundle.manifest["head"].items() if k != "meta_init"}
        | {"meta_init_ways": (bundle.manifest["head"].get("meta_init") or {}).get("ways")},
        "provenance": bundle.manifest.get("provenance", {}),
        "export_parity_pass": bundle.manifest.get("parity", {}).get("pass"),
        "files": len(bundle.manifest["files"]),
        "variants": results,
        "engines": bundle.manifest.get("engines", []),
        "images": source,
        "pass": all(r["pass"] for r in results.values()),
    }
