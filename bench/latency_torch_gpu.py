"""PyTorch on the GPU for `bench latency`: the comparison the onnxruntime CUDA path is held to.

Backends (each in its own worker process, see `latency_worker.py`):

- "torch-cuda": eager.
- "torch-cuda-graphs": eager captured into one CUDA graph per batch size, replayed.
- "torch-compile": `torch.compile(mode="reduce-overhead")` (inductor kernels replayed through
  CUDA graphs), compiled once per batch size (`dynamic=False`); the compile time is reported.

Precisions: "fp32" (cuDNN's default TF32 convolutions, as torch ships them), "fp16" and "bf16"
(autocast). The network runs channels-last, the layout cuDNN's tensor-core kernels want.
Modes: "compute" (input already on the GPU; host-timed call + synchronize, and CUDA-event device
time separately) and "copies" (pinned host batch -> GPU, run, features -> host).

The network is the bundle's own: the registry backbone named in the manifest, folded, with the
ONNX file's initializers loaded into it (`load_folded_model`), so torch and onnxruntime run the
same weights without carrying a checkpoint to the GPU machine. `dry_run` runs the same code on
the CPU (no CUDA graphs; torch.compile with the "eager" backend) to check the plan offline.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.bench.latency_worker import probe_images, random_batch
from mtl_edge.bench.timing import TimingBudget, measure
from mtl_edge.errors import ConfigError, MtlEdgeError, UnavailableError

VARIANTS = {"torch-cuda": "eager", "torch-cuda-graphs": "graphs", "torch-compile": "compile"}
PRECISIONS = ("fp32", "fp16", "bf16")


def model_from_bundle(bundle_dir: str | Path) -> Any:
    """The bundle's network as a folded torch module (eval, CPU) with the FP32 ONNX weights.

    Initializer names are the folded module's parameter names under the exporter's
    "backbone." prefix. Parameters the ONNX file lacks must be all-zero biases the exporter's
    optimizer dropped; they are set to zero.

    Raises:
        MtlEdgeError: the manifest names no registry backbone, or the weights do not fit it.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    from mtl_edge.bundle import Bundle
    from mtl_edge.train.backbones import create_backbone
    from mtl_edge.train.fuse import fuse_model

    bundle = Bundle.load(bundle_dir)
    spec = bundle.manifest["backbone"]
    try:
        model = create_backbone(spec["name"], **dict(spec.get("args", {})))
    except (KeyError, MtlEdgeError, TypeError) as e:
        raise MtlEdgeError(
            f"{bundle.root}: backbone {spec.get('name')!r} is not a registry backbone ({e}); "
            "give --checkpoint C for the torch settings"
        ) from None
    folded = fuse_model(model).eval()
    weights = {
        t.name.removeprefix("backbone."): numpy_helper.to_array(t)
        for t in onnx.load(str(bundle.variant_path("fp32"))).graph.initializer
    }
    state = folded.state_dict()
    for key, value in state.items():
        if key in weights and tuple(weights[key].shape) == tuple(value.shape):
            state[key] = torch.from_numpy(weights[key].copy())
        elif key.endswith("bias") and key not in weights:
            state[key] = torch.zeros_like(value)
        else:
            raise MtlEdgeError(f"{bundle.root}: ONNX weights do not fit {spec['name']} at {key}")
    folded.load_state_dict(state)
    return folded


def load_folded_model(spec: dict[str, Any]) -> Any:
    """The folded torch network of a worker spec: its checkpoint, else its bundle's weights."""
    if spec.get("checkpoint"):
        from mtl_edge.train.checkpoint import load_checkpoint
        from mtl_edge.train.fuse import fuse_model

        return fuse_model(load_checkpoint(Path(spec["checkpoint"])).backbone).eval()
    if spec.get("bundle"):
        return model_from_bundle(spec["bundle"])
    raise ConfigError("torch settings need --checkpoint C or a --bundle of a registry backbone")


