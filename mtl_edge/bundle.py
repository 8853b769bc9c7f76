"""The model bundle: the contract between the workstation that exports and the device.

A bundle is a folder:

    manifest.json          everything needed to use the model (schema below)
    backbone.onnx          folded FP32 backbone: `images` (N, C, H, W) -> `features` (N, D)
    backbone.*.onnx        optional variants (fp16, int8 for TensorRT, int8-cpu for onnxruntime)
    head_init_weight.npy   optional meta-learned FC initialisation, shape (ways, D)
    head_init_bias.npy     optional, shape (ways,)
    engines/*.plan         optional TensorRT engines, keyed by GPU and TensorRT version
    signature.json         optional Ed25519 signature of the model_id (`mtl_edge.signing`)

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

Loading checks every field (`mtl_edge.manifest.check_manifest`) and every hash, so a tampered,
malformed or half-copied bundle is refused with one line naming the file. `model_id` covers the
whole manifest (`mtl_edge.manifest.model_id`). Writing goes through a staging folder renamed
into place.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge import manifest as schema
from mtl_edge.atomicio import atomic_write_bytes, atomic_write_json, staged_dir
from mtl_edge.errors import BundleError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.jsonfile import json_safe, read_json_document
from mtl_edge.npyfile import parse_npy
from mtl_edge.preprocess import Preprocess
from mtl_edge.safefile import open_regular, read_regular

BUNDLE_SCHEMA = "mtl-edge.bundle"
BUNDLE_VERSION = 1
MANIFEST = schema.MANIFEST
REQUIRED_KEYS = schema.REQUIRED_KEYS
#: Largest file a bundle may list (ONNX protobufs stop at 2 GiB) and largest head init file.
MAX_FILE_BYTES = 4 << 30
MAX_NPY_BYTES = 256 << 20
_FIX = "copy or export the bundle again"


class Bundle:
    """A verified model bundle on disk. Use `Bundle.load(path)`."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._preprocess, self._head = schema.check_manifest(manifest, root / MANIFEST)

    @classmethod
    def load(
        cls, root: str | Path, verify: bool = True, trusted_key: str | Path | None = None
    ) -> Bundle:
        """Read and check a bundle.

        Args:
            verify: check every listed file's sha256 (always on for the device commands).
            trusted_key: a public key file (PEM); when given, the bundle must carry a valid
                Ed25519 signature by that key (`mtl_edge.signing`).

        Raises:
            BundleError: missing folder or manifest, wrong schema, a field of the wrong type or
                range, a path outside the bundle, a listed file absent or with another sha256,
                a missing or bad signature. UnavailableError: signing needs `cryptography`.
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
        bundle = cls(root, manifest)
        if verify or trusted_key is not None:
            bundle.verify()
        if trusted_key is not None:
            from mtl_edge.signing import verify_bundle

            verify_bundle(bundle, trusted_key)
        return bundle

    def file_path(self, rel: str) -> Path:
        """The path of a listed file, refused unless it is a regular file inside the bundle
        (a symlink may point elsewhere inside it, never out of it)."""
        path = self.root / schema.check_relpath(rel)
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        if not real.startswith(root + os.sep):
            raise BundleError(f"{path}: points outside the bundle folder; {_FIX}")
        return path

    def verify(self) -> None:
        """Check that every listed file is a regular file inside the bundle with its sha256."""
        for rel, digest in sorted(self.manifest["files"].items()):
            path = self.file_path(rel)
            missing = "listed in the manifest but missing; copy the whole bundle again"
            with open_regular(path, BundleError, _FIX, missing=missing) as f:
                if os.fstat(f.fileno()).st_size > MAX_FILE_BYTES:
                    raise BundleError(f"{path}: larger than {MAX_FILE_BYTES} bytes; {_FIX}")
                h = hashlib.sha256()
                while block := f.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != digest:
                raise BundleError(
                    f"{path}: sha256 does not match the manifest (modified or "
                    "corrupt); copy or export the bundle again"
                )

    @property
    def backbone_name(self) -> str:
        return str(self.manifest["backbone"]["name"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["backbone"]["feature_dim"])

    @property
    def preprocess(self) -> Preprocess:
        return self._preprocess

    @property
    def head(self) -> HeadRecipe:
        return self._head

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
        return self.file_path(self.manifest["variants"][variant]["file"])

    def _npy(self, rel: str, shape: tuple[int, ...]) -> np.ndarray:
        path = self.file_path(rel)
        data = read_regular(path, MAX_NPY_BYTES, BundleError, _FIX)
        try:
            array = parse_npy(data, ("<f4", "<f8"))
        except ValueError as e:
            raise BundleError(f"{path}: not a usable array ({e}); {_FIX}") from None
        if array.shape != shape or not np.all(np.isfinite(array)):
            raise BundleError(
                f"{path}: expected finite values of shape {shape}, got {array.shape}; {_FIX}"
            )
        return array.astype(np.float32)

    def meta_init(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The meta-learned FC initialisation: (weight (ways, D), bias (ways,)), or None.

        Raises:
            BundleError: a file that is not a finite float array of the manifest's shape.
        """
        meta = self.manifest["head"].get("meta_init")
        if not meta:
            return None
        ways = int(meta["ways"])
        weight = self._npy(meta["weight"], (ways, self.feature_dim))
        return weight, self._npy(meta["bias"], (ways,))

    @property
    def model_id(self) -> str:
        """Identifies the bundle: sha256 of its canonical manifest, every variant and file hash
        included (`mtl_edge.manifest.model_id`). Galleries store it and refuse another."""
        return schema.model_id(self.manifest)

    @property
    def legacy_model_id(self) -> str | None:
        """The model_id older mtl-edge versions computed for this bundle (for messages)."""
        return schema.legacy_model_id(self.manifest)

    def add_files(self, files: Mapping[str, Path | bytes], updates: Mapping[str, Any]) -> None:
        """Add files (e.g. a TensorRT engine built on the device) and update manifest keys.

        Each file is written atomically; the manifest is replaced last, so a crash leaves the
        previous, still valid manifest in place.

        Raises:
            BundleError: a name that is not a plain relative path, or an invalid result.
        """
        manifest = dict(self.manifest)
        manifest["files"] = dict(manifest["files"])
        for rel, src in files.items():
            _checked_name(rel)
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            atomic_write_bytes(self.root / rel, data)
            manifest["files"][rel] = hashlib.sha256(data).hexdigest()
        manifest.update(updates)
        manifest = json_safe(manifest)
        preprocess, head = schema.check_manifest(manifest, self.root / MANIFEST)
        atomic_write_json(self.root / MANIFEST, manifest)
        self.manifest, self._preprocess, self._head = manifest, preprocess, head


def _checked_name(rel: str) -> str:
    try:
        return schema.check_relpath(rel)
    except ValueError as e:
        raise BundleError(f"bundle file name: {e}") from None


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

    Raises:
        BundleError: a missing key, a field the device would refuse, or a bad file name.
    """
    doc = dict(manifest)
    doc["schema"], doc["schema_version"] = BUNDLE_SCHEMA, BUNDLE_VERSION
    doc.setdefault("engines", [])
    for rel in files:
        _checked_name(rel)
    hashes: dict[str, str] = {}
    with staged_dir(out, force=force) as stage:
        for rel, src in files.items():
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            dest.write_bytes(data)
            hashes[rel] = hashlib.sha256(data).hexdigest()
        doc["files"] = hashes
        missing = [k for k in REQUIRED_KEYS if k not in doc]
        if missing:
            raise BundleError(f"write_bundle: manifest lacks {missing}")
        doc = json_safe(doc)
        schema.check_manifest(doc, Path(out) / MANIFEST)
        atomic_write_json(stage / MANIFEST, doc)
    return Bundle.load(out)
