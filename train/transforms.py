"""torch wrappers around the one preprocessing function of `mtl_edge.preprocess`."""

from __future__ import annotations

import torch
from PIL import Image

from mtl_edge.preprocess import Preprocess, preprocess_image


def to_tensor(img: Image.Image, cfg: Preprocess) -> torch.Tensor:
    """A decoded image to a float32 tensor of shape (C, H, W), exactly as the device computes it."""
    return torch.from_numpy(preprocess_image(img, cfg))
