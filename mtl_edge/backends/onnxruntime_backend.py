"""Feature extraction with onnxruntime: CPU, or CUDA / TensorRT providers with onnxruntime-gpu.

onnxruntime-gpu without a working CUDA silently runs on the CPU. After creating the session we
read `session.get_providers()[0]`, log a one-line warning when it is not what was asked for, and
report the provider that really runs in `.provider`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl_edge.errors import BundleError, UnavailableError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"


def import_onnxruntime():  # noqa: ANN201 - returns the module
    """The onnxruntime module, or UnavailableError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise UnavailableError(
            f"onnxruntime is not installed ({e}); pip install 'mtl-edge[cpu]' "
            "(or 'mtl-edge[gpu]' on a CUDA machine)"
        ) from None
    return onnxruntime


def default_providers(available: Sequence[str]) -> list[str]:
    """CUDA then CPU when onnxruntime-gpu offers CUDA, else CPU only.

    The TensorRT execution provider is used only when asked for explicitly: it builds an engine
    on first use, which takes minutes; the native TensorRT backend caches engines in the bundle.
    """
    return [CUDA, CPU] if CUDA in available else [CPU]


class OnnxRuntimeExtractor:
    """Runs an ONNX backbone with onnxruntime. Implements `FeatureExtractor`.

    Args:
        model_path: the ONNX file (a bundle variant).
        feature_dim: D, checked against the model's output.
        precision: the bundle variant name, reported as is.
        input_name, output_name: the graph's input and output tensor names.
        providers: onnxruntime execution providers in order of preference; None picks
            `default_providers`.
        threads: intra-op threads; None lets onnxruntime choose (one per physical core).
        batch_size: largest batch per run; bigger inputs are split into chunks. A model with a
            static batch dimension is always run at that size (the last chunk is padded).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        feature_dim: int,
        precision: str = "fp32",
        input_name: str = "images",
        output_name: str = "features",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        ort = import_onnxruntime()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        available = ort.get_available_providers()
        wanted = list(providers) if providers else default_providers(available)
        missing = [p for p in wanted if p not in available]
        if missing:
            log.warning(
                "onnxruntime here has no %s (available: %s); skipping it",
                ", ".join(missing),
                ", ".join(available),
            )
            wanted = [p for p in wanted if p in available] or [CPU]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=wanted)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BundleError(
                f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0]}); "
                "export the bundle again"
            ) from None
        self.requested = wanted
        self.provider = self.session.get_providers()[0]
        if self.provider != wanted[0]:
            log.warning(
                "onnxruntime: asked for %s but %s runs (fallback)", wanted[0], self.provider
            )
        self.precision = precision
        self.threads = threads
        self.batch_size = batch_size
        self.input_name, self.output_name = input_name, output_name
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if input_name not in inputs or output_name not in outputs:
            raise BundleError(
                f"{model_path}: expected input {input_name!r} and output {output_name!r}, the "
                f"graph has {sorted(inputs)} -> {sorted(outputs)}; export the bundle again"
            )
        batch_dim = inputs[input_name].shape[0]
        self.static_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        out_dim = outputs[output_name].shape[-1]
        if isinstance(out_dim, int) and out_dim != feature_dim:
            raise BundleError(
                f"{model_path}: outputs {out_dim} features, the manifest says {feature_dim}; "
                "export the bundle again"
            )
        self.feature_dim = feature_dim
        log.debug(
            "onnxruntime %s: %s on %s (threads: %s)",
            ort.__version__,
            Path(model_path).name,
            self.provider,
            threads or "auto",
        )

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Features of preprocessed images.

        Args:
            images: float32 array of shape (N, C, H, W).

        Returns:
            float32 array of shape (N, D).
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
        images = np.ascontiguousarray(images, dtype=np.float32)
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        step = self.static_batch or self.batch_size
        chunks = []
        for start in range(0, n, step):
            batch = images[start : start + step]
            real = batch.shape[0]
            if self.static_batch and real < self.static_batch:
                pad = np.zeros((self.static_batch - real, *batch.shape[1:]), dtype=np.float32)
                batch = np.concatenate([batch, pad])
            out = self.session.run([self.output_name], {self.input_name: batch})[0]
            chunks.append(np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1)[:real])
        features = np.concatenate(chunks)
        if features.shape[1] != self.feature_dim:
            raise BundleError(
                f"the backbone returned {features.shape[1]} features, the manifest says "
                f"{self.feature_dim}; export the bundle again"
            )
        return features
