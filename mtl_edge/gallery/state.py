"""The enrolled state: classes, their stored features, the fitted FC head and predictions.

`Gallery` holds everything in memory; `mtl_edge.gallery.storage` reads and writes it (one
versioned, checksummed zip, validated on load) and `mtl_edge.gallery.calibration` sets the
open-set threshold. `Gallery.load` / `Gallery.save` delegate to the storage module.

A gallery records the bundle's `model_id` and the variant ("fp32", "int8-cpu", ...) whose
features it stores, and refuses features of another model or variant: they live in another
feature space (`mtl-edge gallery reextract` rebuilds it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.errors import GalleryError, shown
from mtl_edge.fewshot.fc import HeadRecipe, HeadWeights, fit_head, predict_proba
from mtl_edge.gallery.calibration import (
    DEFAULT_REJECTION,
    NEW_GALLERY_REJECTION,
    REJECTIONS,
    calibrate_threshold,
    max_cosine,
    prototypes,
)

UNKNOWN = "unknown"
MODEL_ID_FORMAT = 2
FEATURE_DTYPES = ("float16", "float32")
MAX_FEATURE_DIM = 65_536
MAX_META_WAYS = 10_000
MAX_PATH_CHARS = 4096
_TEXT_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
_VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,200}$")


@dataclass(frozen=True)
class Prediction:
    """One classified image.

    Attributes:
        label: the class name, or "unknown" when the rejection score is under the threshold.
        probability: the top class probability.
        known: False when rejected as unknown.
        top_k: the best `top_k` (class name, probability) pairs, best first.
        score: what the threshold was compared with: the top probability under the
            "probability" rejection rule, the largest prototype cosine under "cosine".
    """

    label: str
    probability: float
    known: bool
    top_k: list[tuple[str, float]]
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probability": self.probability,
            "known": self.known,
            "score": self.probability if self.score is None else self.score,
            "top_k": [{"label": n, "probability": p} for n, p in self.top_k],
        }


@dataclass
class EnrolledClass:
    """One class: its features (n, D) in the gallery's storage dtype and their sources."""

    name: str
    features: np.ndarray
    sources: list[dict[str, str] | None] = field(default_factory=list)


def check_class_name(name: str) -> str:
    """`name` if it is a valid class name, else GalleryError saying why."""
    if (
        not isinstance(name, str)
        or not _NAME_RE.match(name)
        or not name.isprintable()  # also refuses U+2028, NEL: line breaks to terminals
        or name != name.strip()
    ):
        raise GalleryError(
            f"class name {str(name)[:60]!r}: use 1-200 printable characters, no slashes and no "
            "leading or trailing spaces"
        )
    if name.lower() == UNKNOWN:
        raise GalleryError(f"class name {name!r} is reserved for rejected images; pick another")
    return name


def check_source(source: Any) -> dict[str, str] | None:
    """`source` as stored: None, or {"path": absolute path, "sha256": lowercase hex}."""
    if source is None:
        return None
    if not isinstance(source, dict) or set(source) != {"path", "sha256"}:
        raise GalleryError("an image source must be {path, sha256} or null")
    path, digest = source["path"], source["sha256"]
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or len(path) > MAX_PATH_CHARS
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in path)
    ):
        raise GalleryError("an image source path must be absolute, of printable characters")
    if not isinstance(digest, str) or not _SHA256_RE.match(digest):
        raise GalleryError("an image source sha256 must be 64 lowercase hex digits")
    return {"path": path, "sha256": digest}


def _check_identity(model_id: Any, feature_dim: Any, backbone: Any, variant: Any) -> None:
    if not isinstance(model_id, str) or not _TEXT_RE.match(model_id) or not model_id.isprintable():
        raise GalleryError("model_id must be 1-200 printable characters")
    if not isinstance(feature_dim, int | np.integer) or not 1 <= feature_dim <= MAX_FEATURE_DIM:
        raise GalleryError(
            f"feature_dim {shown(feature_dim)}: use an integer in 1..{MAX_FEATURE_DIM}"
        )
    if not isinstance(backbone, str) or not (
        backbone == "" or (_TEXT_RE.match(backbone) and backbone.isprintable())
    ):
        raise GalleryError("backbone must be up to 200 printable characters")
    if variant is not None and not (isinstance(variant, str) and _VARIANT_RE.match(variant)):
        raise GalleryError(f"variant {str(variant)[:40]!r}: not a bundle variant name")


