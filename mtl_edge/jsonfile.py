"""The project's JSON files: reading the versioned ones (bundle manifests, shard indexes,
episode lists) and making report data JSON-safe.

Every failure raises the caller's `MtlEdgeError` subclass with one line that names the file and
the fix, never a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtl_edge.errors import MtlEdgeError


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

    Raises:
        MtlEdgeError: an instance of `error` when the file is missing, not UTF-8 JSON, not an
            object of `schema`, or of another version.
    """
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise error(f"{path}: not an mtl-edge {what} (schema {schema})")
    if doc.get(version_key) != version:
        raise error(
            f"{path}: {what} schema version {doc.get(version_key)}, this mtl-edge reads "
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
