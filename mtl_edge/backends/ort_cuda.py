"""Feature extraction on the GPU with onnxruntime-gpu's CUDA provider, kept off the host.

What makes it fast (each part is optional and reported in `.info`):

- **IO binding**: for each batch size the input (N, C, H, W) and output (N, D) live in device
  memory as fixed OrtValues bound once; a run copies nothing between host and device itself.
- **CUDA graphs** (`enable_cuda_graph`): onnxruntime captures a graph on the first runs of a
  binding and replays it afterwards, one launch instead of one per kernel. A graph needs fixed
  shapes and addresses, so batches are padded up to a few fixed sizes ("buckets", powers of two
  up to `batch_size`), each with its own binding and graph id (run option `gpu_graph_id`): one
  session holds every captured size. When the session cannot be built with graphs (a node that
  only has a CPU kernel), it is built again without them and `.info["cuda_graphs"]` says why.
- **Pinned host buffers**: a batch is written into page-locked memory (`pinned.py`) and copied to
  the device from there (`OrtValue.update_inplace`).
- **Preprocessing off the critical path**: a producer thread fills the next batch's pinned
  buffer (copy, or decode + preprocess for `extract_sources`) while the GPU runs this one
  (`prefetch.py`).

onnxruntime-gpu without working CUDA silently runs on the CPU. This class reads
`session.get_providers()[0]` and raises `UnavailableError` when it is not the CUDA provider:
the caller decides whether a CPU fallback is acceptable (`select.create_backend` warns and uses
the CPU extractor for "onnxruntime" and "auto", and fails for "onnxruntime-cuda").

`device="cpu"` runs the same binding logic on onnxruntime's CPU provider (no graphs, no pinned
memory): the CPU dry run of the GPU plan and the tests use it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.backends import cuda_libs
from mtl_edge.backends.onnxruntime_backend import CPU, CUDA, import_onnxruntime
from mtl_edge.backends.pinned import PinnedAllocator
from mtl_edge.backends.prefetch import prefetched
from mtl_edge.errors import BundleError, UnavailableError

log = logging.getLogger(__name__)

#: CUDA provider options we set unless the caller overrides them. EXHAUSTIVE benchmarks the
#: cuDNN convolution algorithms once per shape (a few seconds at start) for the fastest one.
DEFAULT_CUDA_OPTIONS = {
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "do_copy_in_default_stream": "1",
}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def buckets_for(batch_size: int) -> list[int]:
    """Fixed batch sizes that inputs are padded to: powers of two below `batch_size`, and it."""
    sizes = [1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size]
    return [*sizes, batch_size]


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding n images (n <= max(buckets))."""
    return next(b for b in buckets if b >= n)


@dataclass
class _Slot:
    """The bound device buffers (and graph id) of one bucket."""

    size: int
    binding: Any
    device_in: Any
    device_out: Any
    run_options: Any
    runs: int = 0


