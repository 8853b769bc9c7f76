"""The gallery file as the server sees it, and the class thumbnails kept beside it.

The server shares the gallery with the CLI: the same file, the same lock (`edit_gallery`), no
copy of its own. Reads need no lock because every save renames a complete file into place, so
`GalleryView` caches the last loaded `Gallery` and reloads when the file's identity (inode,
size, modification time) changes: an `mtl-edge enroll` next to the server shows on the next
request.

Thumbnails are small JPEGs in `<gallery>.thumbs/`, one per class, named by a hash of the class
name and written atomically. They are derived data for the page: the gallery format belongs to
`mtl_edge.gallery` and holds none of them, and a class enrolled by the CLI simply has none.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from pathlib import Path

from PIL import Image, ImageOps

from mtl_edge.atomicio import atomic_write_bytes
from mtl_edge.gallery import Gallery

THUMB_SIZE = 96


class GalleryView:
    """The latest saved gallery, reloaded when the file changes.

    Args:
        path: the gallery file (may not exist yet).
        model_id: the bundle's; a gallery of another model is refused (GalleryError).
    """

    def __init__(self, path: Path, model_id: str) -> None:
        self.path = path
        self.model_id = model_id
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._gallery: Gallery | None = None

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self) -> Gallery | None:
        """The gallery as saved now, None when there is no file yet (blocking: call it off the
        event loop). The object is shared between requests: treat it as read-only.

        Raises:
            GalleryError: the file is corrupt or belongs to another model.
        """
        key = self._identity()
        if key is not None and key == self._key:
            return self._gallery
        with self._lock:
            key = self._identity()
            if key == self._key:
                return self._gallery
            gallery = None if key is None else Gallery.load(self.path, model_id=self.model_id)
            if gallery is not None and gallery.classes and gallery.head is None:
                gallery.fit()  # predictions from several threads must not refit concurrently
            self._gallery, self._key = gallery, key
            return gallery


def make_thumbnail(img: Image.Image, size: int = THUMB_SIZE) -> bytes:
    """A square JPEG of `img`, centre-cropped to `size` x `size` pixels."""
    square = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    square.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def thumbs_dir(gallery: Path) -> Path:
    return gallery.with_name(gallery.name + ".thumbs")


class ThumbnailStore:
    """One JPEG per class name in `folder`, created on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
        return self.folder / f"{digest}.jpg"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def put(self, name: str, jpeg: bytes) -> None:
        atomic_write_bytes(self.path(name), jpeg)

    def rename(self, old: str, new: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path(old), self.path(new))

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
