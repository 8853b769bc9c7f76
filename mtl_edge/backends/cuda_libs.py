"""Find and load the CUDA 13 and cuDNN 9 libraries that ship with Python packages on this machine.

onnxruntime-gpu 1.31 (built for CUDA 13.0 and cuDNN 9) links its CUDA provider against
`libcublasLt.so.13`, `libcublas.so.13`, `libcurand.so.10` and `libcudart.so.13`, and opens cuDNN,
cuFFT and NVRTC at run time. A machine with PyTorch for CUDA 13 already has all of them, in the
`nvidia-*` wheels (`site-packages/nvidia/cu13/lib`, `site-packages/nvidia/cudnn/lib`; older CUDA 12
wheels used `nvidia/<component>/lib`) or in `torch/lib`. Loading them here with RTLD_GLOBAL before
the first CUDA session lets the provider resolve them by soname, without LD_LIBRARY_PATH.

`onnxruntime.preload_dlls()` does the same but, when no directory is given, looks beside the
onnxruntime package folder: with onnxruntime-gpu installed into a separate `--target` folder (as
on the GPU machine, away from the CPU build) it would not find the system's nvidia packages.

The torch folder is found with `importlib.util.find_spec`; torch is never imported.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Extra library folders (colon separated), searched first.
ENV_DIRS = "MTL_EDGE_CUDA_LIBS"

#: Loaded in this order (a library's own CUDA dependencies first). cuDNN 9 loads its engine
#: libraries itself from its own folder.
SONAMES = (
    "libcudart.so.13",
    "libnvJitLink.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libnvrtc.so.13",
    "libcudnn.so.9",
)
#: Missing these only disables some kernels (FFT convolutions, run-time compiled kernels).
OPTIONAL = frozenset({"libcufft.so.12", "libnvrtc.so.13", "libnvJitLink.so.13"})

_loaded: dict[str, Any] = {}


def _package_dirs(name: str) -> list[Path]:
    """The folders of package `name` on sys.path, found without importing it (the device side
    never imports torch; these folders only hold the CUDA libraries it ships)."""
    return [Path(entry) / name for entry in sys.path if (Path(entry or ".") / name).is_dir()]


def candidate_dirs() -> list[Path]:
    """Folders that may hold the CUDA / cuDNN libraries, most specific first.

    Order: `$MTL_EDGE_CUDA_LIBS`, `nvidia/cu13/lib`, `nvidia/cudnn/lib`, the other
    `nvidia/*/lib`, `torch/lib`. Only existing folders are returned, each once.
    """
    dirs: list[Path] = [Path(p) for p in os.environ.get(ENV_DIRS, "").split(":") if p]
    for root in _package_dirs("nvidia"):
        dirs += [root / "cu13" / "lib", root / "cudnn" / "lib"]
        dirs += sorted(p for p in root.glob("*/lib") if p.is_dir())
    dirs += [root / "lib" for root in _package_dirs("torch")]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in {s.resolve() for s in seen}:
            seen.append(d)
    return seen


def find_library(soname: str, dirs: Sequence[Path]) -> Path | None:
    """The first `dir/soname` that exists, or None."""
    for d in dirs:
        path = d / soname
        if path.is_file():
            return path
    return None


def preload(dirs: Sequence[Path] | None = None) -> dict[str, Any]:
    """Load `SONAMES` from `dirs` (default `candidate_dirs()`) into this process, RTLD_GLOBAL.

    Safe to call more than once; libraries already loaded are kept. A library that is neither
    in `dirs` nor loadable by the system loader (LD_LIBRARY_PATH, ldconfig) is reported under
    "missing"; onnxruntime then falls back to the CPU, which the CUDA backend refuses.

    Returns:
        {"dirs": [str], "loaded": {soname: path}, "missing": [soname], "optional_missing": [...]}
    """
    dirs = list(candidate_dirs() if dirs is None else dirs)
    missing: list[str] = []
    for soname in SONAMES:
        if soname in _loaded:
            continue
        path = find_library(soname, dirs)
        try:
            _loaded[soname] = ctypes.CDLL(str(path or soname), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            log.debug("cannot load %s: %s", soname, e)
            missing.append(soname)
    return {
        "dirs": [str(d) for d in dirs],
        "loaded": {s: getattr(h, "_name", s) for s, h in _loaded.items()},
        "missing": [s for s in missing if s not in OPTIONAL],
        "optional_missing": [s for s in missing if s in OPTIONAL],
    }


def cudart() -> Any | None:
    """The CUDA runtime loaded by `preload` (a ctypes library), or None."""
    return _loaded.get("libcudart.so.13")


def ld_library_path(dirs: Sequence[Path] | None = None) -> str:
    """`candidate_dirs()` as a LD_LIBRARY_PATH value (for shell scripts that start Python)."""
    return ":".join(str(d) for d in (candidate_dirs() if dirs is None else dirs))


if __name__ == "__main__":
    print(ld_library_path())
