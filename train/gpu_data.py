"""A device-resident dataset: a split decoded once into a uint8 tensor, augmented on the device.

On a GPU the data loader must never be the bottleneck (issue 9): instead of decoding JPEGs per
step, `DeviceDataset.from_split` decodes the split once (`mtl_edge.data.decode.decoded_images`,
shorter side resized to the stored size and center-cropped), keeps it as a uint8 tensor of shape
(N, C, H, W) on the device (CUDA when present, else CPU), and makes batches with torch ops there:

- evaluation: center crop to `Preprocess.size`, scale, invert, (x - mean) / std. When the stored
  size equals `Preprocess.size` this equals `mtl_edge.preprocess.preprocess_image` of the same
  image up to float rounding (the device path);
- training: random resized crop and horizontal flip through one affine grid per sample
  (`F.affine_grid` + `F.grid_sample`), colour jitter (brightness, contrast, saturation), then the
  same normalisation.

Every random draw comes from a `torch.Generator` on the dataset's device, so a seed fixes the
batches. `synthetic=True` replaces the pixels by random uint8 of the same shape, to measure a
model's images/s without the real data path (the loader is fast enough when both agree).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtl_edge.data.decode import decoded_images
from mtl_edge.data.episodes import Episode
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError
from mtl_edge.preprocess import Preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceAugment:
    """Training augmentation done on the device.

    Attributes:
        scale: range of the crop's area as a fraction of the stored image.
        ratio: range of the crop's aspect ratio (width / height).
        flip: horizontal flip with probability 0.5.
        brightness, contrast, saturation: jitter strengths; each factor is drawn from
            U(1 - s, 1 + s) (0 disables it; saturation is skipped for 1-channel images).
    """

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment.scale={self.scale}: need 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"augment.ratio={self.ratio}: need 0 < low <= high")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"augment.{name}={getattr(self, name)}: need 0 <= value < 1")


def default_device() -> torch.device:
    """CUDA when a GPU is usable, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (random ops need one on their own device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def to_device(array: np.ndarray, device: torch.device | str | None) -> torch.Tensor:
    """A numpy array as a tensor on `device`; to a GPU through pinned memory without waiting
    (a plain copy from pageable memory makes the host wait for the GPU's queue)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    dev = torch.device(device) if device is not None else t.device
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _uniform(
    n: int, low: float, high: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of images of shape (B, 3, H, W) -> (B, 1, H, W) (ITU-R 601, as PIL's "L")."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


class DeviceDataset:
    """A split held on one device as uint8, with batches made there.

    Args:
        images: uint8 tensor of shape (N, C, R, R), R >= preprocess.size.
        labels: int64 tensor of shape (N,).
        preprocess: the model's preprocessing (size, scale, invert, mean, std).
        channels_last: return batches in channels-last memory format.
        dtype: float dtype of the returned batches (torch.float32 or torch.bfloat16).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        preprocess: Preprocess,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 of shape (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        n, c, h, w = images.shape
        if c != preprocess.channels or h < preprocess.size or w < preprocess.size:
            raise ConfigError(
                f"stored images {c}x{h}x{w} do not fit preprocess {preprocess.channels} "
                f"channels, size {preprocess.size}; decode with the model's colour mode and a "
                "size of at least preprocess.size"
            )
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(device=images.device, dtype=torch.int64)
        self.preprocess = preprocess
        self.channels_last = channels_last
        self.dtype = dtype
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=images.device)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32, device=images.device)

    @classmethod
    def from_split(
        cls,
        split: ImageSplit,
        preprocess: Preprocess,
        device: torch.device | str | None = None,
        synthetic: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        workers: int | None = None,
        progress: bool | None = None,
        cache_dir: str | Path | None = None,
    ) -> DeviceDataset:
        """Decode `split` once and move it to `device`.

        Images are stored at `preprocess.resize or preprocess.size` (shorter side resized, then
        center-cropped square). With `synthetic`, nothing is decoded: random uint8 pixels of the
        same shape (drawn from `seed`) stand in, with the split's labels. With `cache_dir`, the
        decoded array is kept there as `<fingerprint>-<size>-<mode>.npy` and read back by later
        processes (each pipeline stage is a process of its own on the GPU machine).
        """
        dev = torch.device(device) if device is not None else default_device()
        if split.color_mode != preprocess.color_mode:
            raise ConfigError(
                f"{split.name}: split colour mode {split.color_mode!r} differs from the "
                f"model's {preprocess.color_mode!r}; open the split with color_mode="
                f"{preprocess.color_mode!r}"
            )
        stored = preprocess.resize or preprocess.size
        labels = torch.as_tensor(np.asarray(split.labels, dtype=np.int64))
        if synthetic:
            gen = make_generator(seed, "cpu")
            shape = (len(split), preprocess.channels, stored, stored)
            images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        else:
            array = decoded_images(split, stored, cache_dir, workers, progress)
            if array.ndim == 3:
                array = array[:, :, :, None]
            images = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
        return cls(images.to(dev), labels.to(dev), preprocess, channels_last, dtype)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max().item()) + 1 if len(self) else 0

    def nbytes(self) -> int:
        """Device memory held by the pixels, in bytes."""
        return self.images.numel() * self.images.element_size()

    # -- normalisation ---------------------------------------------------------------------

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled pixels of shape (B, C, S, S) -> invert, normalise, dtype, memory format."""
        if self.preprocess.invert:
            x = 1.0 - x
        x = (x - self._mean.view(1, -1, 1, 1)) / self._std.view(1, -1, 1, 1)
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _index(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        if torch.is_tensor(indices):
            return indices.to(self.device, torch.int64)
        return to_device(np.asarray(indices, dtype=np.int64), self.device)

    def eval_batch(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Network inputs without augmentation: center crop, scale, normalise.

        Returns:
            tensor of shape (B, C, size, size) in `self.dtype`.
        """
        s = self.preprocess.size
        _, _, h, w = self.images.shape
        top, left = (h - s) // 2, (w - s) // 2
        raw = self.images[self._index(indices), :, top : top + s, left : left + s]
        return self._finish(raw.to(torch.float32) * self.preprocess.scale)

    def augment_batch(
        self,
        indices: torch.Tensor | np.ndarray,
        gen: torch.Generator,
        augment: DeviceAugment | None = None,
    ) -> torch.Tensor:
        """Network inputs with random resized crop, flip and colour jitter, drawn from `gen`.

        Returns:
            tensor of shape (B, C, size, size) in `self.dtype`.
        """
        aug = augment or DeviceAugment()
        idx = self._index(indices)
        x = self.images[idx].to(torch.float32) * self.preprocess.scale
        b, dev, s = x.shape[0], self.device, self.preprocess.size
        # Crop as fractions of the full image: area a, aspect r -> width sqrt(a*r), height
        # sqrt(a/r); a negative x-scale mirrors the crop (the flip).
        area = _uniform(b, aug.scale[0], aug.scale[1], gen, dev)
        log_r = _uniform(b, math.log(aug.ratio[0]), math.log(aug.ratio[1]), gen, dev)
        cw = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
        ch = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
        cx = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - cw)
        cy = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - ch)
        sign = torch.ones(b, device=dev)
        if aug.flip:
            sign = torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -sign, sign)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = cw * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = ch, cy
        grid = F.affine_grid(theta, [b, x.shape[1], s, s], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = self._jitter(x, aug, gen)
        return self._finish(x)

    def _jitter(self, x: torch.Tensor, aug: DeviceAugment, gen: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, saturation on scaled pixels of shape (B, C, S, S)."""
        b, dev, top = x.shape[0], self.device, 255.0 * self.preprocess.scale

        def factor(strength: float) -> torch.Tensor:
            return _uniform(b, 1 - strength, 1 + strength, gen, dev).view(b, 1, 1, 1)

        if aug.brightness:
            x = (x * factor(aug.brightness)).clamp(0, top)
        if aug.contrast:
            gray = _grayscale(x) if x.shape[1] == 3 else x
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * factor(aug.contrast) + mean).clamp(0, top)
        if aug.saturation and x.shape[1] == 3:
            gray = _grayscale(x)
            x = ((x - gray) * factor(aug.saturation) + gray).clamp(0, top)
        return x

    # -- iteration ---------------------------------------------------------------------------

    def batches(
        self,
        batch_size: int,
        gen: torch.Generator,
        augment: DeviceAugment | None = None,
        train: bool = True,
        drop_last: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled (images, labels) batches.

        Yields:
            images of shape (B, C, size, size), labels of shape (B,) int64.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        order = torch.randperm(len(self), generator=gen, device=self.device)
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            images = self.augment_batch(idx, gen, augment) if train else self.eval_batch(idx)
            yield images, self.labels[idx]

    def episode(
        self,
        episode: Episode,
        gen: torch.Generator | None = None,
        augment: DeviceAugment | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The images of an episode, augmented when `gen` is given.

        Returns:
            support of shape (ways * shots, C, S, S), support labels (ways * shots,),
            query of shape (ways * queries, C, S, S), query labels (ways * queries,);
            labels are episode labels 0..ways-1, class-major like the episode's indices.
        """

        def images(idx: np.ndarray) -> torch.Tensor:
            return self.eval_batch(idx) if gen is None else self.augment_batch(idx, gen, augment)

        def labels(lab: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(lab).to(self.device)

        return (
            images(episode.support),
            labels(episode.support_labels()),
            images(episode.query),
            labels(episode.query_labels()),
        )
