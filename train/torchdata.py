"""Data plumbing shared by pre-training and meta-training.

- `resolve_device`, `autocast`: where the tensors live and mixed precision (CUDA only);
- `open_recipe_split`: a recipe's splits through
  `mtl_edge.data.registry.open_split` (data root from the recipe, else
  `mtl_edge.data.registry.data_root()`);
- `load_split`: a split decoded once into a `mtl_edge.train.gpu_data.DeviceDataset` (uint8 in
  memory: miniImageNet's 38k images are decoded once, not per epoch; training augmentation
  and the exact evaluation preprocessing are done there);
- `episode_loader`: an Episode's indices -> image tensors, for `meta_transfer.TaskBuilder`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mtl_edge.data.registry import data_root, first_per_class, open_split_spec, reader_options
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.config import DataConfig, RuntimeConfig
from mtl_edge.train.gpu_data import DeviceAugment, DeviceDataset


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """The training device: runtime.device, "auto" = CUDA when available."""
    return parse_device(runtime.device, "runtime.device")


def parse_device(name: str, option: str) -> torch.device:
    """`name` ("auto" = CUDA when available, "cpu", "cuda[:i]") as a device.

    Raises:
        ConfigError: naming `option`, for a malformed name or CUDA asked where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}={name!r}: use auto, cpu or cuda[:i]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name!r}: no CUDA GPU here; use auto or cpu")
    return dev


def autocast(runtime: RuntimeConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA when runtime.amp asks for it, else nothing."""
    if runtime.amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if runtime.amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def show_progress(runtime: RuntimeConfig) -> bool:
    """Progress bars on: "on", "off", or "auto" = stderr is a terminal."""
    return runtime.progress == "on" or (runtime.progress == "auto" and sys.stderr.isatty())


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar with extra text fields (loss, accuracy, images/s)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def recipe_data_root(data: DataConfig) -> Path | None:
    """The dataset folder of a recipe: data.root, else `mtl_edge.data.registry.data_root()`
    joined with data.default_subdir; None for synthetic data."""
    if data.kind == "synthetic":
        return None
    if data.root:
        return Path(data.root).expanduser()
    base = data_root()
    return base / data.default_subdir if data.default_subdir else base


def open_recipe_split(data: DataConfig, spec: str, color_mode: str) -> ImageSplit:
    """Split `spec` ("train", "val", "train[:44]", "val+test", ...) of the recipe's dataset."""
    options = dict(data.options)
    if "color_mode" in reader_options(data.kind):
        options.setdefault("color_mode", color_mode)
    return open_split_spec(data.kind, recipe_data_root(data), spec, **options)


def open_train_split(data: DataConfig, color_mode: str) -> ImageSplit:
    """The recipe's training split, trimmed to `data.per_class` images per class."""
    return first_per_class(open_recipe_split(data, data.train_split, color_mode), data.per_class)


def load_split(
    split: ImageSplit, preprocess: Preprocess, device: torch.device, progress: bool = False
) -> DeviceDataset:
    """The split decoded once (at preprocess.resize or size) into uint8 on `device`."""
    return DeviceDataset.from_split(split, preprocess, device, progress=progress)


def make_augment(
    crop_scale: tuple[float, float], enabled: bool, flip: bool = True, jitter: float = 0.4
) -> DeviceAugment | None:
    """The training augmentation (None = none: batches are preprocessed like evaluation)."""
    if not enabled:
        return None
    return DeviceAugment(
        scale=crop_scale, flip=flip, brightness=jitter, contrast=jitter, saturation=jitter
    )


def episode_loader(
    data: DeviceDataset,
    device: torch.device,
    gen: torch.Generator | None = None,
    augment: DeviceAugment | None = None,
) -> Callable[[np.ndarray], torch.Tensor]:
    """`load(indices) -> images of shape (n, C, S, S)` on `device`, augmented when `augment`
    and `gen` are given, else exactly the evaluation preprocessing."""

    def load(idx: np.ndarray) -> torch.Tensor:
        if augment is not None and gen is not None:
            return data.augment_batch(idx, gen, augment).to(device)
        return data.eval_batch(idx).to(device)

    return load


def describe(obj: Any) -> str:
    """Short text of a split for logs."""
    return f"{getattr(obj, 'name', '?')} ({len(obj)} images, {obj.num_classes} classes)"
