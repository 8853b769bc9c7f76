"""Image decoding and preprocessing, defined once for training and for the device.

numpy + Pillow only. The training stack wraps `preprocess_image` for torch; the device runs it
as is, with the `Preprocess` settings read from the model bundle's manifest, so both sides feed
the backbone the same numbers.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mtl_edge.errors import ImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Largest image accepted, in pixels (width * height). Larger files are refused as possible
#: decompression bombs; raise it with `max_pixels=` for genuinely huge photos.
DEFAULT_MAX_PIXELS = 64_000_000

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a network input.

    decode -> colour mode -> resize the shorter side to `resize` -> center-crop `size` x `size`
    -> float32 * `scale` -> (1 - x if `invert`) -> (x - mean) / std -> (C, H, W).

    Attributes:
        size: output height and width after the center crop.
        resize: shorter side before cropping; None means `size` (no border is cropped away
            from a square image).
        color_mode: "RGB" (3 channels) or "L" (1 channel).
        mean, std: per-channel normalisation, one value per channel.
        scale: multiplies the uint8 pixel values before normalisation.
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
            raise ImageError(f"preprocess.color_mode={self.color_mode!r}: use 'RGB' or 'L'")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ImageError(
                f"preprocess mean/std need {self.channels} values for {self.color_mode}, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if self.size <= 0 or (self.resize is not None and self.resize < self.size):
            raise ImageError(
                f"preprocess size={self.size}, resize={self.resize}: need 0 < size <= resize"
            )
        if self.interpolation not in _INTERPOLATION:
            raise ImageError(
                f"preprocess.interpolation={self.interpolation!r}: use one of "
                f"{', '.join(_INTERPOLATION)}"
            )
        if any(s <= 0 for s in self.std):
            raise ImageError("preprocess.std: every value must be positive")

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
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ImageError(f"preprocess: unknown keys {sorted(unknown)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
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
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8))
    return img if img.mode == mode else img.convert(mode)


def decode_image(
    source: str | Path | bytes | np.ndarray,
    color_mode: str = "RGB",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode an image file (or bytes, or a uint8 array) into an upright RGB or L image.

    Args:
        source: a path, encoded bytes, or a uint8 array of shape (H, W) or (H, W, C).
        color_mode: "RGB" or "L".
        max_pixels: refuse images with more pixels than this (decompression bombs).
        name: how to call the source in error messages (defaults to the path).

    Raises:
        ImageError: one line naming the file: missing, not an image, truncated, too large.
    """
    label = name or (str(source) if isinstance(source, str | Path) else "<image>")
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageError(
                f"{label}: expected a uint8 array (H, W[, C]), got {source.dtype} {source.shape}"
            )
        return _to_mode(Image.fromarray(source), color_mode)
    try:
        fp: Any = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot open ({e.strerror})") from None
    with fp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img: Image.Image = Image.open(fp)
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"{label}: {w}x{h} pixels is over the limit of {max_pixels} "
                        "(possible decompression bomb); raise max_pixels if it is genuine"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(
                f"{label}: too many pixels (possible decompression bomb); raise max_pixels "
                "if it is genuine"
            ) from None
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not an image file Pillow can read") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{label}: corrupt or truncated image ({e})") from None
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{label}: empty image ({img.width}x{img.height})")
    return _to_mode(img, color_mode)


def resize_and_crop(img: Image.Image, cfg: Preprocess) -> Image.Image:
    """Resize the shorter side to `cfg.resize` (or `cfg.size`), then center-crop to `cfg.size`."""
    target = cfg.resize or cfg.size
    w, h = img.size
    if min(w, h) != target:
        if w <= h:
            new_w, new_h = target, max(target, round(h * target / w))
        else:
            new_w, new_h = max(target, round(w * target / h)), target
        img = img.resize((new_w, new_h), _INTERPOLATION[cfg.interpolation])
    w, h = img.size
    if (w, h) != (cfg.size, cfg.size):
        left, top = (w - cfg.size) // 2, (h - cfg.size) // 2
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
