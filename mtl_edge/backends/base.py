"""The one interface every feature-extraction backend implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class FeatureExtractor(Protocol):
    """Runs a bundle's backbone.

    Attributes:
        name: backend name as the user selects it ("onnxruntime", "tensorrt", "torch", ...).
        precision: "fp32", "fp16", "int8", "int8-cpu": the bundle variant that runs.
        provider: what really executes, e.g. "CPUExecutionProvider" or "TensorRT 10.3 on H100";
            after a silent fallback this names the fallback, not the request.
        feature_dim: D.
    """

    name: str
    precision: str
    provider: str
    feature_dim: int

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Features of preprocessed images.

        Args:
            images: float32 array of shape (N, C, H, W), already through the bundle's
                preprocessing.

        Returns:
            float32 array of shape (N, D).
        """
        ...
