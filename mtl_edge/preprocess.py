"""Image decoding and preprocessing, defined once for training and for the device.

numpy + Pillow only. The training stack wraps `preprocess_image` for torch; the device runs it
as is, with the `Preprocess` settings read from the model bundle's manifest, so both sides feed
the backbone the same numbers.

Images are untrusted input. `decode_image` opens regular files only (a FIFO or a device is
refused before it is opened), lets Pillow read only the formats listed in `IMAGE_FORMATS`,
refuses a header over `max_pixels` or with a side over `MAX_SIDE` before decoding, and turns
every decoder failure into one `ImageError` line. Warnings of Pillow and of the C libraries it
calls (libtiff prints straight to file descriptor 2) are captured: logged at debug level after a
successful decode, appended to the error line after a failed one. `resize_and_crop` never
builds an image of more than `MAX_RESIZED_PIXELS` (see docs/security.md for every limit).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import numbers
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mtl_edge.errors import ImageError, one_line, shown
from mtl_edge.safefile import open_regular

log = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Largest image accepted, in pixels (width * height). Larger files are refused as possible
#: decompression bombs; raise it with `max_pixels=` for genuinely huge photos. Pillow holds at
#: most 4 bytes per pixel, so a decoded image takes at most 256 MB.
DEFAULT_MAX_PIXELS = 64_000_000
#: Largest image file read whole (the enroller hashes the bytes it decodes).
MAX_IMAGE_FILE_BYTES = 256 << 20
#: Longest side accepted, in pixels (the JPEG format's own limit).
MAX_SIDE = 65_535
#: Largest intermediate image `resize_and_crop` builds; a more elongated image is cropped
#: before it is resized (same geometry, output of `size` x `size`).
MAX_RESIZED_PIXELS = 4_194_304
#: Bounds of the `Preprocess` settings (a manifest or checkpoint is untrusted).
MAX_INPUT_SIZE = 1024
MAX_RESIZE = 2048
MAX_NORMALISATION = 1000.0
#: The formats Pillow may use; others (EPS runs Ghostscript, many rarely used plugins) are
#: refused as "not an image".
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_STDERR_LOCK = threading.Lock()
_CAPTURE_LIMIT = 64 * 1024


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a network input.

    decode -> colour mode -> resize the shorter side to `resize` -> center-crop `size` x `size`
    -> float32 * `scale` -> (1 - x if `invert`) -> (x - mean) / std -> (C, H, W).

    Attributes:
        size: output height and width after the center crop (1..MAX_INPUT_SIZE).
        resize: shorter side before cropping (size..MAX_RESIZE); None means `size` (no border
            is cropped away from a square image).
        color_mode: "RGB" (3 channels) or "L" (1 channel).
        mean, std: per-channel normalisation, one finite value per channel (std > 0).
        scale: multiplies the uint8 pixel values before normalisation (finite, > 0).
        invert: 1 - x after scaling (Omniglot: ink becomes 1 on a 0 background).
        interpolation: "nearest", "bilinear", "bicubic" or "lanczos".
    """

    size: int = 84
    resize: int | None = None
    color_mode: str = "RGB"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    invert: bool = False
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.color_mode not in ("RGB", "L"):
            raise ImageError(f"preprocess.color_mode={shown(self.color_mode)}: use 'RGB' or 'L'")
        if not _is_int(self.size) or not 0 < self.size <= MAX_INPUT_SIZE:
            raise ImageError(
                f"preprocess.size={shown(self.size)}: use an integer in 1..{MAX_INPUT_SIZE}"
            )
        if self.resize is not None and (
            not _is_int(self.resize) or not self.size <= self.resize <= MAX_RESIZE
        ):
            raise ImageError(
                f"preprocess size={self.size}, resize={shown(self.resize)}: need an integer resize "
                f"with size <= resize <= {MAX_RESIZE}, or none"
            )
        for key in ("mean", "std"):
            values = getattr(self, key)
            if not isinstance(values, tuple | list) or not all(
                _is_real(v) and abs(v) <= MAX_NORMALISATION for v in values
            ):
                raise ImageError(
                    f"preprocess.{key}: a list of finite numbers within +-{MAX_NORMALISATION:g}"
                )
            object.__setattr__(self, key, tuple(float(v) for v in values))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ImageError(
                f"preprocess mean/std need {self.channels} values for {self.color_mode}, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s < 1e-6 for s in self.std):
            raise ImageError("preprocess.std: every value must be positive (at least 1e-6)")
        if not _is_real(self.scale) or not 0 < self.scale <= MAX_NORMALISATION:
            raise ImageError(
                f"preprocess.scale={shown(self.scale)}: use a number in (0, {MAX_NORMALISATION:g}]"
            )
        if not isinstance(self.invert, bool):
            raise ImageError(f"preprocess.invert={shown(self.invert)}: use true or false")
        if not isinstance(self.interpolation, str) or self.interpolation not in _INTERPOLATION:
            raise ImageError(
                f"preprocess.interpolation={shown(self.interpolation)}: use one of "
                f"{', '.join(_INTERPOLATION)}"
            )

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "RGB" else 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (self.channels, self.size, self.size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Settings from a JSON object; every field is type- and range-checked.

        Raises:
            ImageError: not an object, an unknown key, or a field of the wrong type or range.
        """
        if not isinstance(d, dict):
            raise ImageError(f"preprocess: expected an object, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ImageError(f"preprocess: unknown keys {shown(sorted(map(str, unknown)), 80)}")
        return cls(**d)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode (CMYK, P, LA, RGBA, I;16, I, F, 1, ...) to "RGB" or "L".

    Transparent pixels are composited on white; 16-bit and 32-bit integer images are rescaled
    to 8 bits rather than clipped.
    """
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=top, neginf=0.0)
        img = Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8))
    return img if img.mode == mode else img.convert(mode)


