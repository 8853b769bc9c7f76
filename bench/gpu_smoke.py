"""The GPU plan's smoke check (seconds): does onnxruntime-gpu really run this bundle on CUDA?

    python -m mtl_edge.bench.gpu_smoke --bundle B --out smoke.json [--dry-run]

Checks, in order, stopping at the first failure (exit code 1, the reason on one line):

1. `onnxruntime` is the GPU build and offers the CUDA provider (its file and version).
2. The CUDA / cuDNN libraries load (`cuda_libs.preload`).
3. An `OrtCudaExtractor` session runs on CUDAExecutionProvider (not a silent CPU fallback),
   with IO binding and CUDA graphs; two different batches through the captured graphs give
   the CPU provider's features (cosine >= 0.9999), so a replay reads the new input.
4. torch (in a subprocess: the device side never imports it) sees the GPU.

`--dry-run` runs 1-3 on the CPU provider (no CUDA) and skips 4's GPU requirement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

COSINE_MIN = 0.9999
TORCH_CHECK = (
    "import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'torch': "
    "torch.__version__, 'cuda': ok, 'device': torch.cuda.get_device_name(0) if ok else None}))"
)


class SmokeFailure(Exception):
    """A check failed; the message is the one-line reason."""


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(((a * b).sum(axis=1) / norms).min())


def smoke(bundle_dir: str, dry_run: bool, report: dict[str, Any]) -> None:
    """Run the checks, filling `report` as they pass; SmokeFailure at the first that fails."""
    t0 = time.perf_counter()
    import onnxruntime as ort

    from mtl_edge.backends import cuda_libs
    from mtl_edge.backends.ort_cuda import OrtCudaExtractor
    from mtl_edge.bundle import Bundle
    from mtl_edge.errors import MtlEdgeError

    providers = ort.get_available_providers()
    report["onnxruntime"] = {"file": ort.__file__, "version": ort.__version__}
    report["onnxruntime"]["providers"] = providers
    if not dry_run and "CUDAExecutionProvider" not in providers:
        raise SmokeFailure(f"{ort.__file__}: onnxruntime {ort.__version__} has no CUDA provider")
    if not dry_run:
        libs = cuda_libs.preload()
        report["cuda_libs"] = libs
        if libs["missing"]:
            raise SmokeFailure(f"CUDA libraries missing: {', '.join(libs['missing'])}")
    bundle = Bundle.load(bundle_dir)
    backbone = bundle.manifest["backbone"]
    try:
        ext = OrtCudaExtractor(
            bundle.variant_path("fp32"),
            bundle.feature_dim,
            input_name=backbone.get("input_name", "images"),
            output_name=backbone.get("output_name", "features"),
            buckets=[1, 2],
            cuda_options={"cudnn_conv_algo_search": "HEURISTIC"},
            device="cpu" if dry_run else "cuda",
            image_shape=bundle.preprocess.input_shape,
        )
    except MtlEdgeError as e:
        raise SmokeFailure(str(e)) from None
    report["extractor"] = {k: v for k, v in ext.info.items() if k != "cuda_libs"}
    cpu = ort.InferenceSession(str(bundle.variant_path("fp32")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cosines = []
    for _ in range(2):  # the second batch replays the graphs captured by the first
        x = rng.standard_normal((3, *ext.image_shape), dtype=np.float32)
        ref = cpu.run(None, {backbone.get("input_name", "images"): x})[0]
        cosines.append(_cosine_min(ref.astype(np.float64), ext.extract(x).astype(np.float64)))
    report["cosine_min_vs_cpu"] = min(cosines)
    if min(cosines) < COSINE_MIN:
        raise SmokeFailure(f"GPU features differ from the CPU's: cosine {min(cosines):.6f}")
    if not dry_run and not ext.cuda_graphs:
        report["warning"] = f"CUDA graphs refused: {ext.info['cuda_graph_error']}"
    ext.close()
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_CHECK], capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    report["torch"] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-300:]}
    if not dry_run and not report["torch"].get("cuda"):
        raise SmokeFailure(f"torch sees no CUDA GPU: {report['torch']}")
    report["seconds"] = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"bundle": args.bundle, "dry_run": args.dry_run}
    code = 0
    try:
        smoke(args.bundle, args.dry_run, report)
        report["ok"] = True
    except SmokeFailure as e:
        report.update(ok=False, error=str(e))
        print(f"smoke: error: {e}", file=sys.stderr)
        code = 1
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"smoke: {'ok' if code == 0 else 'FAILED'} ({args.out})")
    return code


if __name__ == "__main__":
    sys.exit(main())
