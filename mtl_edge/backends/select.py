"""Pick and create a feature-extraction backend for a bundle.

Names a user can select:

- "onnxruntime": onnxruntime with CUDA when onnxruntime-gpu offers it, else the CPU.
- "onnxruntime-cpu" / "onnxruntime-cuda": onnxruntime with that provider forced. The CUDA
  provider runs through `ort_cuda.OrtCudaExtractor` (IO binding, CUDA graphs, pinned copies);
  when CUDA does not really run (`session.get_providers()[0]`), "onnxruntime-cuda" fails with
  the reason and "onnxruntime" / "auto" warn and use the CPU.
- "tensorrt": the native TensorRT runtime (engine from the bundle, built when missing).
- "auto": the fastest available, in the order tensorrt > onnxruntime CUDA > onnxruntime CPU;
  the choice (and any fallback) is logged.

Precision names the bundle variant. onnxruntime on the CPU runs "int8" as the bundle's
"int8-cpu" variant when it has one (uint8 activations, which onnxruntime's CPU kernels need; the
symmetric "int8" variant is for TensorRT and runs about 2x slower on the CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mtl_edge.backends.base import FeatureExtractor
from mtl_edge.bundle import Bundle
from mtl_edge.errors import ConfigError, MtlEdgeError, UnavailableError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def available_backends() -> dict[str, str | None]:
    """Each concrete backend -> None when it can run here, else the reason it cannot.

    Keys, fastest first: "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu".
    """
    reasons: dict[str, str | None] = {}
    try:
        from mtl_edge.backends.tensorrt_runtime import import_cudart, import_tensorrt

        import_tensorrt()
        cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count < 1:
            raise UnavailableError(f"no CUDA GPU visible ({err})")
        reasons["tensorrt"] = None
    except MtlEdgeError as e:
        reasons["tensorrt"] = str(e)
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        reasons["onnxruntime-cuda"] = (
            None
            if CUDA_PROVIDER in providers
            else "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead "
            "of onnxruntime on a CUDA machine)"
        )
        reasons["onnxruntime-cpu"] = None
    except ImportError as e:
        reason = f"onnxruntime is not installed ({e}); pip install 'mtl-edge[cpu]'"
        reasons["onnxruntime-cuda"] = reasons["onnxruntime-cpu"] = reason
    return reasons


def resolve_variant(bundle: Bundle, backend: str, precision: str, on_cpu: bool) -> str:
    """The bundle variant that `backend` runs for the requested `precision`.

    Raises:
        ConfigError: unknown precision, or "int8-cpu" asked of TensorRT.
        BundleError: the bundle lacks the variant (raised by `Bundle.variant_path`).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    variant = precision
    if backend == "tensorrt" and precision == "int8-cpu":
        raise ConfigError(
            "--precision int8-cpu is the onnxruntime CPU variant; TensorRT runs --precision int8"
        )
    if backend == "onnxruntime" and on_cpu:
        if precision == "int8" and "int8-cpu" in bundle.variants:
            variant = "int8-cpu"
        elif precision == "int8":
            log.warning(
                "%s: no int8-cpu variant; running the TensorRT int8 variant on the CPU, which "
                "onnxruntime runs slowly (re-export with --int8 for a CPU variant)",
                bundle.root,
            )
        elif precision == "fp16":
            log.warning("fp16 on the CPU is usually slower than fp32 with onnxruntime")
    bundle.variant_path(variant)
    return variant


def _ort_cuda(bundle: Bundle, precision: str, batch_size: int) -> FeatureExtractor:
    """The IO-binding CUDA extractor (`ort_cuda.py`); UnavailableError when CUDA does not run."""
    from mtl_edge.backends.ort_cuda import OrtCudaExtractor

    variant = resolve_variant(bundle, "onnxruntime", precision, on_cpu=False)
    backbone = bundle.manifest["backbone"]
    return OrtCudaExtractor(
        bundle.variant_path(variant),
        bundle.feature_dim,
        precision=variant,
        input_name=backbone.get("input_name", "images"),
        output_name=backbone.get("output_name", "features"),
        batch_size=batch_size,
        image_shape=bundle.preprocess.input_shape,
    )