class TorchGpuRunner:
    """One torch GPU setting (backend, precision) set up for timing."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from mtl_edge.bench.machine import torch_flops_per_image

        self.torch = torch
        self.backend, self.precision = spec["backend"], spec["precision"]
        self.variant = VARIANTS[self.backend]
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{self.backend}: precision {self.precision!r} not in {PRECISIONS}")
        self.dry_run = bool(spec.get("dry_run"))
        if not self.dry_run and not torch.cuda.is_available():
            raise UnavailableError(f"{self.backend}: torch sees no CUDA GPU here")
        self.device = torch.device("cpu" if self.dry_run else "cuda")
        self.shape = tuple(spec["shape"])
        model = load_folded_model(spec)
        flops = torch_flops_per_image(model, self.shape)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        self.fwd: Any = self.model.forward_features
        if self.variant == "compile":
            mode = {"backend": "eager"} if self.dry_run else {"mode": "reduce-overhead"}
            self.fwd = torch.compile(self.fwd, dynamic=False, **mode)
        self.graphs: dict[int, tuple[Any, Any, Any]] = {}
        self.compile_s: dict[str, float] = {}
        self.info = {
            "provider": f"torch {torch.__version__} {self.variant} on {self.device.type}"
            + (f" ({self.precision} autocast)" if self.dtype else "")
            + ", channels_last",
            "variant": self.precision,
            "torch_variant": self.variant,
            "flops_per_image": flops,
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
            "torch_model": "folded, weights from the bundle"
            if not spec.get("checkpoint")
            else "folded checkpoint",
            "compile_s": self.compile_s,
        }

    def _autocast(self) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _to_device(self, x: Any, non_blocking: bool = False) -> Any:
        t = x.to(self.device, non_blocking=non_blocking)
        return t.contiguous(memory_format=self.torch.channels_last)

    def _forward(self, x: Any) -> Any:
        if self.variant == "compile" and not self.dry_run:
            self.torch.compiler.cudagraph_mark_step_begin()
        with self.torch.inference_mode(), self._autocast():
            return self.fwd(x)

    def _graph(self, static_in: Any) -> tuple[Any, Any]:
        """Capture the forward of `static_in`'s batch size (after warm-up on a side stream)."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._forward(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._forward(static_in)
        return graph, static_out

    def _step(self, batch: int) -> tuple[Any, Any]:
        """(input tensor on the device to fill, a callable running the network on it)."""
        if self.variant == "graphs" and self.device.type == "cuda":
            if batch not in self.graphs:
                static_in = self._to_device(self.torch.zeros((batch, *self.shape)))
                self.graphs[batch] = (static_in, *self._graph(static_in))
            static_in, graph, static_out = self.graphs[batch]
            return static_in, lambda: (graph.replay(), static_out)[1]
        dev_in = self._to_device(self.torch.zeros((batch, *self.shape)))
        if self.variant == "compile" and str(batch) not in self.compile_s:
            start = time.perf_counter()
            self._forward(dev_in)
            self._sync()
            self.compile_s[str(batch)] = time.perf_counter() - start
        return dev_in, lambda: self._forward(dev_in)

    def probe(self) -> np.ndarray:
        x = self.torch.from_numpy(probe_images(self.shape))
        with self.torch.inference_mode(), self._autocast():
            out = self.model.forward_features(self._to_device(x))
        return out.float().cpu().numpy()

    def run(self, batch: int, mode: str, budget: TimingBudget, warm: bool) -> dict[str, Any]:
        torch = self.torch
        host = torch.from_numpy(random_batch(batch, self.shape))
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev_in, step = self._step(batch)
        dev_in.copy_(host)
        if mode == "compute":

            def call() -> None:
                step()
                self._sync()

        elif mode == "copies":

            def call() -> None:
                dev_in.copy_(host, non_blocking=True)
                step().float().cpu()

        else:
            raise ConfigError(f"{self.backend}: mode {mode!r}; use compute or copies")
        times = measure(call, budget, warm)
        device_times = self._event_times(step, len(times)) if mode == "compute" else None
        return {"times": times, "device_times": device_times}

    def _event_times(self, step: Any, runs: int) -> list[float] | None:
        """CUDA-event seconds of the network alone, over up to 200 calls."""
        if self.device.type != "cuda":
            return None
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        out = []
        for _ in range(max(10, min(runs, 200))):
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        return out
