"""Build TensorRT engines from a bundle's ONNX variants (TensorRT 10 and 11), torch-free.

The workstation builds engines at export (`mtl-edge export --tensorrt`) and the device builds
them when its GPU or TensorRT version has none (`tensorrt_runtime.engine_for`). An engine only
runs on the GPU model and TensorRT version it was built with, so engines are stored in the
bundle under `engines/<variant>-<key>.plan`, keyed by `engine_key()` (GPU name, compute
capability, TensorRT version), and registered with `Bundle.add_files`.

Precision comes from the ONNX variant: "fp32", "fp16" (float16 weights and activations) or
"int8" (QDQ, symmetric int8: explicit quantization). TensorRT 10 needs the FP16 / INT8 builder
flags to use those kernels; TensorRT 11 removed the flags and always builds strongly typed
networks, taking every type from the graph. `precision_flags` and `network_flags` detect which
API is present with `hasattr`, so one code path serves both.

NOT VERIFIED: written against the documented TensorRT Python API; the development machines
have no GPU and cannot install TensorRT. Its tests use a fake `tensorrt` module and skip the
real build where TensorRT is absent.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl_edge.bundle import Bundle
from mtl_edge.errors import BundleError, MtlEdgeError, UnavailableError

log = logging.getLogger(__name__)

#: Variants TensorRT can build. "int8-cpu" (uint8 activations) is onnxruntime's CPU file.
TRT_VARIANTS = ("fp32", "fp16", "int8")
#: Builder flags a TensorRT 10 build sets for each variant (TensorRT 11 has none of them).
_PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}


@dataclass(frozen=True)
class Profile:
    """The one optimisation profile: batch sizes the engine accepts (min, opt, max)."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise MtlEdgeError(
                f"TensorRT profile min={self.min_batch}, opt={self.opt_batch}, "
                f"max={self.max_batch}: need 1 <= min <= opt <= max (--opt-batch/--max-batch)"
            )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def this_gpu() -> tuple[str, str]:
    """(name, compute capability such as "9.0") of GPU 0, as nvidia-smi reports them.

    Raises:
        UnavailableError: no NVIDIA GPU found.
    """
    from mtl_edge.sysinfo import gpu_info

    gpus = gpu_info()
    if not gpus:
        raise UnavailableError(
            "no NVIDIA GPU found (nvidia-smi lists none); TensorRT engines need one, use "
            "the onnxruntime backend here"
        )
    return gpus[0]["name"], gpus[0]["compute_capability"]


def engine_key(
    gpu_name: str | None = None,
    compute_capability: str | None = None,
    tensorrt_version: str | None = None,
) -> str:
    """The key engines are stored under, e.g. "NVIDIA-H100-80GB-HBM3-sm90-trt10.3.0".

    Missing parts are read from this machine: GPU 0 via nvidia-smi, the version from the
    tensorrt module.

    Raises:
        UnavailableError: no NVIDIA GPU, or TensorRT not importable (when asked for them).
    """
    if gpu_name is None or compute_capability is None:
        found_name, found_cc = this_gpu()
        gpu_name = gpu_name or found_name
        compute_capability = compute_capability or found_cc
    if tensorrt_version is None:
        from mtl_edge.backends.tensorrt_runtime import import_tensorrt

        tensorrt_version = str(import_tensorrt().__version__)
    sm = compute_capability.replace(".", "")
    return f"{_slug(gpu_name)}-sm{sm}-trt{_slug(tensorrt_version)}"


def engine_file(variant: str, key: str) -> str:
    """Bundle-relative path of the engine of `variant` for `key`."""
    return f"engines/{variant}-{key}.plan"


def has_weak_typing(trt: Any) -> bool:
    """True for TensorRT 10 (builder flags FP16 / INT8 exist), False for 11 (removed)."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "INT8")


def precision_flags(trt: Any, variant: str) -> list[Any]:
    """Builder flags to set for `variant`: FP16 / INT8 on TensorRT 10, none on 11 (the ONNX
    types decide)."""
    if variant not in _PRECISION_FLAGS:
        raise MtlEdgeError(
            f"variant {variant!r} cannot be built with TensorRT; use one of "
            f"{', '.join(TRT_VARIANTS)} (int8-cpu is onnxruntime's CPU file, int8 feeds TensorRT)"
        )
    if not has_weak_typing(trt):
        return []
    return [getattr(trt.BuilderFlag, name) for name in _PRECISION_FLAGS[variant]]


def network_flags(trt: Any) -> int:
    """Network creation flags: strongly typed on TensorRT 11 (where the flag still exists),
    none on 10 (weak typing with precision flags; explicit batch is the default there)."""
    if has_weak_typing(trt):
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def default_timing_cache(key: str) -> Path:
    """Timing cache shared by builds on this machine: $XDG_CACHE_HOME/mtl-edge/trt-<key>.cache."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mtl-edge" / f"trt-{key}.cache"


