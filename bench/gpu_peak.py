"""The GPU's measured ceilings for `bench latency`, in a process of their own (torch).

- Matrix rates: an n x n x n matmul (n = 8192 on the GPU) in bf16, fp16, tf32 (float32 inputs
  on the tensor cores, what cuDNN's default FP32 convolutions use) and strict fp32, on random
  data (zeros run faster), 3 warm-up products then the median of 10, timed with CUDA events.
- Bandwidths: a device-to-device copy of 2 GiB (bytes read + written), and host-to-device
  copies of 256 MiB from pinned and from pageable memory (what the "copies" mode pays).

These are practical ceilings of this GPU and library now, measured in the same command as the
latencies, not data-sheet numbers. `dry_run` runs small sizes on the CPU to check the code.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

MATMUL_N = 8192
COPY_BYTES = 2 << 30
H2D_BYTES = 256 << 20


def _timed(fn: Any, cuda: bool, warmup: int = 3, runs: int = 10) -> float:
    """Median seconds of fn() over `runs` calls after `warmup`."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def gpu_peaks(dry_run: bool = False) -> dict[str, Any]:
    """{"matmul": {dtype: {"tflops", "n"}}, "copy_gbps", "h2d_pinned_gbps", "h2d_pageable_gbps",
    "device"}."""
    import torch

    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        return {"error": "torch sees no CUDA GPU"}
    dev = torch.device("cuda" if cuda else "cpu")
    n = MATMUL_N if cuda else 256
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "matmul": {},
    }
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", None)):
        a = torch.randn(n, n, device=dev, generator=gen, dtype=dtype or torch.float32)
        b = torch.randn(n, n, device=dev, generator=gen, dtype=dtype or torch.float32)
        seconds = _timed(lambda a=a, b=b: a @ b, cuda)
        out["matmul"][name] = {"tflops": 2 * n**3 / seconds / 1e12, "n": n}
    if cuda:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        a = torch.randn(n, n, device=dev, generator=gen)
        out["matmul"]["fp32"] = {"tflops": 2 * n**3 / _timed(lambda: a @ a, cuda) / 1e12, "n": n}
        torch.backends.cuda.matmul.allow_tf32 = old
    size = COPY_BYTES if cuda else 1 << 24
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device=dev, generator=gen)
    dst = torch.empty_like(src)
    out["copy_gbps"] = 2 * size / _timed(lambda: dst.copy_(src), cuda) / 1e9
    if cuda:
        for kind, pin in (("pinned", True), ("pageable", False)):
            host = torch.randint(0, 255, (H2D_BYTES,), dtype=torch.uint8)
            host = host.pin_memory() if pin else host
            dev_buf = torch.empty(H2D_BYTES, dtype=torch.uint8, device=dev)
            seconds = _timed(lambda h=host, d=dev_buf: d.copy_(h, non_blocking=True), cuda)
            out[f"h2d_{kind}_gbps"] = H2D_BYTES / seconds / 1e9
    return out


def measure_gpu_peaks(dry_run: bool = False, timeout_s: float = 120.0) -> dict[str, Any]:
    """`gpu_peaks` in a fresh process (its CUDA context and memory go away with it)."""
    import subprocess

    args = [sys.executable, "-m", "mtl_edge.bench.gpu_peak", json.dumps({"dry_run": dry_run})]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"GPU peak measurement took over {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"GPU peak measurement failed: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(gpu_peaks(**json.loads(sys.argv[1]))))
