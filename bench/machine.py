"""The machine's limits beside the latency figures: measured peak matmul rate and the FLOPs a
model spends per image.

Peaks are measured in the same run as the latencies (in their own process, see
`measure_peaks`), because a VM's speed depends on its neighbours at the time. The int8 peak is
onnxruntime's `MatMulInteger` with uint8 x int8 inputs, the kernel family its U8S8 quantized
convolutions use; the fp32 peak is the best of torch's and onnxruntime's fp32 matmul.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from mtl_edge.bench.timing import TimingBudget, measure

log = logging.getLogger(__name__)

#: Square matmul size for the peaks: large enough to be compute bound, small enough for L3-ish
#: blocking to work on a 2-core VM in well under a second per call.
PEAK_N = 1024


def _matmul_ops(n: int) -> float:
    return 2.0 * n**3


def _ort_matmul_session(n: int, int8: bool, threads: int | None) -> tuple[Any, dict[str, Any]]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if int8:
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        rng = np.random.default_rng(0)
        feeds: dict[str, np.ndarray] = {
            "a": rng.integers(0, 255, (n, n), dtype=np.uint8),
            "b": rng.integers(-127, 127, (n, n), dtype=np.int8),
        }
    else:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        rng = np.random.default_rng(0)
        feeds = {
            "a": rng.standard_normal((n, n), dtype=np.float32),
            "b": rng.standard_normal((n, n), dtype=np.float32),
        }
    model = helper.make_model(
        helper.make_graph([node], "peak", [a, b], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, feeds


def peak_rates(budget: TimingBudget, n: int = PEAK_N, threads: int | None = None) -> dict:
    """Measured peak operations per second (best of the runs) of large matmuls.

    Returns:
        {"fp32": {"ops_per_s", "source"}, "int8": {...}, "n": n}; an entry is
        {"error": reason} where its library is missing.
    """
    out: dict[str, Any] = {"n": n}
    ops = _matmul_ops(n)
    best: dict[str, tuple[float, str]] = {}
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        x = torch.randn(n, n)
        y = torch.randn(n, n)
        times = measure(lambda: torch.mm(x, y), budget)
        best["fp32"] = (ops / min(times), "torch.mm float32")
    except ImportError as e:
        log.debug("no torch for the fp32 peak: %s", e)
    try:
        for key, int8 in (("fp32", False), ("int8", True)):
            sess, feeds = _ort_matmul_session(n, int8, threads)
            times = measure(lambda s=sess, f=feeds: s.run(None, f), budget)
            rate = ops / min(times)
            name = "onnxruntime MatMulInteger u8s8" if int8 else "onnxruntime MatMul float32"
            if key not in best or rate > best[key][0]:
                best[key] = (rate, name)
    except ImportError as e:
        out["int8"] = {"error": f"onnxruntime/onnx not installed ({e})"}
    for key, (rate, source) in best.items():
        out[key] = {"ops_per_s": rate, "source": source}
    out.setdefault("fp32", {"error": "neither torch nor onnxruntime is installed"})
    return out


def measure_peaks(budget: TimingBudget, threads: int | None = None) -> dict[str, Any]:
    """`peak_rates` in a fresh process (so its thread pools do not linger in the caller)."""
    spec = json.dumps({"budget": budget.to_dict(), "threads": threads})
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_edge.bench.machine", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"peak measurement failed: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_flops_per_image(model: Any, input_shape: tuple[int, int, int]) -> float:
    """FLOPs (2 x multiply-accumulates) of convolutions and linear layers for one image,
    counted with forward hooks on one forward pass of a batch of 1.

    Args:
        model: a torch nn.Module taking images of shape (1, C, H, W).
        input_shape: (C, H, W).
    """
    import torch
    from torch import nn

    macs = 0

    def conv_hook(mod: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = mod.kernel_size
        macs += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
    return 2.0 * macs


def onnx_flops_per_image(path: str, input_shape: tuple[int, int, int]) -> float:
    """FLOPs of Conv / QLinearConv / MatMul / Gemm nodes for one image, from the ONNX graph
    with shapes inferred at batch 1 (weights are read from the initializers)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(path)
    graph = model.graph
    inits = {t.name: tuple(numpy_helper.to_array(t).shape) for t in graph.initializer}
    inp = next(i for i in graph.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    for d, v in zip(dims, (1, *input_shape), strict=False):
        d.ClearField("dim_param")
        d.dim_value = v
    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, ...]] = dict(inits)
    for vi in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        shapes[vi.name] = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
    # DequantizeLinear outputs carry the weight shapes of QDQ graphs.
    for node in inferred.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            shapes[node.output[0]] = inits[node.input[0]]
    macs = 0.0
    for node in inferred.graph.node:
        out_shape = shapes.get(node.output[0], ())
        if not out_shape or 0 in out_shape:
            continue
        if node.op_type == "Conv":
            w = shapes.get(node.input[1], ())
            if len(w) == 4:
                macs += float(np.prod(out_shape)) * w[1] * w[2] * w[3]
        elif node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0], ())
            if a:
                macs += float(np.prod(out_shape)) * a[-1]
    return 2.0 * macs


def _cuda() -> bool:
    torch = sys.modules.get("torch")  # only when the caller already uses torch
    return bool(torch is not None and torch.cuda.is_available())


def reset_peak_memory() -> None:
    """Start a new peak-memory window (CUDA allocator; the CPU peak RSS cannot be reset)."""
    if _cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): GPU allocator peak, else this process's peak RSS."""
    if _cuda():
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes. The RSS peak is the process's so far, not the stage's.
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def matmul_rate(device: str | None = None, seconds: float = 1.0) -> dict[str, Any]:
    """Measure a dense matrix-product rate on this machine.

    bf16 8192^3 products on a GPU, fp32 1024^3 on the CPU; the mean of the products run in
    about `seconds` after a warm-up.

    Returns:
        {"device", "dtype", "n", "flops_per_s"}.
    """
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    dtype, n = (torch.bfloat16, 8192) if gpu else (torch.float32, 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(dev)

    for _ in range(3):
        a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 5 == 0 or not gpu:
            sync()
            if time.perf_counter() - start >= seconds:
                break
    sync()
    elapsed = time.perf_counter() - start
    return {
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "flops_per_s": 2 * n**3 * reps / elapsed,
    }


def _main() -> None:
    spec = json.loads(sys.argv[1])
    budget = TimingBudget(**spec["budget"])
    print(json.dumps(peak_rates(budget, threads=spec.get("threads"))))


if __name__ == "__main__":
    _main()
