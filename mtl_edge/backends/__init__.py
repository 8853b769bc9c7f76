"""Feature-extraction backends: onnxruntime, native TensorRT, and `auto` selection.

Nothing here imports torch; onnxruntime and tensorrt are imported when a backend is created.
"""

from mtl_edge.backends.base import FeatureExtractor
from mtl_edge.backends.select import BACKENDS, PRECISIONS, available_backends, create_backend

__all__ = ["BACKENDS", "PRECISIONS", "FeatureExtractor", "available_backends", "create_backend"]