@contextlib.contextmanager
def _captured_fd2() -> Iterator[list[str]]:
    """Collect what C code writes to file descriptor 2 in the block into the yielded list
    (filled when the block ends). Process-wide, hence serialised by a lock."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(_CAPTURE_LIMIT).decode(errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _check_size(label: str, w: int, h: int, max_pixels: int) -> None:
    if w > MAX_SIDE or h > MAX_SIDE:
        raise ImageError(
            f"{label}: {w}x{h} pixels has a side over the limit of {MAX_SIDE}; resize it"
        )
    if w * h > max_pixels:
        raise ImageError(
            f"{label}: {w}x{h} pixels is over the limit of {max_pixels} "
            "(possible decompression bomb); raise max_pixels if it is genuine"
        )


def _decode(fp: Any, label: str, max_pixels: int, notes: list[str]) -> Image.Image:
    """Open, check the header, load and orient; third-party messages go to `notes`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img: Image.Image = Image.open(fp, formats=IMAGE_FORMATS)
            _check_size(label, *img.size, max_pixels)
            if img.format == "TIFF":
                with _captured_fd2() as printed:
                    try:
                        img.load()
                    finally:
                        notes.extend(printed)
            else:
                img.load()
            ImageOps.exif_transpose(img, in_place=True)  # a copy would double the memory
        finally:
            for w in caught:
                if issubclass(w.category, Image.DecompressionBombWarning):
                    raise ImageError(
                        f"{label}: too many pixels (possible decompression bomb); raise "
                        "max_pixels if it is genuine"
                    )
                notes.append(str(w.message).strip())
    return img


