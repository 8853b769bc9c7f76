"""The project's JSON files: reading the versioned ones (bundle manifests, shard indexes,
episode lists, the gallery's `gallery.json`) and making report data JSON-safe.

These files can come from elsewhere, so reading is bounded: regular files only (a FIFO is
refused before it is opened, `mtl_edge.safefile`), at most `MAX_JSON_BYTES`, nesting at most
`MAX_JSON_DEPTH`, and no NaN or Infinity (not JSON, and a NaN threshold or learning rate would
slip through every comparison). Every failure raises the caller's `MtlEdgeError` subclass with
one line that names the file and the fix, never a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtl_edge.errors import MtlEdgeError, shown
from mtl_edge.safefile import read_regular

MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_depth(obj: Any) -> int:
    """Nesting depth of lists and objects (a scalar has depth 0), computed without recursion."""
    depth, level = 0, [obj]
    while True:
        containers = [o for o in level if isinstance(o, dict | list)]
        if not containers:
            return depth
        depth += 1
        level = [v for o in containers for v in (o.values() if isinstance(o, dict) else o)]


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON, refusing NaN/Infinity and nesting deeper than `max_depth`.

    Raises:
        ValueError: with a short reason (callers wrap it into their error class).
    """
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(str(e)) from None
    if json_depth(doc) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return doc


def read_json_document(
    path: Path,
    error: type[MtlEdgeError],
    *,
    what: str,
    schema: str,
    version: int,
    missing: str,
    fix: str,
    version_key: str = "version",
    max_bytes: int = MAX_JSON_BYTES,
) -> dict[str, Any]:
    """The JSON object in `path`, checked to carry `schema` and `version`.

    Args:
        path: the file to read.
        error: the exception class to raise (e.g. `BundleError`, `DatasetError`).
        what: the kind of file, for messages, e.g. "shard index".
        schema: the required value of the document's "schema" key.
        version: the required value of its `version_key` key.
        missing: the message after "<path>: " when the file does not exist, with its fix.
        fix: how to replace a file that is not valid JSON or of another version.
        version_key: the key that holds the version.
        max_bytes: larger files are refused.

    Raises:
        MtlEdgeError: an instance of `error` when the file is missing, not a regular file, too
            large, not UTF-8 JSON, nested too deeply, not an object of `schema`, or of another
            version.
    """
    data = read_regular(path, max_bytes, error, fix, missing=missing)
    try:
        doc = parse_json(data)
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise error(f"{path}: not an mtl-edge {what} (schema {schema})")
    found = doc.get(version_key)
    if found != version or isinstance(found, bool):
        raise error(
            f"{path}: {what} schema version {shown(found, 20)}, this mtl-edge reads "
            f"{version}; {fix}"
        )
    return doc


def json_safe(obj: Any) -> Any:
    """Plain JSON of nested data: paths as text, numpy arrays and tensors as lists, numpy and
    torch scalars as numbers, inf and NaN as null (what the report files hold)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
