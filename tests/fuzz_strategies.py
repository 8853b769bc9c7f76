"""Hypothesis strategies over hostile device inputs, and the contract each input must keep.

The contract (issue 15, must 1): an input is either used, with finite results, or refused with
one `MtlEdgeError` line; never another exception. `check_*` return "ok" or "refused" and let any
other exception escape, so the fuzz tests (tests/test_fuzz_device.py) fail on it and the
report (tests/fuzz_report.py) counts it as a traceback.
"""

from __future__ import annotations

import copy
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from hostile import gallery_zip, png_bytes, small_images
from hypothesis import strategies as st

from mtl_edge.bundle import Bundle
from mtl_edge.errors import MtlEdgeError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.gallery import Gallery
from mtl_edge.npyfile import npy_bytes
from mtl_edge.preprocess import Preprocess, decode_image, preprocess_image

IMAGE_SEEDS = small_images()
CFG = Preprocess(size=16)
#: Values that hit the validators' edges, mixed into every generated JSON value.
EDGE_VALUES = [
    None, True, 0, -1, 1e9, 10**9, 10**30, 1e-300, "", "../x", "/etc/passwd", "a/../b",
    "backbone.onnx", "engines/x.plan", "fp32", "unknown", "a\nb", [], {}, [[[]]], "NaN",
]  # fmt: skip

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(EDGE_VALUES),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (key or index) path to a value inside `doc`."""
    out = []
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    )
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


@st.composite
def edited_document(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with 1-3 random edits: a value replaced, a key deleted, or a key added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths)) if paths else ()
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        # drawn values are copied: EDGE_VALUES holds lists that a later edit could extend
        value = copy.deepcopy(draw(json_values))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path:
            op = "add"
        if op == "replace":
            parent[path[-1]] = value
        elif op == "delete":
            del parent[path[-1]]
        else:
            target = parent[path[-1]] if path else doc
            if isinstance(target, dict):
                target[draw(st.text(max_size=8))] = value
            elif isinstance(target, list):
                target.append(value)
    return doc


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with 1-4 byte-level mutations: flips, overwrites, truncation, insertion."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height (with a valid CRC)."""
    data = bytearray(png_bytes(1, 1))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


image_bytes = st.one_of(
    st.binary(max_size=512),
    st.sampled_from(sorted(IMAGE_SEEDS)).flatmap(lambda f: mutated_bytes(IMAGE_SEEDS[f])),
    st.builds(_png_with_size, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.tuples(st.integers(1, 3), st.integers(1, 70_000)).map(lambda s: png_bytes(*s)),
)


def check_image(data: bytes, mode: str = "RGB") -> str:
    """Decode and preprocess `data`: a finite (C, 16, 16) input, or one ImageError line."""
    try:
        img = decode_image(data, mode, name="fuzz")
    except MtlEdgeError as e:
        assert "\n" not in str(e), str(e)
        return "refused"
    x = preprocess_image(img, Preprocess(size=16, color_mode=mode, **_norm(mode)))
    assert x.shape == (1 if mode == "L" else 3, 16, 16) and np.all(np.isfinite(x))
    return "ok"


def _norm(mode: str) -> dict[str, tuple[float, ...]]:
    return {"mean": (0.5,), "std": (0.5,)} if mode == "L" else {}


def check_manifest(root: Path, doc: Any) -> str:
    """Write `doc` (a JSON value, or raw bytes) as the manifest of the bundle at `root` and use
    the bundle the way the device does: load, read every setting, fit a head with its recipe."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    (root / "manifest.json").write_bytes(raw)
    try:
        bundle = Bundle.load(root)
        _ = bundle.preprocess.input_shape, bundle.model_id, bundle.backbone_name
        paths = [bundle.variant_path(v) for v in bundle.variants]
        assert all(p.is_file() for p in paths)
        g = Gallery(
            bundle.model_id,
            bundle.feature_dim,
            bundle.head,
            meta_init=bundle.meta_init(),
            backbone=bundle.backbone_name,
        )
        _use_gallery(g, np.random.default_rng(0))
    except MtlEdgeError as e:
        assert "\n" not in str(e), str(e)
        return "refused"
    return "ok"


def _use_gallery(g: Gallery, rng: np.random.Generator) -> None:
    """Enroll two classes when empty, then fit and predict: probabilities must be finite."""
    if not g.classes:
        for name in ("a", "b"):
            g.add_class(name, rng.normal(size=(2, g.feature_dim)))
    if g.recipe.steps * len(g) > 20_000:  # bounded, but slow: tested on its own elsewhere
        g.recipe = HeadRecipe(steps=20)
    preds = g.predict(rng.normal(size=(3, g.feature_dim)), top_k=2)
    assert all(np.isfinite(p.probability) and p.label in (*g.class_names, "unknown") for p in preds)


def check_gallery(data: bytes) -> str:
    """Parse a gallery file's bytes and use it: info, predict, save again."""
    try:
        g = Gallery.from_bytes(data, "fuzz.gallery")
        json.dumps(g.info())
        _use_gallery(g, np.random.default_rng(0))
        again = Gallery.from_bytes(g.to_bytes(), "again")
        assert again.class_names == g.class_names
    except MtlEdgeError as e:
        assert "\n" not in str(e), str(e)
        return "refused"
    return "ok"


def seed_gallery() -> bytes:
    """A small valid gallery file (3 classes x 2 examples, 8-d features, with a meta init)."""
    rng = np.random.default_rng(0)
    meta = (rng.normal(size=(3, 8)).astype(np.float32), np.zeros(3, np.float32))
    g = Gallery("model-a", 8, HeadRecipe(steps=20, lr=0.5), meta_init=meta, variant="fp32")
    for name in ("a", "b", "c"):
        g.add_class(
            name, rng.normal(size=(2, 8)), [{"path": f"/x/{name}.jpg", "sha256": "0" * 64}] * 2
        )
    return g.to_bytes()


def gallery_parts(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n != "CHECKSUM"}
    return json.loads(members.pop("gallery.json")), members


npy_members = st.one_of(
    st.builds(
        lambda dtype, shape, fill: npy_bytes(np.full(shape, fill, dtype=dtype)),
        st.sampled_from(["<f2", "<f4", "<f8"]),
        st.lists(st.integers(0, 9), max_size=3).map(tuple),
        st.sampled_from([0.0, 1.0, -1.0, np.inf, np.nan, 1e4]),
    ),
    st.builds(
        lambda dtype, shape, fill: npy_bytes(np.full(shape, fill, dtype=dtype)),
        st.sampled_from(["<i4", "<i8"]),
        st.lists(st.integers(0, 9), max_size=3).map(tuple),
        st.sampled_from([0, 1, -1, 2**31 - 1]),
    ),
)


@st.composite
def crafted_gallery(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed gallery with its document and members edited, re-zipped with a valid checksum."""
    doc, members = gallery_parts(seed)
    if draw(st.booleans()):
        doc = draw(edited_document(doc))
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(members)))
        members[name] = draw(npy_members | st.binary(max_size=64))
    return gallery_zip(doc, members)
