"""`Enroller`: the Python API that applications use to enroll classes and classify images.

It ties a model bundle (feature extraction, preprocessing, head recipe) to a gallery file:

    from mtl_edge.enroller import Enroller

    enroller = Enroller("bundles/mini-resnet12", "shop.gallery")
    enroller.enroll_folder("photos/")            # one sub-folder per class
    for p in enroller.predict(["new.jpg"], top_k=3):
        print(p.label, p.probability)            # "unknown" when rejected

Features are extracted outside the gallery lock (it can take a while); the lock is held only
for the short load-modify-save, so other processes are not blocked by a long enrollment.

Each image file is read once, as bytes: their sha256 is what the gallery stores, and what
`reextract` requires before it decodes a stored path again. The backbone's output is checked
where it appears: a variant that fails on the bundle's own input shape, or gives NaN or
infinite features, is refused with one line instead of producing "unknown (nan)".
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.atomicio import file_lock
from mtl_edge.backends.base import FeatureExtractor
from mtl_edge.bundle import Bundle
from mtl_edge.data.folders import IMAGE_EXTENSIONS, images_in, list_class_dirs
from mtl_edge.errors import (
    BundleError,
    DatasetError,
    GalleryError,
    ImageError,
    MtlEdgeError,
    one_line,
)
from mtl_edge.gallery import Gallery, Prediction, check_class_name, edit_gallery, lock_path
from mtl_edge.gallery.storage import require_variant
from mtl_edge.preprocess import MAX_IMAGE_FILE_BYTES, decode_image, preprocess_image
from mtl_edge.safefile import in_pseudo_fs, read_regular

log = logging.getLogger(__name__)

#: Progress callback: (images done, images total).
ProgressFn = Callable[[int, int], None]
ImageSource = str | Path | bytes | np.ndarray


def _read_image_file(path: str | Path) -> bytes:
    return read_regular(path, MAX_IMAGE_FILE_BYTES, ImageError, "pass an image file")


class Enroller:
    """Enroll classes into a gallery and classify images with a bundle.

    Args:
        bundle_path: a model bundle folder (its files are verified against their hashes).
        gallery_path: the gallery file; created by the first enrollment.
        backend: "auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda" or "tensorrt".
        precision: "fp32", "fp16", "int8" or "int8-cpu" (the bundle variant).
        threads: onnxruntime intra-op threads (None: its default).
        batch_size: images per backbone run.
        feature_dtype: how a new gallery stores features, "float16" or "float32".
        store_sources: keep each image's path and sha256 (needed by `reextract`).
        progress: called with (done, total) while images are processed.
        trusted_key: a public key file; when given the bundle must be signed by it
            (`mtl_edge.signing`).
    """

    def __init__(
        self,
        bundle_path: str | Path,
        gallery_path: str | Path,
        backend: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        batch_size: int = 32,
        feature_dtype: str = "float16",
        store_sources: bool = True,
        progress: ProgressFn | None = None,
        trusted_key: str | Path | None = None,
    ) -> None:
        self.bundle = Bundle.load(bundle_path, trusted_key=trusted_key)
        self.gallery_path = Path(gallery_path)
        self.backend, self.precision = backend, precision
        self.threads, self.batch_size = threads, batch_size
        self.feature_dtype = feature_dtype
        self.store_sources = store_sources
        self.progress = progress
        self._extractor: FeatureExtractor | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        """The feature extractor, created on first use (gallery edits do not need one)."""
        if self._extractor is None:
            from mtl_edge.backends.select import create_backend

            self._extractor = create_backend(
                self.backend, self.bundle, self.precision, self.threads, self.batch_size
            )
        return self._extractor

    @property
    def variant(self) -> str:
        """The bundle variant that extracts features (creates the extractor)."""
        return self.extractor.precision

    # --------------------------------------------------------------- features

    def _run_backbone(self, batch: np.ndarray, first: str) -> np.ndarray:
        """Features (n, D) of preprocessed images (n, C, H, W), checked to be finite."""
        where = f"{self.bundle.root} ({self.variant} variant)"
        try:
            out = self.extractor.extract(batch)
        except MtlEdgeError:
            raise
        except Exception as e:  # noqa: BLE001 - the runtimes raise their own types
            detail = one_line(e)
            raise BundleError(
                f"{where}: the backbone fails on inputs of shape {tuple(batch.shape)} made by "
                f"the manifest's preprocess ({detail}); the manifest does not match the model, "
                "export the bundle again"
            ) from None
        out = np.asarray(out)
        if out.shape != (len(batch), self.bundle.feature_dim):
            raise BundleError(
                f"{where}: the backbone gave features of shape {out.shape}, expected "
                f"({len(batch)}, {self.bundle.feature_dim}); export the bundle again"
            )
        if not np.all(np.isfinite(out)):
            raise BundleError(
                f"{where}: the backbone gave NaN or infinite features (batch starting at "
                f"{first}); the variant is broken: export the bundle again or use another "
                "--precision"
            )
        return out.astype(np.float32, copy=False)

    def _decode(self, source: ImageSource, expected_sha256: str | None) -> tuple[Any, str | None]:
        """The decoded image and the sha256 of the file it came from (None for bytes/arrays)."""
        cfg = self.bundle.preprocess
        if isinstance(source, str | Path):
            data = _read_image_file(source)
            digest = hashlib.sha256(data).hexdigest()
            if expected_sha256 is not None and digest != expected_sha256:
                raise GalleryError(
                    f"{source}: changed since it was enrolled (sha256 differs), so it is not "
                    "used; re-enroll its class from the current images"
                )
            return decode_image(data, cfg.color_mode, name=str(source)), digest
        return decode_image(source, cfg.color_mode), None

    def _extract(
        self,
        sources: Sequence[ImageSource],
        skip_unreadable: bool = False,
        expected: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, list[int], list[str | None]]:
        cfg = self.bundle.preprocess
        features: list[np.ndarray] = []
        used: list[int] = []
        digests: list[str | None] = []
        batch: list[np.ndarray] = []
        total = len(sources)
        for i, source in enumerate(sources):
            try:
                img, digest = self._decode(source, None if expected is None else expected[i])
                batch.append(preprocess_image(img, cfg))
                used.append(i)
                digests.append(digest)
            except ImageError as e:
                if not skip_unreadable:
                    raise
                log.warning("skipped: %s", e)
            if len(batch) == self.batch_size or (i == total - 1 and batch):
                start = sources[used[len(used) - len(batch)]]
                first = str(start) if isinstance(start, str | Path) else f"image {i}"
                features.append(self._run_backbone(np.stack(batch), first))
                batch = []
            if self.progress is not None:
                self.progress(i + 1, total)
        if not features:
            return np.zeros((0, self.bundle.feature_dim), np.float32), used, digests
        return np.concatenate(features), used, digests

    def extract(
        self, sources: Sequence[ImageSource], skip_unreadable: bool = False
    ) -> tuple[np.ndarray, list[int]]:
        """Decode, preprocess (the bundle's settings) and extract features.

        Args:
            sources: image paths, encoded bytes or uint8 arrays (H, W[, C]).
            skip_unreadable: log a warning and skip an image that cannot be decoded, instead
                of raising.

        Returns:
            (features of shape (n, D) float32, indices into `sources` of the n images used).

        Raises:
            ImageError: an unreadable image when not `skip_unreadable`.
            BundleError: the backbone fails or gives non-finite features.
        """
        features, used, _ = self._extract(sources, skip_unreadable)
        return features, used

    def _class_features(
        self,
        name: str,
        paths: Sequence[str | Path],
        skip_unreadable: bool,
        where: str,
        expected: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, list[dict[str, str] | None]]:
        features, used, digests = self._extract(paths, skip_unreadable, expected)
        if len(used) == 0:
            raise GalleryError(f"class {name!r}: no usable image in {where}; add readable images")
        sources: list[dict[str, str] | None] = [None] * len(used)
        if self.store_sources:
            sources = [
                {"path": str(Path(paths[i]).resolve()), "sha256": str(digest)}
                for i, digest in zip(used, digests, strict=True)
            ]
        return features, sources

    # ------------------------------------------------------------- enrolment

    def _new_gallery(self) -> Gallery:
        b = self.bundle
        return Gallery(
            b.model_id,
            b.feature_dim,
            b.head,
            self.feature_dtype,
            b.meta_init(),
            b.backbone_name,
            variant=self.variant,
        )

    def load_gallery(self) -> Gallery:
        """The gallery as saved, checked to belong to this bundle's model."""
        return Gallery.load(self.gallery_path, model_id=self.bundle.model_id)

    def _check_names(self, names: Sequence[str], append: bool) -> None:
        """Fail fast, before the slow extraction, on duplicate or missing names."""
        exists = self.gallery_path.exists() or self.gallery_path.is_symlink()
        enrolled = set(self.load_gallery().class_names) if exists else set()
        for name in names:
            check_class_name(name)
            if append and name not in enrolled:
                raise GalleryError(f"--append: no class {name!r} in {self.gallery_path} yet")
            if not append and name in enrolled:
                raise GalleryError(
                    f"class {name!r} is already enrolled in {self.gallery_path}; pass --append to "
                    "add images to it, or pick another name"
                )

    def _commit(self, batch: list[tuple[str, np.ndarray, list]], append: bool) -> None:
        with edit_gallery(
            self.gallery_path, self._new_gallery(), self.bundle.model_id, variant=self.variant
        ) as g:
            for name, features, sources in batch:
                if append:
                    g.add_examples(name, features, sources)
                else:
                    g.add_class(name, features, sources)

    def enroll_class(
        self, name: str, image_paths: Sequence[str | Path], append: bool = False
    ) -> int:
        """Enroll `name` from explicit image files (an unreadable file is an error).

        Args:
            append: add the images to an enrolled class instead of creating one.

        Returns:
            the number of images enrolled.
        """
        if not image_paths:
            raise GalleryError(f"class {name!r}: no images given")
        self._check_names([name], append)
        features, sources = self._class_features(name, image_paths, False, "the given files")
        self._commit([(name, features, sources)], append)
        log.debug("enrolled %d images as %r into %s", len(features), name, self.gallery_path)
        return len(features)

    def enroll_folder(self, folder: str | Path, append: bool = False) -> dict[str, int]:
        """Enroll one class per sub-folder of `folder` (named after it).

        Folders are walked by `mtl_edge.data.folders` (hidden and junk files ignored, files
        read by their extension, `IMAGE_EXTENSIONS`). Unreadable images are skipped with a
        warning; a class folder with no usable image is an error. Nothing is saved unless
        every class succeeds.

        Returns:
            class name -> number of images enrolled.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such folder; --from-folder takes a folder of classes")
        class_dirs = list_class_dirs(folder)
        if not class_dirs:
            raise DatasetError(
                f"{folder}: no class sub-folders; put each class's images in <folder>/<class>/"
            )
        self._check_names([d.name for d in class_dirs], append)
        batch = []
        for class_dir in class_dirs:
            images = images_in(class_dir, IMAGE_EXTENSIONS, on_error="skip")
            features, sources = self._class_features(class_dir.name, images, True, str(class_dir))
            batch.append((class_dir.name, features, sources))
        self._commit(batch, append)
        counts = {name: len(features) for name, features, _ in batch}
        log.debug("enrolled %d classes into %s", len(counts), self.gallery_path)
        return counts

    # ------------------------------------------------------------- prediction

    def predict(
        self, images: Sequence[ImageSource], top_k: int = 1, threshold: float | None = None
    ) -> list[Prediction]:
        """Classify images (paths, bytes or uint8 arrays); one `Prediction` each.

        Args:
            threshold: overrides the gallery's rejection threshold for this call.

        Raises:
            GalleryError: missing, empty or foreign gallery (another model or variant).
            ImageError: an unreadable image. BundleError: a failing backbone.
        """
        gallery = self.load_gallery()
        if not gallery.classes:
            raise GalleryError(f"{self.gallery_path}: no classes enrolled; enroll some first")
        require_variant(gallery, self.variant, self.gallery_path)
        features, _ = self.extract(images)
        return gallery.predict(features, top_k=top_k, threshold=threshold)

    # ------------------------------------------------------------ gallery ops

    def remove_class(self, name: str) -> None:
        with edit_gallery(self.gallery_path, model_id=self.bundle.model_id) as g:
            g.remove_class(name)

    def rename_class(self, old: str, new: str) -> None:
        with edit_gallery(self.gallery_path, model_id=self.bundle.model_id) as g:
            g.rename_class(old, new)

    def set_threshold(self, value: float | None) -> None:
        """Fix the rejection threshold, or None to calibrate it automatically."""
        with edit_gallery(self.gallery_path, model_id=self.bundle.model_id) as g:
            g.set_threshold(value)

    def classes(self) -> list[str]:
        return self.load_gallery().class_names

    def info(self) -> dict[str, Any]:
        return self.load_gallery().info()

    def reextract(self) -> int:
        """Rebuild a gallery made with another bundle or variant from its stored image paths.

        A stored path is used only if it is still a regular file outside /proc and /sys whose
        sha256 matches the one stored at enrollment (checked on the bytes that are decoded).

        Returns:
            the number of images re-extracted.

        Raises:
            GalleryError: a class without stored paths, a changed or missing image, or the
                gallery changed meanwhile.
        """
        old = Gallery.load(self.gallery_path)
        batch = []
        for cls in old.classes.values():
            if any(s is None for s in cls.sources):
                raise GalleryError(
                    f"class {cls.name!r} has features without stored image paths; re-enroll it "
                    "with the new bundle instead"
                )
            paths = [s["path"] for s in cls.sources if s is not None]
            for path in paths:
                if in_pseudo_fs(path):
                    raise GalleryError(
                        f"{self.gallery_path}: class {cls.name!r} lists {path}, a kernel file, "
                        "not an image; re-enroll the class"
                    )
            expected = [s["sha256"] for s in cls.sources if s is not None]
            features, sources = self._class_features(
                cls.name, paths, False, "its stored paths", expected
            )
            batch.append((cls.name, features, sources))
        fresh = self._new_gallery()
        fresh.feature_dtype = old.feature_dtype
        fresh.set_rejection(old.rejection)  # before the threshold, whose meaning it sets
        for name, features, sources in batch:
            fresh.add_class(name, features, sources)
        if old.threshold_mode == "manual":
            fresh.set_threshold(old.threshold)
        fresh.created = old.created
        fresh.fit()
        with file_lock(lock_path(self.gallery_path)):
            if Gallery.load(self.gallery_path).generation != old.generation:
                raise GalleryError(
                    f"{self.gallery_path}: changed while re-extracting; run reextract again"
                )
            fresh.generation = old.generation
            fresh.save(self.gallery_path)
        return sum(len(f) for _, f, _ in batch)