def _check_meta(meta: Any, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    if meta is None:
        return None
    weight, bias = (np.asarray(a, dtype=np.float32) for a in meta)
    ways = weight.shape[0] if weight.ndim == 2 else 0
    if weight.shape != (ways, dim) or bias.shape != (ways,) or not 1 <= ways <= MAX_META_WAYS:
        raise GalleryError(
            f"meta init of shapes {weight.shape}, {bias.shape}: need (k, {dim}), (k,)"
        )
    if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
        raise GalleryError("meta init holds NaN or infinity")
    return weight, bias


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the gallery's timestamps)."""
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
        variant: the bundle variant that extracted the features ("fp32", "int8-cpu", ...);
            None when not recorded (then any variant is accepted).
        rejection: the open-set rule, "probability" or "cosine"
            (`mtl_edge.gallery.calibration`); a gallery file without the setting is
            "probability".
    """

    def __init__(
        self,
        model_id: str,
        feature_dim: int,
        recipe: HeadRecipe | None = None,
        feature_dtype: str = "float16",
        meta_init: tuple[np.ndarray, np.ndarray] | None = None,
        backbone: str = "",
        variant: str | None = None,
        rejection: str = NEW_GALLERY_REJECTION,
    ) -> None:
        if feature_dtype not in FEATURE_DTYPES:
            raise GalleryError(f"feature dtype {feature_dtype!r}: use float16 or float32")
        # What a save writes, a load must accept: the same checks as `validate`.
        _check_identity(model_id, feature_dim, backbone, variant)
        self.model_id = model_id
        self.feature_dim = int(feature_dim)
        self.recipe = recipe or HeadRecipe()
        self.feature_dtype = feature_dtype
        self.meta_init = _check_meta(meta_init, self.feature_dim)
        self.backbone = backbone
        self.variant = variant
        self.classes: dict[str, EnrolledClass] = {}
        self.head: HeadWeights | None = None
        #: "auto": recalibrated by leave-one-out at every fit; "manual": set by the user.
        self.threshold_mode = "auto"
        self.threshold = 0.0
        self.rejection = DEFAULT_REJECTION
        self.set_rejection(rejection)
        self.calibration: dict[str, Any] = {}
        self.generation = 0
        self.created = now()
        #: How `model_id` was computed: 1 by mtl-edge before 0.2 (FP32 file + preprocessing),
        #: 2 over the whole manifest. A gallery of format 1 must be re-extracted.
        self.model_id_format = MODEL_ID_FORMAT

    # ----------------------------------------------------------------- classes

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def _features(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features)
        if x.dtype.kind not in "fiu":
            raise GalleryError(f"features of dtype {x.dtype}: expected numbers")
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
        return [check_source(s) for s in sources]

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

    def set_rejection(self, rule: str) -> None:
        """Use the open-set rule `rule` ("probability" or "cosine"). A change of rule makes
        the threshold "auto" again: a threshold set for one score means nothing for the other.
        """
        if not isinstance(rule, str) or rule not in REJECTIONS:
            raise GalleryError(f"rejection {shown(rule)}: use one of {', '.join(REJECTIONS)}")
        if rule != self.rejection:
            self.rejection = rule
            self.set_threshold(None)

    def _calibrate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, Any]]:
        """Leave-one-out calibration (`mtl_edge.gallery.calibration.calibrate_threshold`)."""
        return calibrate_threshold(
            x, y, len(self.classes), self.recipe.steps, self._fit, self.rejection
        )

    def scores(self, features: np.ndarray, proba: np.ndarray) -> np.ndarray:
        """Rejection scores (N,) of features (N, D) whose head probabilities are (N, ways)."""
        if self.rejection == "cosine":
            x, y = self.features_and_labels()
            return max_cosine(features, prototypes(x, y, len(self.classes)))
        return proba.max(axis=1).astype(np.float64)

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
        if not np.all(np.isfinite(x)):
            raise GalleryError("features contain NaN or infinity; check the backbone and images")
        if top_k < 1:
            raise GalleryError(f"--top-k {top_k}: must be at least 1")
        cut = self.threshold if threshold is None else threshold
        if not 0.0 <= cut <= 1.0:
            raise GalleryError(f"threshold {cut}: use a probability in [0, 1]")
        proba = predict_proba(x, self.head)
        scores = self.scores(x, proba)
        names = self.class_names
        order = np.argsort(-proba, axis=1, kind="stable")[:, :top_k]
        out = []
        for row, idx, score in zip(proba, order, scores, strict=True):
            top = [(names[j], float(row[j])) for j in idx]
            score = top[0][1] if self.rejection == DEFAULT_REJECTION else float(score)
            known = score >= cut
            out.append(Prediction(top[0][0] if known else UNKNOWN, top[0][1], known, top, score))
        return out

    # ------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        """The gallery file's content (`mtl_edge.gallery.storage`); fits the head if needed."""
        from mtl_edge.gallery import storage

        return storage.gallery_bytes(self)

    def save(self, path: str | Path) -> None:
        """Write atomically, keeping the current file as `<path>.prev` (`storage.save`).

        Call it inside `edit_gallery` (which holds the lock); a bare save from two processes
        at once could lose one of them.
        """
        from mtl_edge.gallery import storage

        storage.save(self, Path(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<gallery>") -> Gallery:
        """Parse and validate a gallery file's content (`storage.parse`).

        Raises:
            GalleryError: not a gallery, damaged, invalid, or of another format version.
        """
        from mtl_edge.gallery import storage

        return storage.parse(data, name)

    @classmethod
    def load(
        cls, path: str | Path, model_id: str | None = None, variant: str | None = None
    ) -> Gallery:
        """Read and validate a gallery file (`storage.load`).

        Args:
            model_id: when given, refuse a gallery built with another bundle.
            variant: when given, refuse a gallery whose features another variant extracted.
        """
        from mtl_edge.gallery import storage

        return storage.load(Path(path), model_id, variant)

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: classes and counts, model, head, threshold."""
        return {
            "classes": [{"name": c.name, "count": len(c.features)} for c in self.classes.values()],
            "examples": sum(len(c.features) for c in self.classes.values()),
            "model_id": self.model_id,
            "backbone": self.backbone,
            "variant": self.variant,
            "feature_dim": self.feature_dim,
            "feature_dtype": self.feature_dtype,
            "recipe": self.recipe.to_dict(),
            "head_init": None if self.head is None else self.head.init,
            "threshold": self.threshold,
            "threshold_mode": self.threshold_mode,
            "rejection": self.rejection,
            "calibration": self.calibration,
            "generation": self.generation,
            "created": self.created,
        }
