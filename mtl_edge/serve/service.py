"""The server's operations: decode, predict, enroll, rename, remove, threshold.

One `Service` per process holds the bundle, the one feature extractor (behind the
`DynamicBatcher`), the view of the shared gallery file and the thumbnails. Blocking work never
runs on the event loop: decoding and the head on a small thread pool, feature extraction on the
batcher's worker thread, gallery edits (lock, load, refit, atomic save) on one gallery thread.

Gallery edits go through `mtl_edge.gallery.edit_gallery`, the CLI's own path: the file lock
serialises them with `mtl-edge enroll` and friends, and a save is atomic, so killing the server
at any moment loses nothing that was saved before.
"""

from __future__ import annotations

import asyncio
import io
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtl_edge import __version__
from mtl_edge.backends.base import FeatureExtractor
from mtl_edge.bundle import Bundle
from mtl_edge.errors import GalleryError
from mtl_edge.gallery import Gallery, Prediction, check_class_name, edit_gallery
from mtl_edge.preprocess import decode_image, preprocess_image
from mtl_edge.serve.batching import DynamicBatcher
from mtl_edge.serve.config import ServeConfig
from mtl_edge.serve.errors import HttpError
from mtl_edge.serve.metrics import Metrics
from mtl_edge.serve.store import GalleryView, ThumbnailStore, make_thumbnail, thumbs_dir

T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    """One uploaded image: the client's file name (for messages) and its bytes."""

    name: str
    data: bytes


