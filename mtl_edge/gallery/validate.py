"""Checks of a gallery's content before anything uses it: `gallery.json` and the arrays.

The checksum only proves that the file is whole, not who wrote it (it is unkeyed), so a crafted
gallery with a valid checksum is still refused here when any field has the wrong type, shape
or range: class names are the ones `check_class_name` accepts and appear once, thresholds are
finite probabilities, the recipe is within `HeadRecipe`'s bounds, arrays have the dtype and
shape the document implies and hold finite numbers, and stored source paths are absolute.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from mtl_edge.errors import MtlEdgeError, shown
from mtl_edge.fewshot.fc import HEAD_INITS, HeadRecipe, HeadWeights
from mtl_edge.gallery.calibration import DEFAULT_REJECTION, REJECTIONS
from mtl_edge.gallery.state import (
    FEATURE_DTYPES,
    MAX_FEATURE_DIM,
    MAX_META_WAYS,
    EnrolledClass,
    Gallery,
    check_class_name,
    check_source,
)
from mtl_edge.npyfile import parse_npy

MAX_CLASSES = 100_000
MAX_EXAMPLES = 10_000_000
_TEXT_RE = re.compile(r"^[^\x00-\x1f\x7f]{0,200}$")
_VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
_NPY_DTYPE = {"float16": "<f2", "float32": "<f4"}


class Invalid(ValueError):
    """A gallery whose content breaks the format; the message says which field and why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any, field: str, keys: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{field} must be an object, got {type(value).__name__}")
    if keys is not None and not set(value) <= keys:
        raise Invalid(f"{field} has unknown keys {sorted(set(value) - keys)[:5]}")
    return value


def _text(value: Any, field: str, min_len: int = 0) -> str:
    if (
        not isinstance(value, str)
        or not _TEXT_RE.match(value)
        or not value.isprintable()
        or len(value) < min_len
    ):
        raise Invalid(f"{field} must be up to 200 printable characters")
    return value