def find_built(bundle: Bundle, variant: str, key: str) -> dict[str, Any] | None:
    """The manifest's engine entry of `variant` for `key` whose file exists, or None."""
    for entry in bundle.manifest.get("engines", []):
        same = entry.get("variant") == variant and entry.get("key") == key
        if same and (bundle.root / entry["file"]).is_file():
            return dict(entry)
    return None


def _build_serialized(
    trt: Any,
    onnx_path: Path,
    input_name: str,
    sample_shape: tuple[int, ...],
    variant: str,
    profile: Profile,
    timing_cache: Path,
    workspace_mb: int,
) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BundleError(
            f"{onnx_path}: TensorRT {trt.__version__} cannot parse it "
            f"({errors[0] if errors else 'no detail'}); re-export the bundle"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in precision_flags(trt, variant):
        config.set_flag(flag)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(
        input_name,
        (profile.min_batch, *sample_shape),
        (profile.opt_batch, *sample_shape),
        (profile.max_batch, *sample_shape),
    )
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MtlEdgeError(
            f"{onnx_path}: TensorRT failed to build the {variant} engine (see its log above); "
            "try a smaller --max-batch or another variant"
        )
    from mtl_edge.atomicio import atomic_write_bytes

    atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def build_engine(
    bundle: Bundle,
    variant: str = "fp32",
    profile: Profile | None = None,
    timing_cache: Path | None = None,
    workspace_mb: int = 2048,
    force: bool = False,
) -> Path:
    """Build (or reuse) the TensorRT engine of `variant` for this GPU and TensorRT and store it
    in the bundle.

    Args:
        bundle: a loaded bundle; its manifest is updated in place.
        variant: "fp32", "fp16" or "int8" (the ONNX file whose types set the precision).
        profile: batch sizes of the optimisation profile (default 1 / 8 / 64).
        timing_cache: timing cache file, read and updated (default `default_timing_cache`).
        workspace_mb: builder workspace memory limit.
        force: rebuild even if the bundle holds an engine for this key.

    Returns:
        the engine file inside the bundle.

    Raises:
        UnavailableError: TensorRT or an NVIDIA GPU is missing (exit code 2).
    """
    from mtl_edge.backends.tensorrt_runtime import import_tensorrt

    trt = import_tensorrt()
    precision_flags(trt, variant)  # refuses int8-cpu and unknown names before any work
    onnx_path = bundle.variant_path(variant)
    gpu, cc = this_gpu()
    version = str(trt.__version__)
    key = engine_key(gpu, cc, version)
    existing = find_built(bundle, variant, key)
    if existing is not None and not force:
        return bundle.root / existing["file"]
    profile = profile or Profile()
    timing_cache = timing_cache or default_timing_cache(key)
    input_name = bundle.manifest["backbone"].get("input_name", "images")
    sample_shape = bundle.preprocess.input_shape
    log.info("building TensorRT %s engine for %s (profile %s)", variant, key, profile)
    plan = _build_serialized(
        trt, onnx_path, input_name, sample_shape, variant, profile, timing_cache, workspace_mb
    )
    rel = engine_file(variant, key)
    entry = {
        "file": rel,
        "variant": variant,
        "key": key,
        "gpu": gpu,
        "compute_capability": cc,
        "tensorrt": version,
        "profile": {"min": profile.min_batch, "opt": profile.opt_batch, "max": profile.max_batch},
        "strongly_typed": not has_weak_typing(trt),
    }
    engines = [
        e
        for e in bundle.manifest.get("engines", [])
        if not (e.get("variant") == variant and e.get("key") == key)
    ]
    bundle.add_files({rel: plan}, {"engines": [*engines, entry]})
    return bundle.root / rel
