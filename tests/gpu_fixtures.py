"""Helpers of the GPU-plan tests: a tiny registry-backbone bundle and a fake wheel."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path


def make_registry_bundle(work: Path) -> Path:
    """A conv4 (width 4, 32 px, random weights of seed 0) bundle written by the project's
    exporter, FP32 only: small enough for CPU tests, a registry backbone for the torch side."""
    from mtl_edge.bench.random_model import write_random_checkpoint
    from mtl_edge.export.api import export_checkpoint
    from mtl_edge.preprocess import Preprocess

    ckpt = write_random_checkpoint(
        "conv4", Preprocess(size=32).to_dict(), 0, work / "c.pt", {"width": 4}
    )
    bundle, _ = export_checkpoint(ckpt, work / "bundle", seed=0, parity_episodes=10)
    return bundle.root


def fake_wheel(folder: Path, size: int) -> Path:
    """A valid pure-Python wheel of about `size` bytes (random padding) with a marker module."""
    name = "mtl_edge_fake_ort_gpu"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    meta = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": b"MARKER = 'installed by device.sh'\n",
        f"{name}/padding.bin": os.urandom(size),
        f"{meta}/METADATA": b"Metadata-Version: 2.1\nName: mtl-edge-fake-ort-gpu\nVersion: 1.0\n",
        f"{meta}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{k},sha256={hashlib.sha256(v).hexdigest()},{len(v)}\n" for k, v in files.items()
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr(f"{meta}/RECORD", record + f"{meta}/RECORD,,\n")
    return path