def _onnxruntime(
    bundle: Bundle,
    precision: str,
    threads: int | None,
    batch_size: int,
    providers: Sequence[str] | None,
    strict_cuda: bool = False,
) -> FeatureExtractor:
    from mtl_edge.backends.onnxruntime_backend import (
        OnnxRuntimeExtractor,
        default_providers,
        import_onnxruntime,
    )

    wanted = list(providers or default_providers(import_onnxruntime().get_available_providers()))
    if wanted[0] == CUDA_PROVIDER:
        # The CUDA provider goes through IO binding, CUDA graphs and pinned copies. A silent
        # CPU fallback is an error when CUDA was asked for by name, else a warning.
        try:
            return _ort_cuda(bundle, precision, batch_size)
        except UnavailableError as e:
            if strict_cuda:
                raise
            log.warning("%s; running onnxruntime on the CPU instead", e)
            providers = [p for p in wanted if p != CUDA_PROVIDER] or [CPU_PROVIDER]
    on_cpu = (providers[0] if providers else CPU_PROVIDER) == CPU_PROVIDER
    variant = resolve_variant(bundle, "onnxruntime", precision, on_cpu)
    backbone = bundle.manifest["backbone"]
    extractor = OnnxRuntimeExtractor(
        bundle.variant_path(variant),
        bundle.feature_dim,
        precision=variant,
        input_name=backbone.get("input_name", "images"),
        output_name=backbone.get("output_name", "features"),
        providers=providers,
        threads=threads,
        batch_size=batch_size,
    )
    if on_cpu is False and extractor.provider == CPU_PROVIDER and precision == "int8":
        # Asked for CUDA, fell back to the CPU: the CPU variant is the right one there.
        return _onnxruntime(bundle, precision, threads, batch_size, [CPU_PROVIDER])
    return extractor


def create_backend(
    name: str,
    bundle: Bundle,
    precision: str = "fp32",
    threads: int | None = None,
    batch_size: int = 32,
    providers: Sequence[str] | None = None,
) -> FeatureExtractor:
    """Create the feature extractor `name` for `bundle`.

    Args:
        name: one of BACKENDS.
        precision: one of PRECISIONS (see the module docstring for the int8 mapping).
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        batch_size: largest batch per run.
        providers: onnxruntime providers, overriding what `name` implies.

    Raises:
        ConfigError: unknown name or precision.
        UnavailableError: the backend cannot run here (exit code 2), with the reason.
    """
    if name not in BACKENDS:
        raise ConfigError(f"--backend {name!r}: use one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: must be at least 1")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    reasons = available_backends()
    if name == "tensorrt":
        if reasons["tensorrt"] is not None:
            raise UnavailableError(reasons["tensorrt"])
        from mtl_edge.backends.tensorrt_runtime import TensorRTExtractor

        resolve_variant(bundle, "tensorrt", precision, on_cpu=False)
        return TensorRTExtractor(bundle, precision, batch_size=batch_size)
    if name == "onnxruntime-cuda" and not providers:
        if reasons["onnxruntime-cuda"] is not None:
            raise UnavailableError(str(reasons["onnxruntime-cuda"]))
        providers = [CUDA_PROVIDER, CPU_PROVIDER]
    if name == "onnxruntime-cpu" and not providers:
        providers = [CPU_PROVIDER]
    if name.startswith("onnxruntime"):
        if reasons["onnxruntime-cpu"] is not None:
            raise UnavailableError(str(reasons["onnxruntime-cpu"]))
        strict = name == "onnxruntime-cuda"
        return _onnxruntime(bundle, precision, threads, batch_size, providers, strict)
    return _auto(bundle, precision, threads, batch_size, providers, reasons)


def _auto(
    bundle: Bundle,
    precision: str,
    threads: int | None,
    batch_size: int,
    providers: Sequence[str] | None,
    reasons: dict[str, str | None],
) -> FeatureExtractor:
    """tensorrt > onnxruntime CUDA > onnxruntime CPU, logging the choice and each skip."""
    if reasons["tensorrt"] is None and precision != "int8-cpu" and not providers:
        try:
            extractor = create_backend("tensorrt", bundle, precision, threads, batch_size)
            log.info("backend auto: tensorrt (%s)", extractor.provider)
            return extractor
        except MtlEdgeError as e:
            log.warning("backend auto: tensorrt failed (%s); trying onnxruntime", e)
    else:
        log.debug("backend auto: tensorrt skipped (%s)", reasons["tensorrt"])
    if reasons["onnxruntime-cpu"] is not None:
        raise UnavailableError(str(reasons["onnxruntime-cpu"]))
    # "onnxruntime" takes CUDA when it really runs and warns and uses the CPU when it does not.
    chosen = "onnxruntime" if reasons["onnxruntime-cuda"] is None else "onnxruntime-cpu"
    extractor = create_backend(chosen, bundle, precision, threads, batch_size, providers)
    log.info("backend auto: onnxruntime on %s (%s)", extractor.provider, extractor.precision)
    return extractor
