"""Hostile and damaged inputs for the hardening tests, the fuzz tests and tests/fuzz_report.py:
images that upset decoders, galleries crafted with a valid checksum, edited manifests."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mtl_edge.gallery.storage import members_checksum


def png_bytes(width: int, height: int, mode: str = "L") -> bytes:
    """A PNG of one colour: tiny on disk whatever its size (a 1 x 1,000,000 one is 2 KB)."""
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def small_images() -> dict[str, bytes]:
    """One small valid image per supported format (the seeds that mutations start from)."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = {}
    for fmt, options in (
        ("PNG", {}),
        ("JPEG", {"quality": 90}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("WEBP", {"quality": 80}),
        ("PPM", {}),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **options)
        out[fmt] = buf.getvalue()
    return out


def damaged_lzw_tiff() -> bytes:
    """An LZW TIFF whose strip data is damaged: libtiff prints on file descriptor 2."""
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF", compression="tiff_lzw")
    data = bytearray(buf.getvalue())
    for i in range(200, 2000, 37):
        data[i] ^= 0x5A
    return bytes(data)


def corrupt_exif_jpeg(size: int = 24) -> bytes:
    """A decodable JPEG whose EXIF block is damaged (Pillow warns while reading it)."""
    arr = np.full((size, size, 3), 128, dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", exif=exif)
    data = bytearray(buf.getvalue())
    i = data.find(b"Exif")
    data[i + 12 : i + 20] = b"\xff" * 8
    return bytes(data)


def read_gallery_parts(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(gallery.json as a dict, every other member) of a valid gallery file."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n != "CHECKSUM"}
    return json.loads(members.pop("gallery.json")), members


def gallery_zip(doc: Any, members: dict[str, bytes], raw_json: bytes | None = None) -> bytes:
    """A gallery file holding `doc` (or `raw_json`) and `members`, with a valid checksum: what
    an attacker who knows the (unkeyed) format can write."""
    members = dict(members)
    members["gallery.json"] = raw_json if raw_json is not None else json.dumps(doc).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(members):
            zf.writestr(name, members[name])
        zf.writestr("CHECKSUM", members_checksum(members) + "\n")
    return buf.getvalue()


def rehash(bundle_root: Path, rel: str, data: bytes) -> None:
    """Replace a bundle file and update its sha256 in the manifest (a consistent tamper)."""
    (bundle_root / rel).write_bytes(data)
    manifest = json.loads((bundle_root / "manifest.json").read_text())
    manifest["files"][rel] = hashlib.sha256(data).hexdigest()
    (bundle_root / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(bundle_root: Path, edit: Any) -> None:
    """Apply `edit(manifest_dict)` to a bundle's manifest.json in place."""
    path = bundle_root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def nan_onnx(onnx_bytes: bytes) -> bytes:
    """The same graph with NaN conv weights: every feature it gives is NaN."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w":
            arr = np.full(numpy_helper.to_array(init).shape, np.nan, dtype=np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, "w"))
    return model.SerializeToString()