def _int(value: Any, field: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise Invalid(f"{field}={shown(value)}: need an integer in {low}..{high}")
    return value


def _source(value: Any, field: str) -> dict[str, str] | None:
    try:
        return check_source(value)
    except MtlEdgeError as e:
        raise Invalid(f"{field}: {e}") from None


def _classes(value: Any) -> list[tuple[str, int, list[dict[str, str] | None]]]:
    if not isinstance(value, list) or len(value) > MAX_CLASSES:
        raise Invalid(f"classes must be a list of at most {MAX_CLASSES} entries")
    out, seen, total = [], set(), 0
    for i, entry in enumerate(value):
        entry = _object(entry, f"classes[{i}]", {"name", "count", "sources"})
        try:
            name = check_class_name(entry.get("name"))  # type: ignore[arg-type]
        except MtlEdgeError as e:
            raise Invalid(f"classes[{i}]: {e}") from None
        if name in seen:
            raise Invalid(f"class {name!r} appears twice")
        seen.add(name)
        count = _int(entry.get("count"), f"classes[{i}].count", 1, MAX_EXAMPLES)
        total += count
        sources = entry.get("sources")
        if not isinstance(sources, list) or len(sources) != count:
            raise Invalid(f"classes[{i}].sources must list {count} entries")
        out.append(
            (name, count, [_source(s, f"classes[{i}].sources[{j}]") for j, s in enumerate(sources)])
        )
    if total > MAX_EXAMPLES:
        raise Invalid(f"{total} examples in all, more than {MAX_EXAMPLES}")
    return out


def _recipe(value: Any) -> HeadRecipe:
    value = _object(value, "recipe", set(HeadRecipe.__dataclass_fields__))
    try:
        return HeadRecipe(**value)
    except MtlEdgeError as e:
        raise Invalid(f"recipe: {e}") from None


def _threshold(value: Any) -> tuple[float, str, dict[str, Any], str]:
    value = _object(value, "threshold", {"value", "mode", "calibration", "rejection"})
    cut, mode = value.get("value"), value.get("mode")
    if (
        not isinstance(cut, int | float)
        or isinstance(cut, bool)
        or not math.isfinite(cut)
        or not 0.0 <= cut <= 1.0
    ):
        raise Invalid(f"threshold.value={shown(cut)}: need a probability in [0, 1]")
    if mode not in ("auto", "manual"):
        raise Invalid(f"threshold.mode={shown(mode)}: need 'auto' or 'manual'")
    rejection = value.get("rejection", DEFAULT_REJECTION)  # absent before rules existed
    if rejection not in REJECTIONS:
        raise Invalid(f"threshold.rejection={shown(rejection)}: need one of {REJECTIONS}")
    calibration = _object(value.get("calibration", {}), "threshold.calibration")
    return float(cut), mode, calibration, rejection


def _array(
    members: dict[str, bytes], name: str, dtype: str, shape: tuple[int | None, ...]
) -> np.ndarray:
    if name not in members:
        raise Invalid(f"member {name} is missing")
    try:
        array = parse_npy(members[name], (dtype,))
    except ValueError as e:
        raise Invalid(f"member {name}: {e}") from None
    if array.ndim != len(shape) or any(
        s is not None and s != a for s, a in zip(shape, array.shape, strict=True)
    ):
        raise Invalid(f"member {name} has shape {array.shape}, expected {shape}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise Invalid(f"member {name} holds NaN or infinity")
    return array


def build_gallery(doc: Any, members: dict[str, bytes]) -> Gallery:
    """A `Gallery` from a parsed `gallery.json` and the zip's members, every field checked.

    Raises:
        Invalid: naming the first field that breaks the format.
    """
    doc = _object(doc, "gallery.json")
    model_id = _text(doc.get("model_id"), "model_id", min_len=1)
    dim = _int(doc.get("feature_dim"), "feature_dim", 1, MAX_FEATURE_DIM)
    dtype = doc.get("feature_dtype")
    if dtype not in FEATURE_DTYPES:
        raise Invalid(f"feature_dtype={shown(dtype)}: need float16 or float32")
    variant = doc.get("variant")
    if variant is not None and not (isinstance(variant, str) and _VARIANT_RE.match(variant)):
        raise Invalid("variant must be a bundle variant name or null")
    classes = _classes(doc.get("classes"))
    total = sum(count for _, count, _ in classes)
    meta = None
    if "meta_init_weight.npy" in members or "meta_init_bias.npy" in members:
        weight = _array(members, "meta_init_weight.npy", "<f4", (None, dim))
        if not 1 <= weight.shape[0] <= MAX_META_WAYS:
            raise Invalid(f"meta init for {weight.shape[0]} classes")
        meta = (weight, _array(members, "meta_init_bias.npy", "<f4", (weight.shape[0],)))
    try:
        g = Gallery(model_id, dim, _recipe(doc.get("recipe")), dtype, meta, variant=variant)
    except MtlEdgeError as e:
        raise Invalid(str(e)) from None
    g.backbone = _text(doc.get("backbone", ""), "backbone")
    features = _array(members, "features.npy", _NPY_DTYPE[dtype], (total, dim))
    labels = _array(members, "labels.npy", "<i4", (total,))
    expected = np.repeat(np.arange(len(classes), dtype=np.int32), [c for _, c, _ in classes])
    if not np.array_equal(labels, expected):
        raise Invalid("labels do not match the class list")
    start = 0
    for name, count, sources in classes:
        g.classes[name] = EnrolledClass(name, features[start : start + count], sources)
        start += count
    head = doc.get("head")
    if head is not None:
        head = _object(head, "head", {"normalize", "init"})
        if not isinstance(head.get("normalize"), bool) or head.get("init") not in HEAD_INITS:
            raise Invalid("head needs normalize (true/false) and a known init")
        ways = len(classes)
        weight = _array(members, "head_weight.npy", "<f4", (ways, dim))
        bias = _array(members, "head_bias.npy", "<f4", (ways,))
        g.head = HeadWeights(weight, bias, head["normalize"], head["init"])
    g.threshold, g.threshold_mode, g.calibration, g.rejection = _threshold(doc.get("threshold"))
    g.generation = _int(doc.get("generation"), "generation", 0, 2**62)
    g.created = _text(doc.get("created", ""), "created")
    g.model_id_format = _int(doc.get("model_id_format", 1), "model_id_format", 1, 2)
    return g
