"""The model bundle: the contract between the workstation that exports and the device.

A bundle is a folder:

    manifest.json          everything needed to use the model (schema below)
    backbone.onnx          folded FP32 backbone: `images` (N, C, H, W) -> `features` (N, D)
    backbone.*.onnx        optional variants (fp16, int8 for TensorRT, int8-cpu for onnxruntime)
    head_init_weight.npy   optional meta-learned FC initialisation, shape (ways, D)
    head_init_bias.npy     optional, shape (ways,)
    engines/*.plan         optional TensorRT engines, keyed by GPU and TensorRT version

manifest.json (schema "mtl-edge.bundle", version 1):

    backbone:   {name, args, feature_dim, input_name, output_name, input_shape, opset}
    preprocess: `mtl_edge.preprocess.Preprocess.to_dict()`
    head:       `HeadRecipe` fields (steps, lr, init, normalize, weight_decay, loss) and
                meta_init: {weight, bias, ways} | null
    variants:   {variant name: {file, precision, target, activations, check, ...}};
                "fp32" is required
    engines:    [{file, variant, gpu, compute_capability, tensorrt}]
    provenance: {checkpoint_sha256, dataset, split_fingerprint, seed, commit, created, ...}
    metrics:    {...}; parity: {...}; quantization: {...} (free-form reports from export)
    files:      {relative path: sha256} for every file above except manifest.json

Loading verifies the schema and every hash, so a tampered or half-copied bundle is refused with
a message naming the file. Writing goes through a staging folder renamed into place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.atomicio import atomic_write_json, sha256_file, staged_dir
from mtl_edge.errors import BundleError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.jsonfile import read_json_document
from mtl_edge.preprocess import Preprocess

BUNDLE_SCHEMA = "mtl-edge.bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema", "schema_version", "backbone", "preprocess", "head", "variants", "files")


class Bundle:
    """A verified model bundle on disk. Use `Bundle.load(path)`."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle.

        Raises:
            BundleError: missing folder or manifest, wrong schema, missing keys, a listed file
                absent or with another sha256 (when `verify`).
        """
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle folder; export one with `mtl-edge export`")
        path = root / MANIFEST
        manifest = read_json_document(
            path,
            BundleError,
            what="bundle manifest",
            schema=BUNDLE_SCHEMA,
            version=BUNDLE_VERSION,
            version_key="schema_version",
            missing="missing; the bundle is incomplete, export it again",
            fix="export the bundle again",
        )
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise BundleError(f"{path}: missing keys {missing}; export the bundle again")
        if "fp32" not in manifest["variants"]:
            raise BundleError(f"{path}: no fp32 variant listed; export the bundle again")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check that every listed file exists and matches its sha256."""
        for rel, digest in sorted(self.manifest["files"].items()):
            path = self.root / rel
            if not path.is_file():
                raise BundleError(
                    f"{path}: listed in the manifest but missing; copy the whole bundle again"
                )
            if sha256_file(path) != digest:
                raise BundleError(
                    f"{path}: sha256 does not match the manifest (modified or "
                    "corrupt); copy or export the bundle again"
                )
        for name, variant in self.manifest["variants"].items():
            if variant.get("file") not in self.manifest["files"]:
                raise BundleError(
                    f"{self.root / MANIFEST}: variant {name!r} names a file that "
                    "is not hashed; export the bundle again"
                )

    @property
    def backbone_name(self) -> str:
        return str(self.manifest["backbone"]["name"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["backbone"]["feature_dim"])

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.manifest["preprocess"])

    @property
    def head(self) -> HeadRecipe:
        known = set(HeadRecipe.__dataclass_fields__)
        return HeadRecipe(**{k: v for k, v in self.manifest["head"].items() if k in known})

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest["variants"])

    def variant_path(self, variant: str = "fp32") -> Path:
        """Path of the ONNX file of `variant` ("fp32", "fp16", "int8", "int8-cpu", ...)."""
        if variant not in self.manifest["variants"]:
            raise BundleError(
                f"{self.root}: has no {variant!r} variant (has {', '.join(self.variants)}); "
                "re-export with the matching option (--int8 / --fp16)"
            )
        return self.root / self.manifest["variants"][variant]["file"]

    def meta_init(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The meta-learned FC initialisation: (weight (ways, D), bias (ways,)), or None."""
        meta = self.manifest["head"].get("meta_init")
        if not meta:
            return None
        weight = np.load(self.root / meta["weight"], allow_pickle=False)
        bias = np.load(self.root / meta["bias"], allow_pickle=False)
        return weight.astype(np.float32), bias.astype(np.float32)

    @property
    def model_id(self) -> str:
        """Identifies the features this bundle produces: sha256 of the FP32 backbone's hash and
        the preprocessing. Galleries store it and refuse features from another model."""
        fp32 = self.manifest["variants"]["fp32"]["file"]
        key = json.dumps(
            {"fp32": self.manifest["files"][fp32], "preprocess": self.manifest["preprocess"]},
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()

    def add_files(self, files: Mapping[str, Path | bytes], updates: Mapping[str, Any]) -> None:
        """Add files (e.g. a TensorRT engine built on the device) and update manifest keys.

        Each file is written atomically; the manifest is replaced last, so a crash leaves the
        previous, still valid manifest in place.
        """
        from mtl_edge.atomicio import atomic_write_bytes

        manifest = dict(self.manifest)
        manifest["files"] = dict(manifest["files"])
        for rel, src in files.items():
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            atomic_write_bytes(self.root / rel, data)
            manifest["files"][rel] = hashlib.sha256(data).hexdigest()
        manifest.update(updates)
        atomic_write_json(self.root / MANIFEST, manifest)
        self.manifest = manifest


def write_bundle(
    out: str | Path,
    manifest: Mapping[str, Any],
    files: Mapping[str, Path | bytes],
    force: bool = False,
) -> Bundle:
    """Write a bundle folder atomically and return it loaded and verified.

    Args:
        out: final folder; refused if it exists unless `force`.
        manifest: every key but `schema`, `schema_version` and `files`, which are filled in.
        files: relative path -> source file or bytes.
    """
    doc = dict(manifest)
    doc["schema"], doc["schema_version"] = BUNDLE_SCHEMA, BUNDLE_VERSION
    doc.setdefault("engines", [])
    hashes: dict[str, str] = {}
    with staged_dir(out, force=force) as stage:
        for rel, src in files.items():
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
            hashes[rel] = sha256_file(dest)
        doc["files"] = hashes
        missing = [k for k in REQUIRED_KEYS if k not in doc]
        if missing:
            raise BundleError(f"write_bundle: manifest lacks {missing}")
        atomic_write_json(stage / MANIFEST, doc)
    return Bundle.load(out)
