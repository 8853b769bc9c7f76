"""The built-in model bundle: installed with the package, used when no bundle is named.

`mtl-edge enroll`, `predict`, `serve` and the bench commands take `--bundle` or
`MTL_EDGE_BUNDLE`; when neither is given they use the bundle in this package's `builtin/`
folder (the exported `mini-cpu` model: ResNet-12 48-96-192-384 at 64x64, trained on the 64
miniImageNet train classes; its manifest's `card` holds the training commands, the accuracy
table and the image terms). It is verified like any other bundle when it is opened. A build
of the package without it (e.g. a trimmed source tree) simply has no default, and the commands
say to pass `--bundle`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtl_edge.errors import ConfigError

#: The folder of the built-in bundle inside the installed package.
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN_NAME = "mini-cpu"


def builtin_bundle() -> Path | None:
    """The built-in bundle's folder, or None when this installation has none."""
    return BUILTIN_DIR if (BUILTIN_DIR / "manifest.json").is_file() else None


def resolve_bundle(bundle: Path | None) -> Path:
    """`bundle` when given (from --bundle or MTL_EDGE_BUNDLE), else the built-in bundle.

    Raises:
        ConfigError: neither was given and this installation has no built-in bundle.
    """
    if bundle is not None:
        return bundle
    found = builtin_bundle()
    if found is None:
        raise ConfigError(
            "no model bundle: this installation has no built-in bundle; pass --bundle FOLDER "
            "or set MTL_EDGE_BUNDLE (make one with `mtl-edge export`)"
        )
    return found


def describe_builtin() -> dict[str, Any]:
    """What `mtl-edge info` shows of the built-in bundle: {"present": False} when absent, else
    {"present", "name", "path", "model_id", "backbone", "input", "variants", "verified",
    "accuracy"} (accuracy: the card's meta-test table, when the card has one). Verification
    failure is reported (`verified` False, `error`), not raised: `info` must always answer."""
    from mtl_edge.bundle import Bundle
    from mtl_edge.errors import MtlEdgeError

    path = builtin_bundle()
    if path is None:
        return {"present": False}
    entry: dict[str, Any] = {"present": True, "name": BUILTIN_NAME, "path": str(path)}
    try:
        bundle = Bundle.load(path)
    except MtlEdgeError as e:
        return {**entry, "verified": False, "error": str(e)}
    backbone = bundle.manifest["backbone"]
    card = bundle.manifest.get("card") or {}
    return {
        **entry,
        "verified": True,
        "model_id": bundle.model_id,
        "backbone": f"{backbone['name']} {backbone.get('args', {})}",
        "input": list(backbone.get("input_shape", [])),
        "variants": sorted(bundle.variants),
        "accuracy": card.get("accuracy"),
    }
