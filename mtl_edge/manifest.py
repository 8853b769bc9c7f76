"""The bundle manifest's schema, checked field by field, and the bundle's identity.

A manifest is untrusted input (bundles are copied to devices), so `check_manifest` checks every
field the device uses for type and range before anything reads it, and every path it names
must be a plain relative name inside the bundle (`check_relpath`: no "..", no absolute path, no
hidden or odd characters). The limits are listed in docs/security.md.

Identity: `model_id(manifest)` is the sha256 of the canonical JSON (sorted keys, no spaces) of
the whole manifest, every variant and every file hash included, except what a device adds
by itself: the `engines` list and the files under `engines/` (TensorRT engines built on the
device, hashed but not part of the identity). A gallery stores the model_id, so swapping any
variant, weight file or setting makes every gallery refuse the bundle; a signature signs it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtl_edge.errors import BundleError, MtlEdgeError, shown
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
ENGINES_DIR = "engines"
REQUIRED_KEYS = ("schema", "schema_version", "backbone", "preprocess", "head", "variants", "files")
#: Free-form report sections: any JSON object.
REPORT_KEYS = ("provenance", "metrics", "parity", "quantization")
MAX_FILES = 256
MAX_FEATURE_DIM = 65_536
MAX_META_WAYS = 10_000
MAX_PATH_PARTS = 3
_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")
_VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TEXT_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")


def check_relpath(rel: Any) -> str:
    """`rel` if it is a plain bundle-relative path ("backbone.onnx", "engines/x.plan"), else
    ValueError: at most 3 parts of letters, digits and `._+-`, none starting with a dot."""
    if not isinstance(rel, str):
        raise ValueError(f"a file name must be a string, got {type(rel).__name__}")
    parts = rel.split("/")
    if len(parts) > MAX_PATH_PARTS or not all(_PART_RE.match(p) for p in parts):
        raise ValueError(
            f"{rel[:80]!r} is not a plain file name inside the bundle (no '..', no absolute "
            "path, no hidden or special characters)"
        )
    return rel


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any, field: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not _TEXT_RE.match(value) or not value.isprintable():
        raise ValueError(f"{field} must be 1-200 printable characters")


def _int(value: Any, field: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{field}={shown(value)}: use an integer in {low}..{high}")
    return value


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be an object, got {type(value).__name__}")
    return value


def _hashed_file(value: Any, field: str, files: Mapping[str, str], engines: bool) -> str:
    try:
        rel = check_relpath(value)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    if rel not in files:
        raise ValueError(f"{field} names {rel!r}, which has no sha256 under 'files'")
    if (rel.split("/")[0] == ENGINES_DIR) != engines:
        where = "inside" if engines else "outside"
        raise ValueError(f"{field} names {rel!r}: it must lie {where} {ENGINES_DIR}/")
    return rel


def _check_files(files: Any) -> dict[str, str]:
    files = _object(files, "files")
    if len(files) > MAX_FILES:
        raise ValueError(f"files lists {len(files)} entries, more than {MAX_FILES}")
    for rel, digest in files.items():
        check_relpath(rel)
        if rel in (MANIFEST, SIGNATURE):
            raise ValueError(f"files must not list {rel}")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise ValueError(f"files[{rel!r}] must be a lowercase hex sha256")
    return files


def _check_backbone(backbone: Any, preprocess: Preprocess) -> None:
    backbone = _object(backbone, "backbone")
    _text(backbone.get("name"), "backbone.name")
    if "args" in backbone:
        _object(backbone["args"], "backbone.args")
    _int(backbone.get("feature_dim"), "backbone.feature_dim", 1, MAX_FEATURE_DIM)
    _text(backbone.get("input_name"), "backbone.input_name", optional=True)
    _text(backbone.get("output_name"), "backbone.output_name", optional=True)
    if backbone.get("opset") is not None:
        _int(backbone["opset"], "backbone.opset", 1, 1000)
    shape = backbone.get("input_shape")
    if shape is not None and shape != list(preprocess.input_shape):
        raise ValueError(
            f"backbone.input_shape {shown(shape)} disagrees with preprocess (size "
            f"{preprocess.size}, {preprocess.color_mode}: {list(preprocess.input_shape)})"
        )


def _check_head(head: Any, files: Mapping[str, str]) -> HeadRecipe:
    head = _object(head, "head")
    known = set(HeadRecipe.__dataclass_fields__)
    unknown = sorted(str(k) for k in head if k not in known and k != "meta_init")
    if unknown:
        raise ValueError(f"head has unknown keys {shown(unknown[:5], 80)}")
    try:
        recipe = HeadRecipe(**{k: v for k, v in head.items() if k in known})
    except MtlEdgeError as e:
        raise ValueError(str(e)) from None
    meta = head.get("meta_init")
    if meta is not None:
        meta = _object(meta, "head.meta_init")
        _hashed_file(meta.get("weight"), "head.meta_init.weight", files, engines=False)
        _hashed_file(meta.get("bias"), "head.meta_init.bias", files, engines=False)
        _int(meta.get("ways"), "head.meta_init.ways", 1, MAX_META_WAYS)
    return recipe


def _check_variants(variants: Any, files: Mapping[str, str]) -> None:
    variants = _object(variants, "variants")
    if "fp32" not in variants:
        raise ValueError("no fp32 variant listed")
    for name, entry in variants.items():
        if not _VARIANT_RE.match(name):
            raise ValueError(f"variant name {name[:40]!r}: use 1-32 of a-z, 0-9, '.', '_', '-'")
        entry = _object(entry, f"variants.{name}")
        _hashed_file(entry.get("file"), f"variants.{name}.file", files, engines=False)
        _text(entry.get("precision"), f"variants.{name}.precision", optional=True)


def _check_engines(engines: Any, files: Mapping[str, str]) -> None:
    if not isinstance(engines, list) or len(engines) > MAX_FILES:
        raise ValueError(f"engines must be a list of at most {MAX_FILES} entries")
    for i, entry in enumerate(engines):
        entry = _object(entry, f"engines[{i}]")
        _hashed_file(entry.get("file"), f"engines[{i}].file", files, engines=True)
        if "variant" in entry and not (
            isinstance(entry["variant"], str) and _VARIANT_RE.match(entry["variant"])
        ):
            raise ValueError(f"engines[{i}].variant is not a variant name")


def check_manifest(doc: dict[str, Any], path: Path) -> tuple[Preprocess, HeadRecipe]:
    """Check every field of a parsed manifest; returns its preprocessing and head recipe.

    Raises:
        BundleError: naming the manifest, the field and the fix.
    """
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise BundleError(f"{path}: missing keys {missing}; export the bundle again")
    try:
        files = _check_files(doc["files"])
        try:
            preprocess = Preprocess.from_dict(doc["preprocess"])
        except MtlEdgeError as e:
            raise ValueError(str(e)) from None
        _check_backbone(doc["backbone"], preprocess)
        recipe = _check_head(doc["head"], files)
        _check_variants(doc["variants"], files)
        _check_engines(doc.get("engines", []), files)
        for key in REPORT_KEYS:
            if key in doc:
                _object(doc[key], key)
    except ValueError as e:
        raise BundleError(f"{path}: {e}; export the bundle again") from None
    return preprocess, recipe


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that identities and signatures are computed over."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def identity_document(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest without what a device adds by itself (engines and their files)."""
    doc = {k: v for k, v in manifest.items() if k != "engines"}
    doc["files"] = {
        rel: digest for rel, digest in manifest["files"].items() if rel.split("/")[0] != ENGINES_DIR
    }
    return doc


def model_id(manifest: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical identity document (see the module docstring)."""
    return hashlib.sha256(canonical_json(identity_document(manifest))).hexdigest()


def legacy_model_id(manifest: Mapping[str, Any]) -> str | None:
    """The model_id of mtl-edge before 0.2 (FP32 file hash + preprocessing only), to tell a
    gallery of this very bundle made by an older mtl-edge from one of another model."""
    try:
        fp32 = manifest["variants"]["fp32"]["file"]
        key = json.dumps(
            {"fp32": manifest["files"][fp32], "preprocess": manifest["preprocess"]},
            sort_keys=True,
        )
    except (KeyError, TypeError):
        return None
    return hashlib.sha256(key.encode()).hexdigest()
