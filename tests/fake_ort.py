"""A fake `onnxruntime` module for the CUDA path's logic on machines without a GPU.

It follows the documented Python API that `mtl_edge.backends.ort_cuda` uses (InferenceSession
with provider options, io_binding / bind_ortvalue_input / bind_ortvalue_output,
run_with_iobinding, OrtValue.ortvalue_from_shape_and_type / update_inplace / numpy, RunOptions
with `gpu_graph_id`) on host memory, and records every call. The "model" is linear: the mean of
each channel over H and W, times a fixed (C, D) matrix, so tests can compute the expected
features. Nothing here ran on a GPU.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def fake_features(images: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """What the fake model computes: (N, C, H, W) -> (N, D)."""
    return images.astype(np.float32).mean(axis=(2, 3)) @ weight


@dataclass
class NodeArg:
    name: str
    type: str
    shape: list[Any]


@dataclass
class FakeState:
    """What the fake records, and how it behaves."""

    runs_on: list[str] = field(default_factory=lambda: [CUDA, CPU])
    available: list[str] = field(default_factory=lambda: [CUDA, CPU])
    refuse_graphs: bool = False
    fail_capture: bool = False
    io_type: str = "tensor(float)"
    static_batch: int | None = None
    sessions: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)


def make_fake_ort(
    weight: np.ndarray, image_shape: tuple[int, int, int], state: FakeState
) -> types.ModuleType:
    """A module object to put in sys.modules["onnxruntime"]."""
    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "1.31.1-fake"
    ort.get_available_providers = lambda: list(state.available)
    ort.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99)
    ort.ExecutionMode = types.SimpleNamespace(ORT_SEQUENTIAL=0)

    class SessionOptions:
        pass

    class RunOptions:
        def __init__(self) -> None:
            self.entries: dict[str, str] = {}

        def add_run_config_entry(self, key: str, value: str) -> None:
            self.entries[key] = value

    class OrtValue:
        def __init__(self, array: np.ndarray, device: str) -> None:
            self.array, self.device = array, device

        @classmethod
        def ortvalue_from_shape_and_type(cls, shape, dtype, device="cpu", device_id=0):
            state.events.append(("alloc", device, tuple(shape)))
            return cls(np.full(shape, np.nan, dtype=dtype), device)

        def update_inplace(self, data: Any) -> None:
            data = data.array if isinstance(data, OrtValue) else data
            if data.shape != self.array.shape:
                raise ValueError(f"update_inplace shape {data.shape} != {self.array.shape}")
            state.events.append(("upload", self.device, data.shape, data.dtype.name))
            self.array[...] = data

        def numpy(self) -> np.ndarray:
            return self.array.copy()

    class IOBinding:
        def __init__(self) -> None:
            self.inputs: dict[str, OrtValue] = {}
            self.outputs: dict[str, OrtValue] = {}

        def bind_ortvalue_input(self, name: str, value: OrtValue) -> None:
            state.events.append(("bind_in", name, value.array.shape))
            self.inputs[name] = value

        def bind_ortvalue_output(self, name: str, value: OrtValue) -> None:
            state.events.append(("bind_out", name, value.array.shape))
            self.outputs[name] = value

    class InferenceSession:
        def __init__(self, path: str, options: Any = None, providers: Any = None) -> None:
            opts = dict(providers[0][1]) if isinstance(providers[0], tuple) else {}
            state.sessions.append({"path": path, "providers": providers, "options": opts})
            if state.refuse_graphs and opts.get("enable_cuda_graph") == "1":
                raise RuntimeError("This session cannot use the CUDA Graph feature as requested")
            batch = state.static_batch or "batch"
            self._in = NodeArg("images", state.io_type, [batch, *image_shape])
            self._out = NodeArg("features", state.io_type, [batch, weight.shape[1]])

        def get_providers(self) -> list[str]:
            return list(state.runs_on)

        def get_inputs(self) -> list[NodeArg]:
            return [self._in]

        def get_outputs(self) -> list[NodeArg]:
            return [self._out]

        def io_binding(self) -> IOBinding:
            return IOBinding()

        def run_with_iobinding(self, binding: IOBinding, run_options: Any = None) -> None:
            x = binding.inputs["images"].array
            graph = (run_options.entries if run_options else {}).get("gpu_graph_id")
            if state.fail_capture and graph is not None:
                raise RuntimeError("CUDA failure 901: operation not permitted when capturing")
            state.events.append(("run", x.shape[0], graph))
            out = binding.outputs["features"].array
            out[...] = fake_features(x, weight).astype(out.dtype)

        def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            state.events.append(("plain_run", feeds["images"].shape[0]))
            return [fake_features(feeds["images"], weight)]

    ort.SessionOptions = SessionOptions
    ort.RunOptions = RunOptions
    ort.OrtValue = OrtValue
    ort.InferenceSession = InferenceSession
    return ort


class FakeCudart:
    """`cudaHostAlloc` / `cudaFreeHost` on ctypes buffers (host memory, nothing pinned)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.buffers: dict[int, Any] = {}
        self.freed: list[int] = []

    def cudaHostAlloc(self, ptr_ref: Any, size: Any, flags: Any) -> int:  # noqa: N802
        import ctypes

        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        buf = ctypes.create_string_buffer(size.value)
        self.buffers[ctypes.addressof(buf)] = buf
        ptr_ref._obj.value = ctypes.addressof(buf)
        return 0

    def cudaFreeHost(self, ptr: Any) -> int:  # noqa: N802
        self.freed.append(ptr.value)
        return 0
