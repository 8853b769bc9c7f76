"""Add the FP16 variant to a bundle copy on the GPU machine (issue 20's plan).

    python3 scripts/gpu/inference/add_fp16.py BUNDLE

The FP32 ResNet-12-wide file (47 MiB) travels in parts like the wheel; carrying its FP16
variant (24 MiB) too would cost one more call, so it is made there with the exporter's own
converter (`mtl_edge.export.fp16.convert_fp16`, what `mtl-edge export --fp16` runs) and
added to the bundle's manifest with its sha256 (`Bundle.add_files`). Idempotent.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from mtl_edge.bundle import Bundle
from mtl_edge.export.fp16 import convert_fp16


def add_fp16(root: Path) -> dict:
    bundle = Bundle.load(root)
    if "fp16" in bundle.variants:
        return {"fp16": "already there"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "backbone.fp16.onnx"
        settings = convert_fp16(bundle.variant_path("fp32"), target)
        variants = {**bundle.manifest["variants"]}
        variants["fp16"] = {
            "file": "backbone.fp16.onnx",
            "precision": "fp16",
            "target": "gpu",
            "check": {"settings": settings, "made_by": "scripts/gpu/inference/add_fp16.py"},
        }
        bundle.add_files({"backbone.fp16.onnx": target}, {"variants": variants})
    Bundle.load(root)  # verifies every sha256, the new file's too
    return {"fp16": "added", "seconds": round(time.perf_counter() - start, 2)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: add_fp16.py BUNDLE")
    print(add_fp16(Path(sys.argv[1])))