class OrtCudaExtractor:
    """Runs an ONNX backbone on onnxruntime's CUDA provider with IO binding. Implements
    `FeatureExtractor`.

    Args:
        model_path: the ONNX file (a bundle variant; FP32 or FP16, float32 or float16 IO).
        feature_dim: D, checked against the model's output.
        precision: the bundle variant name, reported as is.
        input_name, output_name: the graph's input and output tensor names.
        batch_size: largest batch per run; bigger inputs are split, smaller ones padded to a
            bucket (`buckets_for`). A model with a static batch dimension uses that size only.
        device_id: the CUDA device.
        cuda_graphs: capture and replay CUDA graphs (falls back to plain runs if refused).
        pinned: stage host batches in pinned memory.
        cuda_options: CUDA provider options over `DEFAULT_CUDA_OPTIONS` (e.g. prefer_nhwc).
        device: "cuda", or "cpu" for the binding logic on the CPU provider (dry runs, tests).
        workers: decode threads of `extract_sources`.
        image_shape: (C, H, W) of one preprocessed image; needed when the graph leaves H, W
            dynamic, checked against the graph otherwise.
        buckets: the fixed batch sizes instead of `buckets_for(batch_size)` (a benchmark passes
            the sizes it times, so none is padded).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        feature_dim: int,
        precision: str = "fp32",
        input_name: str = "images",
        output_name: str = "features",
        batch_size: int = 256,
        device_id: int = 0,
        cuda_graphs: bool = True,
        pinned: bool = True,
        cuda_options: Mapping[str, str] | None = None,
        device: str = "cuda",
        workers: int = 4,
        image_shape: Sequence[int] | None = None,
        buckets: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
        self.ort = ort = import_onnxruntime()
        self.device, self.device_id, self.workers = device, device_id, workers
        self.precision, self.feature_dim = precision, feature_dim
        self.input_name, self.output_name = input_name, output_name
        self.image_shape = tuple(image_shape) if image_shape else None
        libs = cuda_libs.preload() if device == "cuda" else {}
        want = CUDA if device == "cuda" else CPU
        graphs = device == "cuda" and cuda_graphs
        self._model_path, self._cuda_options = model_path, cuda_options
        self.session, options, error = self._session(model_path, graphs, cuda_options)
        graph_error = None
        if self.session is None and graphs:
            graph_error, graphs = error, False
            self.session, options, error = self._session(model_path, False, cuda_options)
        if self.session is None:
            raise BundleError(
                f"{model_path}: onnxruntime cannot load it ({error}); export the bundle again"
            )
        self.provider = self.session.get_providers()[0]
        if self.provider != want:
            missing = ", ".join(libs.get("missing", [])) or "none found missing"
            raise UnavailableError(
                f"onnxruntime-cuda: {Path(model_path).name} runs on {self.provider}, not {want} "
                f"(onnxruntime {ort.__version__}; CUDA libraries {missing}): install "
                "onnxruntime-gpu with CUDA 13 and cuDNN 9 (docs/gpu-inference.md)"
            )
        self.cuda_graphs = graphs
        self._check_io(model_path)
        if self.static_batch:
            self.buckets = [self.static_batch]
        else:
            self.buckets = sorted(set(buckets)) if buckets else buckets_for(batch_size)
        self.batch_size = max(self.buckets)
        lib = cuda_libs.cudart() if device == "cuda" and pinned else None
        self._alloc = PinnedAllocator(lib)
        if not pinned:
            self._alloc.reason = "disabled"
        shape = (self.batch_size, *self.image_shape)
        self.staging = [self._alloc.empty(shape, self.input_dtype) for _ in range(2)]
        self._slots: dict[int, _Slot] = {}
        self.info: dict[str, Any] = {
            "provider": self.provider,
            "onnxruntime": ort.__version__,
            "device": f"{device}:{device_id}" if device == "cuda" else "cpu",
            "cuda_graphs": self.cuda_graphs,
            "cuda_graph_error": graph_error,
            "pinned": self._alloc.pinned,
            "pinned_reason": self._alloc.reason or None,
            "buckets": list(self.buckets),
            "provider_options": options,
            "cuda_libs": libs,
        }
        log.info(
            "onnxruntime %s on %s: %s (graphs %s, pinned %s)",
            ort.__version__,
            self.provider,
            Path(model_path).name,
            self.cuda_graphs,
            self._alloc.pinned,
        )

    def _session(
        self, model_path: str | Path, graphs: bool, extra: Mapping[str, str] | None
    ) -> tuple[Any | None, dict[str, str], str | None]:
        """(session, provider options, None), or (None, options, the one-line error)."""
        ort = self.ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if self.device == "cpu":
            providers: list[Any] = [CPU]
            options: dict[str, str] = {}
        else:
            options = {**DEFAULT_CUDA_OPTIONS, "device_id": str(self.device_id)}
            options.update({k: str(v) for k, v in (extra or {}).items()})
            options["enable_cuda_graph"] = "1" if graphs else "0"
            providers = [(CUDA, options), CPU]
        try:
            return ort.InferenceSession(str(model_path), opts, providers=providers), options, None
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("onnxruntime session (cuda graphs %s) failed: %s", graphs, line)
            return None, options, line

    def _check_io(self, model_path: str | Path) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if self.input_name not in inputs or self.output_name not in outputs:
            raise BundleError(
                f"{model_path}: expected input {self.input_name!r} and output "
                f"{self.output_name!r}, the graph has {sorted(inputs)} -> {sorted(outputs)}; "
                "export the bundle again"
            )
        inp, out = inputs[self.input_name], outputs[self.output_name]
        if inp.type not in _DTYPES or out.type not in _DTYPES:
            raise BundleError(f"{model_path}: IO types {inp.type} -> {out.type} not supported")
        self.input_dtype, self.output_dtype = _DTYPES[inp.type], _DTYPES[out.type]
        dims = list(inp.shape)
        if len(dims) != 4:
            raise BundleError(f"{model_path}: input shape {dims} is not (N, C, H, W)")
        given = self.image_shape or (None, None, None)
        shape = [
            d if isinstance(d, int) and d > 0 else g for d, g in zip(dims[1:], given, strict=False)
        ]
        if None in shape or (self.image_shape and tuple(shape) != tuple(self.image_shape)):
            raise BundleError(
                f"{model_path}: input (C, H, W) {dims[1:]} does not fit the bundle's "
                f"{self.image_shape}; export the bundle again"
            )
        self.image_shape = tuple(int(d) for d in shape)
        self.static_batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        out_dim = out.shape[-1]
        if isinstance(out_dim, int) and out_dim != self.feature_dim:
            raise BundleError(
                f"{model_path}: outputs {out_dim} features, the manifest says "
                f"{self.feature_dim}; export the bundle again"
            )

    def slot(self, size: int) -> _Slot:
        """The binding of bucket `size`, created on first use (its graph is captured then)."""
        if size in self._slots:
            return self._slots[size]
        ort, dev = self.ort, self.device
        device_in = ort.OrtValue.ortvalue_from_shape_and_type(
            [size, *self.image_shape], self.input_dtype, dev, self.device_id
        )
        device_out = ort.OrtValue.ortvalue_from_shape_and_type(
            [size, self.feature_dim], self.output_dtype, dev, self.device_id
        )
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, device_in)
        binding.bind_ortvalue_output(self.output_name, device_out)
        run_options = ort.RunOptions()
        if self.cuda_graphs:
            # One graph per bucket; id 0 is reserved by onnxruntime, -1 disables capture.
            run_options.add_run_config_entry("gpu_graph_id", str(self.buckets.index(size) + 1))
        self._slots[size] = _Slot(size, binding, device_in, device_out, run_options)
        return self._slots[size]

    def run_bound(self, size: int) -> None:
        """Run bucket `size` on what its device input holds now (no host copies); returns when
        the output is written. The compute-only timing of the benchmark calls this.

        A graph capture that fails on a bucket's first run (a kernel that synchronises or
        allocates while capturing) rebuilds the session without CUDA graphs, once, keeping
        the uploaded input."""
        slot = self.slot(size)
        try:
            self.session.run_with_iobinding(slot.binding, slot.run_options)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            if not self.cuda_graphs or slot.runs:
                raise
            self._drop_graphs(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
            fresh = self.slot(size)
            fresh.device_in.update_inplace(slot.device_in)
            self.session.run_with_iobinding(fresh.binding, fresh.run_options)
            slot = fresh
        slot.runs += 1

    def _drop_graphs(self, reason: str) -> None:
        log.warning("CUDA graph capture failed (%s); running without CUDA graphs", reason)
        session, options, error = self._session(self._model_path, False, self._cuda_options)
        if session is None:
            raise BundleError(f"{self._model_path}: onnxruntime cannot load it ({error})")
        self.session, self.cuda_graphs = session, False
        self._slots.clear()
        self.info.update(cuda_graphs=False, cuda_graph_error=reason, provider_options=options)

    def upload(self, size: int, host: np.ndarray) -> None:
        """Copy host (size, C, H, W) into bucket `size`'s device input."""
        self.slot(size).device_in.update_inplace(host)

    def download(self, size: int) -> np.ndarray:
        """Bucket `size`'s output, of shape (size, D), as float32 on the host."""
        return np.asarray(self.slot(size).device_out.numpy(), dtype=np.float32)

    def _chunks(self, n: int) -> list[tuple[int, int, int]]:
        """(start, stop, bucket) covering n images: full batches, then the rest padded."""
        out, start = [], 0
        while start < n:
            stop = min(n, start + self.batch_size)
            out.append((start, stop, bucket_of(stop - start, self.buckets)))
            start = stop
        return out

    def _pipeline(self, n: int, fill: Any) -> np.ndarray:
        features = np.empty((n, self.feature_dim), dtype=np.float32)
        for (start, stop, size), buf, _ in prefetched(self._chunks(n), fill, self.staging):
            self.upload(size, buf[:size])
            self.run_bound(size)
            features[start:stop] = self.download(size)[: stop - start]
        return features

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Features of preprocessed images.

        Args:
            images: float32 array of shape (N, C, H, W).

        Returns:
            float32 array of shape (N, D).
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images must be (N, {', '.join(map(str, self.image_shape))}), got {images.shape}"
            )

        def fill(chunk: tuple[int, int, int], buf: np.ndarray) -> None:
            start, stop, size = chunk
            buf[: stop - start] = images[start:stop]
            buf[stop - start : size] = 0

        return self._pipeline(len(images), fill)

    def extract_sources(self, sources: Sequence[Any], preprocess: Any) -> np.ndarray:
        """Features of image files or bytes, decoded and preprocessed on the producer thread
        (with `workers` threads) while the GPU runs the previous batch.

        Args:
            sources: paths or bytes, one per image.
            preprocess: the bundle's `Preprocess`.

        Returns:
            float32 array of shape (len(sources), D).
        """
        from concurrent.futures import ThreadPoolExecutor

        from mtl_edge.preprocess import decode_image, preprocess_image

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:

            def fill(chunk: tuple[int, int, int], buf: np.ndarray) -> None:
                start, stop, size = chunk

                def one(i: int) -> None:
                    img = decode_image(sources[i], preprocess.color_mode)
                    buf[i - start] = preprocess_image(img, preprocess)

                list(pool.map(one, range(start, stop)))
                buf[stop - start : size] = 0

            return self._pipeline(len(sources), fill)

    def close(self) -> None:
        """Release the bindings, the session and the pinned buffers."""
        self._slots.clear()
        self.staging = []
        self._alloc.close()
        self.session = None
