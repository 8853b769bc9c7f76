"""The enrollment gallery: the enrolled classes, their features and the fitted head, on disk.

A gallery is one file (schema "mtl-edge.gallery", version 1): an uncompressed zip holding

    gallery.json          classes (name, count, optional source paths + sha256), the bundle's
                          model_id, head recipe, threshold, generation counter
    features.npy          stored features of shape (M, D), float16 or float32
    labels.npy            int32 class index of each row, shape (M,)
    head_weight.npy       fitted head (ways, D) float32 and head_bias.npy (ways,)
    meta_init_*.npy       the bundle's meta-learned head init, when it has one
    CHECKSUM              sha256 over every other member (name and bytes), in a fixed order

Arrays are read with `allow_pickle=False`; nothing is pickled.

Safety: every save writes a temporary sibling, fsyncs it and renames it over the file
(`mtl_edge.atomicio.atomic_write`), so a crash leaves the old gallery or the new one. Before the
rename the current file is hard-linked to `<name>.prev` (the previous generation). A truncated
or edited file fails its checksum with a message that names the `.prev` copy and the restore
command. `edit_gallery` holds `mtl_edge.atomicio.file_lock(<name>.lock)` around the whole
load-modify-save, so two processes enrolling into one gallery never lose each other's classes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

from mtl_edge.atomicio import atomic_write, file_lock, fsync_dir
from mtl_edge.errors import GalleryError
from mtl_edge.fewshot.fc import HeadRecipe, HeadWeights, fit_head, predict_proba

log = logging.getLogger(__name__)

GALLERY_SCHEMA = "mtl-edge.gallery"
GALLERY_VERSION = 1
UNKNOWN = "unknown"
FEATURE_DTYPES = ("float16", "float32")
#: Seconds to pause halfway through writing a gallery: a test hook that lets a crash test kill
#: the process mid-save. Unset in normal use.
SAVE_PAUSE_ENV = "MTL_EDGE_GALLERY_SAVE_PAUSE"
#: Upper bounds on the refits that threshold calibration runs (leave-one-example-out and
#: leave-one-class-out). Large galleries get fewer folds (never under 4 and 2), so that all
#: folds together cost about CALIBRATION_BUDGET multiply-adds (~2 s on one core).
MAX_KNOWN_FOLDS = 24
MAX_UNKNOWN_FOLDS = 8
CALIBRATION_BUDGET = 3e9
_NAME_RE = re.compile(r"^[^\x00-\x1f/\\]{1,200}$")


@dataclass(frozen=True)
class Prediction:
    """One classified image.

    Attributes:
        label: the class name, or "unknown" when the top probability is under the threshold.
        probability: the top class probability.
        known: False when rejected as unknown.
        top_k: the best `top_k` (class name, probability) pairs, best first.
    """

    label: str
    probability: float
    known: bool
    top_k: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probability": self.probability,
            "known": self.known,
            "top_k": [{"label": n, "probability": p} for n, p in self.top_k],
        }


@dataclass
class EnrolledClass:
    """One class: its features (n, D) in the gallery's storage dtype and their sources."""

    name: str
    features: np.ndarray
    sources: list[dict[str, str] | None] = field(default_factory=list)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def prev_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def check_class_name(name: str) -> str:
    """`name` if it is a valid class name, else GalleryError saying why."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name != name.strip():
        raise GalleryError(
            f"class name {name!r}: use 1-200 printable characters, no slashes and no leading or "
            "trailing spaces"
        )
    if name.lower() == UNKNOWN:
        raise GalleryError(f"class name {name!r} is reserved for rejected images; pick another")
    return name


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _checksum(members: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(members):
        h.update(name.encode() + b"\0" + len(members[name]).to_bytes(8, "little"))
        h.update(members[name])
    return h.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Gallery:
    """Enrolled classes, their stored features and the FC head fitted on them.

    Args:
        model_id: `Bundle.model_id` of the bundle whose features are stored.
        feature_dim: D.
        recipe: how to fit the head (steps, lr, init, normalize, weight_decay).
        feature_dtype: "float16" (half the size) or "float32".
        meta_init: the bundle's meta-learned head init (weight (ways, D), bias (ways,)).
        backbone: the bundle's backbone name, for messages.
    """

    def __init__(
        self,
        model_id: str,
        feature_dim: int,
        recipe: HeadRecipe | None = None,
        feature_dtype: str = "float16",
        meta_init: tuple[np.ndarray, np.ndarray] | None = None,
        backbone: str = "",
    ) -> None:
        if feature_dtype not in FEATURE_DTYPES:
            raise GalleryError(f"feature dtype {feature_dtype!r}: use float16 or float32")
        self.model_id = model_id
        self.feature_dim = int(feature_dim)
        self.recipe = recipe or HeadRecipe()
        self.feature_dtype = feature_dtype
        self.meta_init = meta_init
        self.backbone = backbone
        self.classes: dict[str, EnrolledClass] = {}
        self.head: HeadWeights | None = None
        #: "auto": recalibrated by leave-one-out at every fit; "manual": set by the user.
        self.threshold_mode = "auto"
        self.threshold = 0.0
        self.calibration: dict[str, Any] = {}
        self.generation = 0
        self.created = _now()

    # ----------------------------------------------------------------- classes

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def _features(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.feature_dim or x.shape[0] == 0:
            raise GalleryError(
                f"features of shape {x.shape}: expected (n >= 1, {self.feature_dim}) from the "
                "gallery's bundle"
            )
        if not np.all(np.isfinite(x)):
            raise GalleryError("features contain NaN or infinity; check the backbone and images")
        if self.feature_dtype == "float16" and np.abs(x).max() > np.finfo(np.float16).max:
            raise GalleryError(
                "features exceed the float16 range; create the gallery with --feature-dtype float32"
            )
        return x.astype(self.feature_dtype)

    @staticmethod
    def _sources(sources: Sequence[dict[str, str] | None] | None, n: int) -> list:
        if sources is None:
            return [None] * n
        if len(sources) != n:
            raise GalleryError(f"{len(sources)} sources for {n} feature rows")
        return list(sources)

    def add_class(
        self,
        name: str,
        features: np.ndarray,
        sources: Sequence[dict[str, str] | None] | None = None,
    ) -> None:
        """Enroll a new class from features of shape (n, D); `sources` are {path, sha256}."""
        check_class_name(name)
        if name in self.classes:
            raise GalleryError(
                f"class {name!r} is already enrolled; add images to it with --append "
                "(add_examples) or pick another name"
            )
        x = self._features(features)
        self.classes[name] = EnrolledClass(name, x, self._sources(sources, len(x)))
        self.head = None

    def add_examples(
        self,
        name: str,
        features: np.ndarray,
        sources: Sequence[dict[str, str] | None] | None = None,
    ) -> None:
        """Add feature rows of shape (n, D) to an enrolled class."""
        cls = self._get(name)
        x = self._features(features)
        cls.features = np.concatenate([cls.features, x])
        cls.sources.extend(self._sources(sources, len(x)))
        self.head = None

    def remove_class(self, name: str) -> None:
        self._get(name)
        del self.classes[name]
        self.head = None

    def rename_class(self, old: str, new: str) -> None:
        self._get(old)
        check_class_name(new)
        if new in self.classes:
            raise GalleryError(
                f"class {new!r} is already enrolled; remove it first or pick another"
            )
        # Keep the order (the head rows follow it), so renaming needs no refit.
        self.classes = {
            (new if k == old else k): (EnrolledClass(new, c.features, c.sources) if k == old else c)
            for k, c in self.classes.items()
        }

    def _get(self, name: str) -> EnrolledClass:
        if name not in self.classes:
            names = list(self.classes)
            known = ", ".join(names[:10]) + (
                f" and {len(names) - 10} more" if len(names) > 10 else ""
            )
            known = known or "none"
            raise GalleryError(f"no class {name!r} in the gallery (enrolled: {known})")
        return self.classes[name]

    def features_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored features (M, D) as float32 and their class indices (M,)."""
        if not self.classes:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros(0, np.int64)
        x = np.concatenate([c.features for c in self.classes.values()]).astype(np.float32)
        y = np.concatenate(
            [np.full(len(c.features), i) for i, c in enumerate(self.classes.values())]
        )
        return x, y.astype(np.int64)

    # -------------------------------------------------------------------- head

    def _fit(self, x: np.ndarray, y: np.ndarray, ways: int) -> HeadWeights:
        # calibration folds: a "meta" init of another class count falls back silently; fit()
        # logs the fallback once for the real head
        return self.recipe.fit(x, y, ways, self.meta_init)

    def fit(self) -> HeadWeights:
        """Fit the head on every stored feature and, in "auto" mode, recalibrate the threshold.

        Raises:
            GalleryError: the gallery has no class.
        """
        if not self.classes:
            raise GalleryError("the gallery has no classes; enroll some first")
        x, y = self.features_and_labels()
        r = self.recipe
        self.head = fit_head(
            x, y, len(self.classes), r.steps, r.lr, r.init, self.meta_init, r.normalize,
            r.weight_decay, r.loss,
        )  # fmt: skip
        if self.threshold_mode == "auto":
            self.threshold, self.calibration = self._calibrate(x, y)
        return self.head

    def set_threshold(self, value: float | None) -> None:
        """Fix the rejection threshold to `value` in [0, 1], or None to calibrate it ("auto")."""
        if value is None:
            self.threshold_mode = "auto"
            self.head = None  # the next fit recalibrates
            return
        if not 0.0 <= value <= 1.0:
            raise GalleryError(f"threshold {value}: use a probability in [0, 1], or 'auto'")
        self.threshold_mode, self.threshold = "manual", float(value)
        self.calibration = {"method": "manual"}

    def _calibrate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, Any]]:
        """Leave-one-out calibration of the open-set threshold on the enrolled data.

        Known scores: the top probability of an example held out from a head fitted on the rest
        (classes with at least 2 examples). Unknown scores: the top probability of every example
        of a class held out entirely (needs 3 classes, so that 2 remain). With both, the
        threshold maximises the balanced accuracy (known accepted + unknown rejected) / 2, ties
        to the lowest; with known scores only, it is their 5th percentile; otherwise 0 (no
        rejection). Folds are spread evenly and capped (MAX_KNOWN_FOLDS, MAX_UNKNOWN_FOLDS, fewer
        for large galleries: CALIBRATION_BUDGET).
        """
        ways = len(self.classes)
        fit_cost = 2.0 * x.size * ways * max(self.recipe.steps, 1)
        scale = min(1.0, CALIBRATION_BUDGET / (fit_cost * (MAX_KNOWN_FOLDS + MAX_UNKNOWN_FOLDS)))
        max_known = max(4, int(MAX_KNOWN_FOLDS * scale))
        max_unknown = max(2, int(MAX_UNKNOWN_FOLDS * scale))
        counts = np.bincount(y, minlength=ways)
        candidates = np.flatnonzero(counts[y] >= 2) if ways >= 2 else np.zeros(0, np.int64)
        if len(candidates) > max_known:
            candidates = candidates[np.linspace(0, len(candidates) - 1, max_known).astype(int)]
        known = []
        for i in candidates:
            keep = np.arange(len(y)) != i
            head = self._fit(x[keep], y[keep], ways)
            known.append(float(predict_proba(x[i : i + 1], head).max()))
        unknown = []
        if ways >= 3:
            held = np.linspace(0, ways - 1, min(ways, max_unknown)).astype(int)
            for c in np.unique(held):
                keep = y != c
                relabel = np.where(y[keep] > c, y[keep] - 1, y[keep])
                head = self._fit(x[keep], relabel, ways - 1)
                unknown.extend(predict_proba(x[y == c], head).max(axis=1).tolist())
        stats: dict[str, Any] = {"method": "leave-one-out", "known": len(known)}
        stats["unknown"] = len(unknown)
        if known and unknown:
            k, u = np.asarray(known), np.asarray(unknown)
            scores = np.unique(np.concatenate([k, u]))
            cuts = np.concatenate([[0.0], (scores[:-1] + scores[1:]) / 2, [scores[-1] + 1e-6]])
            balanced = [(np.mean(k >= t) + np.mean(u < t)) / 2 for t in cuts]
            threshold = float(cuts[int(np.argmax(balanced))])
            stats["known_accepted"] = float(np.mean(k >= threshold))
            stats["unknown_rejected"] = float(np.mean(u < threshold))
        elif known:
            threshold = float(np.quantile(known, 0.05))
            stats["known_accepted"] = float(np.mean(np.asarray(known) >= threshold))
        else:
            threshold = 0.0
            stats["note"] = "too little data: enroll 2+ images per class to enable rejection"
        return min(threshold, 1.0), stats

    def predict(
        self, features: np.ndarray, top_k: int = 1, threshold: float | None = None
    ) -> list[Prediction]:
        """Classify features of shape (N, D) with open-set rejection.

        Args:
            top_k: how many (class, probability) pairs to return per image.
            threshold: overrides the stored threshold for this call.

        Raises:
            GalleryError: the gallery is empty, or the features have another size.
        """
        if not self.classes:
            raise GalleryError("the gallery has no classes; enroll some before predicting")
        if self.head is None:
            self.fit()
        assert self.head is not None
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise GalleryError(f"features of shape {x.shape}: expected (N, {self.feature_dim})")
        if top_k < 1:
            raise GalleryError(f"--top-k {top_k}: must be at least 1")
        cut = self.threshold if threshold is None else threshold
        proba = predict_proba(x, self.head)
        names = self.class_names
        order = np.argsort(-proba, axis=1, kind="stable")[:, :top_k]
        out = []
        for row, idx in zip(proba, order, strict=True):
            top = [(names[j], float(row[j])) for j in idx]
            known = top[0][1] >= cut
            out.append(Prediction(top[0][0] if known else UNKNOWN, top[0][1], known, top))
        return out

    # ------------------------------------------------------------ persistence

    def _members(self) -> dict[str, bytes]:
        if self.classes and self.head is None:
            self.fit()
        x = [c.features for c in self.classes.values()]
        features = np.concatenate(x) if x else np.zeros((0, self.feature_dim), self.feature_dtype)
        _, labels = self.features_and_labels()
        members = {
            "features.npy": _npy_bytes(features.astype(self.feature_dtype)),
            "labels.npy": _npy_bytes(labels.astype(np.int32)),
        }
        if self.head is not None:
            members["head_weight.npy"] = _npy_bytes(self.head.weight)
            members["head_bias.npy"] = _npy_bytes(self.head.bias)
        if self.meta_init is not None:
            members["meta_init_weight.npy"] = _npy_bytes(self.meta_init[0].astype(np.float32))
            members["meta_init_bias.npy"] = _npy_bytes(self.meta_init[1].astype(np.float32))
        doc = {
            "schema": GALLERY_SCHEMA,
            "schema_version": GALLERY_VERSION,
            "model_id": self.model_id,
            "backbone": self.backbone,
            "feature_dim": self.feature_dim,
            "feature_dtype": self.feature_dtype,
            "recipe": self.recipe.to_dict(),
            "classes": [
                {"name": c.name, "count": len(c.features), "sources": c.sources}
                for c in self.classes.values()
            ],
            "head": None
            if self.head is None
            else {"normalize": self.head.normalize, "init": self.head.init},
            "threshold": {
                "value": self.threshold,
                "mode": self.threshold_mode,
                "calibration": self.calibration,
            },
            "generation": self.generation,
            "created": self.created,
            "modified": _now(),
        }
        members["gallery.json"] = json.dumps(doc, indent=1, sort_keys=True).encode()
        return members

    def to_bytes(self) -> bytes:
        """The gallery file's content (see the module docstring)."""
        members = self._members()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name in sorted(members):
                zf.writestr(name, members[name])
            zf.writestr("CHECKSUM", _checksum(members) + "\n")
        return buf.getvalue()

    def save(self, path: str | Path) -> None:
        """Write atomically, keeping the current file as `<path>.prev`.

        Call it inside `edit_gallery` (which holds the lock); a bare save from two processes
        at once could lose one of them.
        """
        path = Path(path)
        self.generation += 1
        data = self.to_bytes()
        _remove_stale_temps(path)
        if path.exists():
            _keep_previous(path)
        pause = float(os.environ.get(SAVE_PAUSE_ENV, "0") or 0)

        def write(f: IO[bytes]) -> None:
            half = len(data) // 2
            f.write(data[:half])
            if pause > 0:
                f.flush()
                time.sleep(pause)
            f.write(data[half:])

        atomic_write(path, write)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<gallery>") -> Gallery:
        """Parse and verify a gallery file's content.

        Raises:
            GalleryError: not a gallery, truncated, checksum mismatch, other schema version.
        """
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = {n: zf.read(n) for n in zf.namelist()}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise _Corrupt(f"not a readable gallery file ({e})") from None
        stored = members.pop("CHECKSUM", b"").decode(errors="replace").strip()
        if not stored:
            raise _Corrupt("no CHECKSUM member")
        if _checksum(members) != stored:
            raise _Corrupt("checksum mismatch: the file was modified or damaged")
        try:
            doc = json.loads(members["gallery.json"])
        except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Corrupt(f"bad gallery.json ({e})") from None
        if doc.get("schema") != GALLERY_SCHEMA:
            raise GalleryError(f"{name}: not an mtl-edge gallery")
        if doc.get("schema_version") != GALLERY_VERSION:
            raise GalleryError(
                f"{name}: gallery format version {doc.get('schema_version')}, this mtl-edge "
                f"reads {GALLERY_VERSION}; upgrade mtl-edge or re-enroll"
            )
        return cls._from_members(doc, members)

    @classmethod
    def _from_members(cls, doc: dict[str, Any], members: dict[str, bytes]) -> Gallery:
        def array(member: str) -> np.ndarray:
            try:
                return np.load(io.BytesIO(members[member]), allow_pickle=False)
            except (KeyError, ValueError, OSError) as e:
                raise _Corrupt(f"bad member {member} ({e})") from None

        meta = None
        if "meta_init_weight.npy" in members:
            meta = (array("meta_init_weight.npy"), array("meta_init_bias.npy"))
        recipe = HeadRecipe(**doc["recipe"])
        g = cls(doc["model_id"], doc["feature_dim"], recipe, doc["feature_dtype"], meta)
        g.backbone = doc.get("backbone", "")
        features, labels = array("features.npy"), array("labels.npy")
        counts = [c["count"] for c in doc["classes"]]
        if features.shape != (sum(counts), g.feature_dim) or labels.shape != (sum(counts),):
            raise _Corrupt("features do not match the class list")
        start = 0
        for i, c in enumerate(doc["classes"]):
            rows = features[start : start + c["count"]]
            if not np.all(labels[start : start + c["count"]] == i):
                raise _Corrupt("labels do not match the class list")
            g.classes[c["name"]] = EnrolledClass(c["name"], rows, list(c["sources"]))
            start += c["count"]
        if doc["head"] is not None:
            g.head = HeadWeights(
                array("head_weight.npy"),
                array("head_bias.npy"),
                doc["head"]["normalize"],
                doc["head"]["init"],
            )
        g.threshold = float(doc["threshold"]["value"])
        g.threshold_mode = doc["threshold"]["mode"]
        g.calibration = doc["threshold"]["calibration"]
        g.generation, g.created = int(doc["generation"]), doc["created"]
        return g

    @classmethod
    def load(cls, path: str | Path, model_id: str | None = None) -> Gallery:
        """Read and verify a gallery file.

        Args:
            model_id: when given, refuse a gallery built with another bundle.

        Raises:
            GalleryError: missing, corrupt (names the .prev copy and how to restore it), or
                built with another model.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise GalleryError(
                f"{path}: no such gallery; create it with `mtl-edge enroll --gallery {path} ...`"
            ) from None
        except IsADirectoryError:
            raise GalleryError(f"{path}: is a directory; --gallery takes a file name") from None
        try:
            gallery = cls.from_bytes(data, str(path))
        except _Corrupt as e:
            raise GalleryError(f"{path}: corrupt gallery ({e}); {_restore_hint(path)}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise GalleryError(
                f"{path}: corrupt gallery (bad field {e}); {_restore_hint(path)}"
            ) from None
        if model_id is not None and gallery.model_id != model_id:
            raise GalleryError(
                f"{path}: built with another model (model_id {gallery.model_id[:12]}, this "
                f"bundle's is {model_id[:12]}); use the bundle it was built with, or re-extract "
                f"its stored images with `mtl-edge gallery reextract {path} --bundle BUNDLE`"
            )
        return gallery

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: classes and counts, model, head, threshold."""
        return {
            "classes": [{"name": c.name, "count": len(c.features)} for c in self.classes.values()],
            "examples": sum(len(c.features) for c in self.classes.values()),
            "model_id": self.model_id,
            "backbone": self.backbone,
            "feature_dim": self.feature_dim,
            "feature_dtype": self.feature_dtype,
            "recipe": self.recipe.to_dict(),
            "head_init": None if self.head is None else self.head.init,
            "threshold": self.threshold,
            "threshold_mode": self.threshold_mode,
            "calibration": self.calibration,
            "generation": self.generation,
            "created": self.created,
        }


