"""Feature extraction with native TensorRT (10 and 11), torch-free.

The engine comes from the bundle (`engines/*.plan`, keyed by GPU, compute capability and
TensorRT version through `mtl_edge.backends.trt_build.engine_key()`); when no engine matches this
GPU and TensorRT is present, it is built and stored in the bundle first. Device memory, copies
and the stream use cuda-python (`cuda.bindings.runtime`, or the older `cuda.cudart`), so
neither torch nor pycuda is needed.

Only the tensor-name API is used (num_io_tensors, get_tensor_name, get_tensor_mode,
set_input_shape, set_tensor_address, execute_async_v3): TensorRT 10 and 11 both have it, and
11 removed the binding-index API.

NOT VERIFIED: this module has not run on a GPU yet (the development machines have no GPU and
cannot install TensorRT); its tests skip where TensorRT is absent.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.bundle import Bundle
from mtl_edge.errors import BundleError, MtlEdgeError, UnavailableError

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """The tensorrt module, or UnavailableError with the reason in one line."""
    try:
        import tensorrt
    except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UnavailableError(
            f"TensorRT is not usable here ({reason}); install 'mtl-edge[gpu]' on a machine "
            "with an NVIDIA GPU, or use --backend onnxruntime"
        ) from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime module (new or old location), or UnavailableError."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise UnavailableError(
                f"cuda-python is not installed ({e}); pip install cuda-python to run "
                "TensorRT engines, or use --backend onnxruntime"
            ) from None
    return cudart


def _check(cudart: Any, result: tuple[Any, ...], what: str) -> Any:
    """Unpack a cuda-python call's (error, value...) tuple, raising on error."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise UnavailableError(f"CUDA {what} failed ({err}); check the driver and the GPU")
    return values[0] if len(values) == 1 else values


def engine_for(bundle: Bundle, variant: str, build: bool = True) -> Path:
    """The engine to run: the bundle's one for this GPU and TensorRT, else a freshly built one
    (stored in the bundle by `trt_build.build_engine`).

    Raises:
        UnavailableError: TensorRT or the GPU is absent, or no engine exists and not `build`.
    """
    from mtl_edge.backends import trt_build

    key = trt_build.engine_key()
    entry = trt_build.find_built(bundle, variant, key)
    if entry is not None:
        return bundle.root / entry["file"]
    if not build:
        raise UnavailableError(
            f"{bundle.root}: no TensorRT engine of {variant!r} for this GPU ({key}); build "
            "one with `mtl-edge export --tensorrt` on this machine or allow building"
        )
    log.info("no TensorRT engine for %s (%s): building one (this can take minutes)", key, variant)
    return trt_build.build_engine(bundle, variant)


class TensorRTExtractor:
    """Runs a bundle's TensorRT engine. Implements `FeatureExtractor`.

    Args:
        bundle: a loaded bundle.
        precision: the variant whose engine runs ("fp32", "fp16", "int8").
        batch_size: largest batch per run; must not exceed the engine profile's maximum.
        build: build the engine when the bundle has none for this GPU.
    """

    name = "tensorrt"

    def __init__(
        self, bundle: Bundle, precision: str = "fp32", batch_size: int = 32, build: bool = True
    ) -> None:
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        bundle.variant_path(precision)  # a clear error when the variant is missing
        path = engine_for(bundle, precision, build=build)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BundleError(
                f"{path}: TensorRT {trt.__version__} cannot deserialize it (built by another "
                "version or for another GPU); delete it from the bundle to rebuild"
            )
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        backbone = bundle.manifest["backbone"]
        self.input_name = backbone.get("input_name", inputs[0] if inputs else "images")
        self.output_name = backbone.get("output_name", outputs[0] if outputs else "features")
        if self.input_name not in inputs or self.output_name not in outputs:
            raise BundleError(
                f"{path}: engine tensors {inputs} -> {outputs} do not match the manifest's "
                f"{self.input_name!r} -> {self.output_name!r}; rebuild the engine"
            )
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        max_batch = int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.batch_size = max(1, min(batch_size, max_batch))
        self.feature_dim = bundle.feature_dim
        self.precision = precision
        self._stream = _check(cudart, cudart.cudaStreamCreate(), "stream creation")
        self._capacity = 0
        self._d_in: Any = None  # device pointers from cudaMalloc
        self._d_out: Any = None
        _, props = cudart.cudaGetDeviceProperties(0)
        gpu = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
        self.provider = f"TensorRT {trt.__version__} on {gpu}"
        log.info("tensorrt: %s running %s", self.provider, path.name)

    def _ensure_buffers(self, batch: int, sample_shape: tuple[int, ...]) -> None:
        if batch <= self._capacity:
            return
        self._free_buffers()
        cudart = self._cudart
        in_bytes = batch * int(np.prod(sample_shape)) * self._in_dtype.itemsize
        out_bytes = batch * self.feature_dim * self._out_dtype.itemsize
        self._d_in = _check(cudart, cudart.cudaMalloc(in_bytes), "input allocation")
        self._d_out = _check(cudart, cudart.cudaMalloc(out_bytes), "output allocation")
        self._capacity = batch

    def _free_buffers(self) -> None:
        for ptr in (self._d_in, self._d_out):
            if ptr is not None:
                self._cudart.cudaFree(ptr)
        self._d_in = self._d_out = None
        self._capacity = 0

    def _run(self, batch: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        host_in = np.ascontiguousarray(batch, dtype=self._in_dtype)
        self._ensure_buffers(self.batch_size, host_in.shape[1:])
        if not self._context.set_input_shape(self.input_name, tuple(host_in.shape)):
            raise MtlEdgeError(
                f"TensorRT refused input shape {host_in.shape}; the engine's profile does not "
                "cover it (lower --batch-size or rebuild the engine)"
            )
        self._context.set_tensor_address(self.input_name, int(self._d_in))
        self._context.set_tensor_address(self.output_name, int(self._d_out))
        host_out = np.empty((host_in.shape[0], self.feature_dim), dtype=self._out_dtype)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(
            cudart,
            cudart.cudaMemcpyAsync(
                self._d_in, host_in.ctypes.data, host_in.nbytes, h2d, self._stream
            ),
            "copy to device",
        )
        if not self._context.execute_async_v3(int(self._stream)):
            raise MtlEdgeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        _check(
            cudart,
            cudart.cudaMemcpyAsync(
                host_out.ctypes.data, self._d_out, host_out.nbytes, d2h, self._stream
            ),
            "copy to host",
        )
        _check(cudart, cudart.cudaStreamSynchronize(self._stream), "stream synchronize")
        return host_out.astype(np.float32)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Features of preprocessed images.

        Args:
            images: float32 array of shape (N, C, H, W).

        Returns:
            float32 array of shape (N, D).
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
        if images.shape[0] == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        chunks = [
            self._run(images[start : start + self.batch_size])
            for start in range(0, images.shape[0], self.batch_size)
        ]
        return np.concatenate(chunks)

    def close(self) -> None:
        """Free device memory and the stream (also done at garbage collection)."""
        if getattr(self, "_cudart", None) is None:
            return
        self._free_buffers()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        # At interpreter shutdown CUDA may already be torn down.
        with contextlib.suppress(Exception):
            self.close()