class Service:
    """Everything the HTTP layer calls.

    Args:
        config: the server's settings.
        extractor: the feature extractor; None creates it from the config (`create_backend`).
    """

    def __init__(self, config: ServeConfig, extractor: FeatureExtractor | None = None) -> None:
        self.config = config
        self.bundle = Bundle.load(config.bundle)
        self.view = GalleryView(config.gallery, self.bundle.model_id)
        self.view.get()  # refuse to start on a damaged gallery or one of another model
        if extractor is None:
            from mtl_edge.backends.select import create_backend

            extractor = create_backend(
                config.backend,
                self.bundle,
                config.precision,
                config.threads,
                config.batching.max_batch,
            )
        self.extractor = extractor
        self.metrics = Metrics()
        self.metrics.backend.info(
            {
                "backend": extractor.name,
                "provider": str(extractor.provider),
                "precision": extractor.precision,
                "batching": "on" if config.batching.enabled else "off",
                "max_batch": str(config.batching.max_batch),
            }
        )
        self.batcher = DynamicBatcher(
            extractor.extract,
            max_batch=config.batching.max_batch,
            max_delay_s=config.batching.max_delay_ms / 1000.0,
            max_queue=config.limits.max_queue,
            enabled=config.batching.enabled,
            metrics=self.metrics,
        )
        self.thumbs = ThumbnailStore(thumbs_dir(config.gallery))
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, "mtl-edge-decode")
        self._gallery_pool = ThreadPoolExecutor(1, "mtl-edge-gallery")
        self.started = time.time()

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._decode_pool.shutdown(wait=True)
        self._gallery_pool.shutdown(wait=True)

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # ------------------------------------------------------------------ reads

    async def gallery(self) -> Gallery | None:
        return await self._run(self._decode_pool, self.view.get)

    async def classes(self) -> dict[str, Any]:
        return await self._run(self._decode_pool, self._classes)

    def _classes(self) -> dict[str, Any]:
        g = self.view.get()
        rows = []
        for name, cls in g.classes.items() if g is not None else ():
            thumb = (
                f"/v1/classes/{quote(name, safe='')}/thumbnail" if self.thumbs.has(name) else None
            )
            rows.append({"name": name, "count": len(cls.features), "thumbnail": thumb})
        return {
            "gallery": str(self.config.gallery),
            "classes": rows,
            "threshold": g.threshold if g is not None else None,
            "threshold_mode": g.threshold_mode if g is not None else None,
            "generation": g.generation if g is not None else 0,
        }

    async def gallery_info(self) -> dict[str, Any]:
        g = await self.gallery()
        if g is None:
            return {"gallery": str(self.config.gallery), "exists": False}
        return {"gallery": str(self.config.gallery), "exists": True, **g.info()}

    def bundle_info(self) -> dict[str, Any]:
        b, x = self.bundle, self.extractor
        return {
            "path": str(b.root),
            "model_id": b.model_id,
            "backbone": b.backbone_name,
            "feature_dim": b.feature_dim,
            "preprocess": b.preprocess.to_dict(),
            "head": b.head.to_dict(),
            "variants": sorted(b.variants),
            "backend": x.name,
            "provider": str(x.provider),
            "precision": x.precision,
        }

    def health(self) -> dict[str, Any]:
        c = self.config
        return {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 3),
            "queued_images": self.batcher.queued,
            "batching": {
                "enabled": c.batching.enabled,
                "max_batch": c.batching.max_batch,
                "max_delay_ms": c.batching.max_delay_ms,
                "runs": self.batcher.runs,
                "images": self.batcher.images,
            },
            "limits": {
                "max_request_bytes": c.limits.max_request_bytes,
                "max_images": c.limits.max_images,
                "max_pixels": c.limits.max_pixels,
                "max_queue": c.limits.max_queue,
            },
            "token_for_reads": c.token_for_reads,
        }

    # ----------------------------------------------------------------- decode

    def _decode_one(self, upload: Upload, thumbnail: bool) -> tuple[np.ndarray, bytes | None]:
        limit = self.config.limits.max_pixels
        size = "more pixels than Pillow opens"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(upload.data)) as probe:  # reads the header only
                    w, h = probe.size
            size, too_large = f"{w}x{h} pixels", w * h > limit
        except Image.DecompressionBombError:
            too_large = True
        except (UnidentifiedImageError, OSError, ValueError):
            too_large = False  # decode_image names the problem
        if too_large:
            raise HttpError(
                413,
                f"{upload.name}: {size} is over the limit of {limit} (--max-pixels); "
                "send a smaller image",
            )
        cfg = self.bundle.preprocess
        img = decode_image(upload.data, cfg.color_mode, max_pixels=limit, name=upload.name)
        array = preprocess_image(img, cfg)
        return array, (make_thumbnail(img) if thumbnail else None)

    def _decode(
        self, uploads: Sequence[Upload], thumbnail: bool
    ) -> tuple[np.ndarray, bytes | None]:
        start = time.perf_counter()
        decoded = [self._decode_one(u, thumbnail and i == 0) for i, u in enumerate(uploads)]
        self.metrics.observe_stage("decode", time.perf_counter() - start)
        return np.stack([a for a, _ in decoded]), decoded[0][1]

    def _check_count(self, uploads: Sequence[Upload]) -> None:
        limit = self.config.limits.max_images
        if not uploads:
            raise HttpError(400, "no images in the request; send them as multipart field 'files'")
        if len(uploads) > limit:
            raise HttpError(
                413,
                f"{len(uploads)} images in one request: the limit is {limit} (--max-images); "
                "send them in several requests",
            )

    # ---------------------------------------------------------------- predict

    async def predict(
        self, uploads: Sequence[Upload], top_k: int = 1, threshold: float | None = None
    ) -> list[Prediction]:
        """Classify uploaded images: one `Prediction` each, in order."""
        self._check_count(uploads)
        if top_k < 1:
            raise HttpError(400, f"top_k={top_k}: must be at least 1")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise HttpError(400, f"threshold={threshold}: use a probability in [0, 1]")
        gallery = await self.gallery()
        if gallery is None or not gallery.classes:
            raise HttpError(409, f"{self.config.gallery}: no classes enrolled; enroll some first")
        images, _ = await self._run(self._decode_pool, self._decode, uploads, False)
        features = await self.batcher.extract(images)
        preds = await self._run(self._decode_pool, self._head, gallery, features, top_k, threshold)
        self.metrics.images.labels("predicted").inc(len(preds))
        return preds

    def _head(
        self, gallery: Gallery, features: np.ndarray, top_k: int, threshold: float | None
    ) -> list[Prediction]:
        start = time.perf_counter()
        preds = gallery.predict(features, top_k=top_k, threshold=threshold)
        self.metrics.observe_stage("head", time.perf_counter() - start)
        return preds

    # ---------------------------------------------------------------- enroll

    async def enroll(self, name: str, uploads: Sequence[Upload], append: bool) -> dict[str, Any]:
        """Enroll `uploads` as a new class `name`, or add them to it with `append`.

        Names are checked before the slow extraction and again under the gallery lock.
        """
        try:
            check_class_name(name)
        except GalleryError as e:
            raise HttpError(400, str(e)) from None
        self._check_count(uploads)
        gallery = await self.gallery()
        self._check_enroll_name(gallery, name, append)
        images, thumb = await self._run(self._decode_pool, self._decode, uploads, True)
        features = await self.batcher.extract(images)
        result = await self._run(self._gallery_pool, self._commit, name, features, append)
        if thumb is not None and (not append or not self.thumbs.has(name)):
            await self._run(self._gallery_pool, self.thumbs.put, name, thumb)
        self.metrics.images.labels("enrolled").inc(len(features))
        return result

    def _check_enroll_name(self, gallery: Gallery | None, name: str, append: bool) -> None:
        enrolled = gallery is not None and name in gallery.classes
        if append and not enrolled:
            raise HttpError(404, f"append=true: no class {name!r} in {self.config.gallery} yet")
        if not append and enrolled:
            raise HttpError(
                409,
                f"class {name!r} is already enrolled in {self.config.gallery}; pass append=true "
                "to add images to it, or pick another name",
            )

    def _new_gallery(self) -> Gallery:
        b = self.bundle
        return Gallery(
            b.model_id,
            b.feature_dim,
            b.head,
            self.config.feature_dtype,
            b.meta_init(),
            b.backbone_name,
        )

    def _edit(self, new: Gallery | None = None) -> Any:
        return edit_gallery(
            self.config.gallery, new, self.bundle.model_id, timeout_s=self.config.lock_timeout_s
        )

    def _commit(self, name: str, features: np.ndarray, append: bool) -> dict[str, Any]:
        start = time.perf_counter()
        with self._edit(self._new_gallery()) as g:
            self._check_enroll_name(g, name, append)
            if append:
                g.add_examples(name, features)
            else:
                g.add_class(name, features)
        self.metrics.observe_stage("commit", time.perf_counter() - start)
        return {
            "class": name,
            "added": len(features),
            "count": len(g.classes[name].features),
            "classes": len(g.classes),
            "threshold": g.threshold,
            "threshold_mode": g.threshold_mode,
            "generation": g.generation,
        }

    # ------------------------------------------------------------ edits

    def _require_gallery(self, status: int) -> None:
        if not self.config.gallery.exists():
            raise HttpError(status, f"{self.config.gallery}: no such gallery; enroll a class first")

    def _rename(self, old: str, new: str) -> dict[str, Any]:
        self._require_gallery(404)
        with self._edit() as g:
            try:
                g.rename_class(old, new)
            except GalleryError as e:
                status = 404 if old not in g.classes else 409 if new in g.classes else 400
                raise HttpError(status, str(e)) from None
        self.thumbs.rename(old, new)
        return {"class": new, "renamed_from": old, "generation": g.generation}

    def _remove(self, name: str) -> dict[str, Any]:
        self._require_gallery(404)
        with self._edit() as g:
            try:
                g.remove_class(name)
            except GalleryError as e:
                raise HttpError(404, str(e)) from None
        self.thumbs.remove(name)
        return {"removed": name, "classes": len(g.classes), "generation": g.generation}

    def _set_threshold(self, value: float | None) -> dict[str, Any]:
        self._require_gallery(409)
        with self._edit() as g:
            try:
                g.set_threshold(value)
            except GalleryError as e:
                raise HttpError(400, str(e)) from None
        return {"threshold": g.threshold, "threshold_mode": g.threshold_mode}

    async def rename(self, old: str, new: str) -> dict[str, Any]:
        return await self._run(self._gallery_pool, self._rename, old, new)

    async def remove(self, name: str) -> dict[str, Any]:
        return await self._run(self._gallery_pool, self._remove, name)

    async def set_threshold(self, value: float | None) -> dict[str, Any]:
        return await self._run(self._gallery_pool, self._set_threshold, value)

    async def thumbnail(self, name: str) -> bytes:
        return await self._run(self._decode_pool, self._thumbnail, name)

    def _thumbnail(self, name: str) -> bytes:
        path = self.thumbs.path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise HttpError(
                404, f"class {name!r} has no thumbnail (enrolled by the CLI?)"
            ) from None