def decode_image(
    source: str | Path | bytes | np.ndarray,
    color_mode: str = "RGB",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode an image file (or bytes, or a uint8 array) into an upright RGB or L image.

    Args:
        source: a path, encoded bytes, or a uint8 array of shape (H, W) or (H, W, C) with C in
            1, 3, 4.
        color_mode: "RGB" or "L".
        max_pixels: refuse images with more pixels than this (decompression bombs).
        name: how to call the source in error messages (defaults to the path).

    Raises:
        ImageError: one line naming the file: missing, not a regular file, not an image of a
            supported format, truncated or corrupt, too large.
    """
    label = name or (str(source) if isinstance(source, str | Path) else "<image>")
    if isinstance(source, np.ndarray):
        shape = source.shape
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or source.size == 0:
            raise ImageError(
                f"{label}: expected a uint8 array (H, W[, C]), got {source.dtype} {shape}"
            )
        if source.ndim == 3 and shape[2] not in (1, 3, 4):
            raise ImageError(f"{label}: an array image needs 1, 3 or 4 channels, got {shape[2]}")
        _check_size(label, shape[1], shape[0], max_pixels)
        array = source[:, :, 0] if source.ndim == 3 and shape[2] == 1 else source
        return _to_mode(Image.fromarray(np.ascontiguousarray(array)), color_mode)
    if isinstance(source, bytes | bytearray | memoryview):
        fp: Any = io.BytesIO(bytes(source))
    else:
        fp = open_regular(source, ImageError, "pass an image file", missing="no such file")
    notes: list[str] = []
    with fp:
        try:
            img = _decode(fp, label, max_pixels, notes)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(
                f"{label}: too many pixels (possible decompression bomb); raise max_pixels "
                "if it is genuine"
            ) from None
        except UnidentifiedImageError:
            raise ImageError(
                f"{label}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
            ) from None
        except MemoryError:
            raise ImageError(f"{label}: too large to decode in the memory available") from None
        except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types on bad data
            detail = one_line(e) or type(e).__name__
            extra = f"; {one_line(' '.join(notes), 200)}" if notes else ""
            raise ImageError(f"{label}: corrupt or truncated image ({detail}{extra})") from None
    for note in notes:
        log.debug("%s: %s", label, note)
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{label}: empty image ({img.width}x{img.height})")
    try:
        return _to_mode(img, color_mode)
    except MemoryError:
        raise ImageError(f"{label}: too large to convert in the memory available") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"{label}: cannot convert to {color_mode} ({e})") from None


def resize_and_crop(img: Image.Image, cfg: Preprocess) -> Image.Image:
    """Resize the shorter side to `cfg.resize` (or `cfg.size`), then center-crop to `cfg.size`.

    When the resized image would exceed MAX_RESIZED_PIXELS (a very elongated image), the crop
    is taken from the source first and resized alone, so memory stays bounded.
    """
    target = cfg.resize or cfg.size
    w, h = img.size
    if w <= h:
        new_w, new_h = target, max(target, round(h * target / w))
    else:
        new_w, new_h = max(target, round(w * target / h)), target
    left, top = (new_w - cfg.size) // 2, (new_h - cfg.size) // 2
    if (new_w, new_h) != (w, h) and new_w * new_h > MAX_RESIZED_PIXELS:
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + cfg.size) * sx, (top + cfg.size) * sy)
        return img.resize((cfg.size, cfg.size), _INTERPOLATION[cfg.interpolation], box=box)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _INTERPOLATION[cfg.interpolation])
    if (new_w, new_h) != (cfg.size, cfg.size):
        img = img.crop((left, top, left + cfg.size, top + cfg.size))
    return img


def image_to_array(img: Image.Image, cfg: Preprocess) -> np.ndarray:
    """Scale and normalise an image already at its final size.

    Returns:
        float32 array of shape (C, H, W).
    """
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr * np.float32(cfg.scale)
    if cfg.invert:
        arr = np.float32(1.0) - arr
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_image(img: Image.Image, cfg: Preprocess) -> np.ndarray:
    """An upright decoded image to a network input of shape (C, H, W), float32."""
    return image_to_array(resize_and_crop(_to_mode(img, cfg.color_mode), cfg), cfg)


def load_images(
    sources: Sequence[str | Path | bytes | np.ndarray],
    cfg: Preprocess,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode and preprocess a batch.

    Returns:
        float32 array of shape (N, C, H, W).
    """
    if not sources:
        return np.zeros((0, *cfg.input_shape), dtype=np.float32)
    return np.stack(
        [preprocess_image(decode_image(s, cfg.color_mode, max_pixels), cfg) for s in sources]
    )