class _Corrupt(Exception):
    """Internal: the file's bytes are damaged; `load` turns it into a GalleryError."""


def _restore_hint(path: Path) -> str:
    prev = prev_path(path)
    if prev.is_file():
        try:
            Gallery.from_bytes(prev.read_bytes())
            return (
                f"the previous good copy is {prev}: restore it with "
                f"`mtl-edge gallery restore {path}`"
            )
        except (_Corrupt, GalleryError, KeyError, TypeError, ValueError):
            pass
    return "no good previous copy exists; re-enroll the classes"


def _keep_previous(path: Path) -> None:
    """Make `<path>.prev` the current file (hard link, or a copy where links fail), atomically."""
    prev = prev_path(path)
    if prev.exists() and os.path.samefile(path, prev):
        # Already linked (a save after a crashed one); rename() between two links of one file
        # would do nothing and leave the temporary name behind.
        return
    tmp = path.with_name(f".{prev.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, prev)
    fsync_dir(path.parent)


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files a crashed save left behind (safe: the caller holds the lock)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def edit_gallery(
    path: str | Path,
    new: Gallery | None = None,
    model_id: str | None = None,
    timeout_s: float = 60.0,
) -> Iterator[Gallery]:
    """Lock, load (or start from `new` when the file does not exist), yield, refit, save.

    An exception inside the block saves nothing. The head is refitted before saving when the
    block changed the classes.

    Raises:
        GalleryError: no file and no `new`, or the file is corrupt or from another model.
    """
    path = Path(path)
    with file_lock(lock_path(path), timeout_s=timeout_s):
        if path.exists():
            gallery = Gallery.load(path, model_id)
        elif new is not None:
            gallery = new
        else:
            raise GalleryError(f"{path}: no such gallery")
        yield gallery
        if gallery.classes and gallery.head is None:
            gallery.fit()
        gallery.save(path)


def restore_previous(path: str | Path) -> Path:
    """Put `<path>.prev` back in place of a damaged gallery; the damaged file is kept aside.

    Returns:
        where the replaced file was moved (`<path>.damaged-<time>`), or the path itself if
        there was none.

    Raises:
        GalleryError: no previous copy, or it is damaged too.
    """
    path = Path(path)
    prev = prev_path(path)
    with file_lock(lock_path(path)):
        if not prev.is_file():
            raise GalleryError(f"{prev}: no previous copy to restore")
        data = prev.read_bytes()
        try:
            Gallery.from_bytes(data, str(prev))
        except _Corrupt as e:
            raise GalleryError(f"{prev}: the previous copy is damaged too ({e})") from None
        aside = path
        if path.exists():
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
        atomic_write(path, lambda f: f.write(data))
        return aside
