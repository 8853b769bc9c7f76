"""What this machine is: versions, CPU model and flags, GPUs, available backends.

Benchmarks and run folders record this next to every figure, because the CPU model differs from
one machine to the next and results only mean something with the machine named.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: CPU flags that decide which int8 / bf16 kernels onnxruntime and torch can use.
INTERESTING_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_info() -> dict[str, Any]:
    """CPU model, logical cores usable by this process and the flags that matter."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return {
        "model": model,
        "cores": usable,
        "flags": {f: f in flags for f in INTERESTING_FLAGS},
    }


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def onnxruntime_info() -> dict[str, Any]:
    """onnxruntime's version and providers, or why it does not import."""
    try:
        import onnxruntime
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to report
        return {"version": None, "missing_reason": _reason(e)}
    return {
        "version": onnxruntime.__version__,
        "missing_reason": None,
        "providers": onnxruntime.get_available_providers(),
    }


def tensorrt_info() -> dict[str, Any]:
    """TensorRT's version, or why it does not import (the wheel can be a stub)."""
    try:
        import tensorrt
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to report
        return {"version": None, "missing_reason": _reason(e)}
    return {"version": str(getattr(tensorrt, "__version__", "unknown")), "missing_reason": None}


def torch_info() -> dict[str, Any]:
    """torch's installed version (read from its metadata: the device side never imports torch)
    and, when the calling program has imported torch already, its CUDA state and threads."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return {"version": None, "missing_reason": "torch is not installed"}
    info: dict[str, Any] = {"version": version, "missing_reason": None}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["cuda"] = torch.version.cuda
        info["cuda_available"] = bool(torch.cuda.is_available())
        info["threads"] = torch.get_num_threads()
    return info


def git_commit() -> str | None:
    """The commit of the source tree mtl-edge runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def gpu_info() -> list[dict[str, str]]:
    """GPUs as reported by nvidia-smi (name, driver, memory, compute capability), or []."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = "name,driver_version,memory.total,compute_cap"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append(
                dict(zip(("name", "driver", "memory", "compute_capability"), parts, strict=True))
            )
    return gpus


def collect() -> dict[str, Any]:
    """Everything `mtl-edge info` prints, as a JSON-ready dict."""
    import numpy

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "cpu": cpu_info(),
        "gpus": gpu_info(),
        "onnxruntime": onnxruntime_info(),
        "tensorrt": tensorrt_info(),
        "torch": torch_info(),
    }
