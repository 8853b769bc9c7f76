"""Page-locked (pinned) host buffers as numpy arrays, for fast copies to the GPU.

A copy from pageable memory goes through a driver staging buffer; from pinned memory the GPU's
copy engine reads it directly (about twice the bandwidth, and no extra CPU copy). The buffers
come from the CUDA runtime's `cudaHostAlloc`, called through ctypes on the `libcudart` that
`cuda_libs.preload` loaded, so no CUDA Python package is needed. Without a CUDA runtime the
allocator hands out ordinary numpy arrays and says so in `.pinned` / `.reason`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: cudaHostAllocPortable: pinned for every CUDA context of the process.
HOST_ALLOC_PORTABLE = 1


class PinnedAllocator:
    """Allocates host arrays, pinned when a CUDA runtime is given.

    Args:
        cudart: a ctypes CUDA runtime library (with cudaHostAlloc / cudaFreeHost), or None
            for plain numpy arrays.

    Attributes:
        pinned: whether the arrays handed out are page-locked.
        reason: why not, when they are not.
    """

    def __init__(self, cudart: Any | None) -> None:
        self._cudart = cudart
        self._pointers: list[int] = []
        self.pinned = cudart is not None
        self.reason = "" if cudart is not None else "no CUDA runtime loaded"

    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """An uninitialised C-contiguous array of `shape`; pinned when possible.

        A failing cudaHostAlloc (out of pinned memory, no driver) switches this allocator to
        plain arrays for good, with a warning: slower copies, same results.
        """
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self.pinned and nbytes > 0:
            ptr = ctypes.c_void_p()
            err = self._cudart.cudaHostAlloc(
                ctypes.byref(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(HOST_ALLOC_PORTABLE)
            )
            if err == 0 and ptr.value:
                self._pointers.append(ptr.value)
                buf = (ctypes.c_byte * nbytes).from_address(ptr.value)
                return np.frombuffer(buf, dtype=dtype).reshape(shape)
            self.pinned = False
            self.reason = f"cudaHostAlloc({nbytes}) returned error {err}"
            log.warning("pinned host memory unavailable (%s); using pageable buffers", self.reason)
        return np.empty(shape, dtype=dtype)

    def close(self) -> None:
        """Free every pinned buffer. Arrays handed out must not be used afterwards."""
        while self._pointers:
            self._cudart.cudaFreeHost(ctypes.c_void_p(self._pointers.pop()))

    def __del__(self) -> None:  # a forgotten close() must not leak pinned pages
        # At interpreter shutdown ctypes may be gone; the driver frees the pages then anyway.
        with contextlib.suppress(Exception):
            self.close()
