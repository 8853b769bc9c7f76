"""onnxruntime's CUDA provider for `bench latency`, through `backends.ort_cuda.OrtCudaExtractor`.

Modes, in the manner of trtexec (which reports GPU compute time apart from the host copies):

- "compute": the batch is already in the bound device input; one call is `run_with_iobinding`
  (a CUDA-graph replay once captured) until the output is written. Host-timed, so launch and
  synchronisation overhead count.
- "copies": the batch is in a pinned host buffer; one call is the copy to the device, the run
  and the copy of the features back to the host.

Every timed batch size is its own bucket (captured graph), so nothing is padded. With
`pipeline` the worker also measures, once, images/s of decoding and preprocessing JPEGs on the
producer thread alone, of the GPU alone, and of both together through `extract_sources`: when
preprocessing is off the critical path the last is close to the slower of the first two.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

from mtl_edge.bench.latency_worker import probe_images, random_batch
from mtl_edge.bench.timing import TimingBudget, measure
from mtl_edge.errors import ConfigError


class OrtCudaRunner:
    """One onnxruntime CUDA setting (fp32 or fp16 bundle variant) set up for timing."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from mtl_edge.backends.ort_cuda import OrtCudaExtractor
        from mtl_edge.backends.select import resolve_variant
        from mtl_edge.bundle import Bundle

        self.precision = spec["precision"]
        if not spec.get("bundle"):
            raise ConfigError("onnxruntime-cuda: needs --bundle B")
        bundle = Bundle.load(spec["bundle"])
        variant = resolve_variant(bundle, "onnxruntime", self.precision, on_cpu=False)
        backbone = bundle.manifest["backbone"]
        self.bundle = bundle
        self.ext = OrtCudaExtractor(
            bundle.variant_path(variant),
            bundle.feature_dim,
            precision=variant,
            input_name=backbone.get("input_name", "images"),
            output_name=backbone.get("output_name", "features"),
            batch_size=spec["max_batch"],
            buckets=spec.get("batch_sizes"),
            cuda_options=spec.get("cuda_options"),
            device="cpu" if spec.get("dry_run") else "cuda",
            image_shape=bundle.preprocess.input_shape,
        )
        self.shape = self.ext.image_shape
        self.info: dict[str, Any] = {**self.ext.info, "variant": variant}
        self.info.pop("cuda_libs", None)
        if spec.get("pipeline"):
            self.info["pipeline"] = self.pipeline(spec["max_batch"], spec["pipeline"])

    def probe(self) -> np.ndarray:
        return self.ext.extract(probe_images(self.shape))

    def run(self, batch: int, mode: str, budget: TimingBudget, warm: bool) -> dict[str, Any]:
        ext = self.ext
        x = random_batch(batch, self.shape).astype(ext.input_dtype)
        if mode == "compute":
            ext.upload(batch, x)
            times = measure(lambda: ext.run_bound(batch), budget, warm)
        elif mode == "copies":
            staging = ext.staging[0][:batch]  # the pinned buffer `extract` copies from
            staging[...] = x

            def call() -> None:
                ext.upload(batch, staging)
                ext.run_bound(batch)
                ext.download(batch)

            times = measure(call, budget, warm)
        else:
            raise ConfigError(f"onnxruntime-cuda: mode {mode!r}; use compute or copies")
        return {"times": times, "device_times": None}

    def pipeline(self, batch: int, images: int) -> dict[str, Any]:
        """images/s of decode + preprocess alone, GPU alone, and both through
        `extract_sources` (the producer thread overlapping them), on `images` JPEGs."""
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        from mtl_edge.preprocess import decode_image, preprocess_image

        pre = self.bundle.preprocess
        rng = np.random.default_rng(0)
        jpegs = []
        for _ in range(min(images, 64)):
            buf = io.BytesIO()
            pixels = rng.integers(0, 255, (pre.size + 8, pre.size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            jpegs.append(buf.getvalue())
        sources = [jpegs[i % len(jpegs)] for i in range(images)]
        one = lambda s: preprocess_image(decode_image(s, pre.color_mode), pre)  # noqa: E731
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.ext.workers) as pool:
            list(pool.map(one, sources))
        decode_s = time.perf_counter() - start
        size = max(b for b in self.ext.buckets if b <= batch)
        self.ext.upload(size, random_batch(size, self.shape).astype(self.ext.input_dtype))
        self.ext.run_bound(size)
        start = time.perf_counter()
        for _ in range(-(-images // size)):
            self.ext.run_bound(size)
        gpu_s = time.perf_counter() - start
        start = time.perf_counter()
        self.ext.extract_sources(sources, pre)
        both_s = time.perf_counter() - start
        return {
            "images": images,
            "batch": size,
            "decode_workers": self.ext.workers,
            "decode_ips": images / decode_s,
            "gpu_ips": images / gpu_s,
            "pipelined_ips": images / both_s,
        }
