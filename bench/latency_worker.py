"""The worker processes of `bench latency`: one per (backend, precision), driven over pipes.

Protocol (one JSON object per line): the worker prints {"ready": info} or {"error": reason}
after set-up, then answers each {"batch": B, "mode": M, "budget": {...}, "warm": bool} from
stdin with {"times": [...], "device_times": [...] | null} (or {"error": ...}); an empty line or
EOF ends it. Modes: "host" (CPU backends: host arrays in, features out), "compute" (GPU:
input already on the device, output left there) and "copies" (GPU: host -> device copy, run,
device -> host copy, the trtexec end-to-end latency).

Runners: `HostRunner` here (torch on the CPU, anything `create_backend` makes),
`latency_ort_cuda.OrtCudaRunner` (onnxruntime CUDA with IO binding) and
`latency_torch_gpu.TorchGpuRunner` (torch eager, CUDA graphs, torch.compile on the GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.bench.timing import TimingBudget, measure
from mtl_edge.errors import ConfigError, MtlEdgeError

TORCH_GPU = ("torch-cuda", "torch-cuda-graphs", "torch-compile")
#: The fixed images every worker reports features of (`probe`), so the parent can check that
#: all backends run the same network (cosine to the first that reports them).
PROBE_IMAGES, PROBE_SEED = 4, 12345


def probe_images(shape: tuple[int, ...]) -> np.ndarray:
    """(PROBE_IMAGES, C, H, W) float32, the same in every worker."""
    rng = np.random.default_rng(PROBE_SEED)
    return rng.standard_normal((PROBE_IMAGES, *shape), dtype=np.float32)


def random_batch(batch: int, shape: tuple[int, ...]) -> np.ndarray:
    """The random images a setting is timed on: never zeros (they can run faster)."""
    return np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)


class HostRunner:
    """torch (CPU eager FP32, the reference) or a `create_backend` extractor, timed on host
    arrays (mode "host")."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.backend, self.precision = spec["backend"], spec["precision"]
        self.shape = tuple(spec["shape"])
        threads = spec.get("threads")
        if self.backend == "torch":
            self._setup_torch(spec, threads)
        else:
            from mtl_edge.backends.select import create_backend
            from mtl_edge.bundle import Bundle

            bundle = Bundle.load(spec["bundle"])
            extractor = create_backend(
                self.backend, bundle, self.precision, threads=threads, batch_size=spec["max_batch"]
            )
            self.call = extractor.extract
            self.info = {
                "provider": extractor.provider,
                "variant": extractor.precision,
                "threads": threads,
            }

    def _setup_torch(self, spec: dict[str, Any], threads: int | None) -> None:
        import torch

        from mtl_edge.bench.latency_torch_gpu import load_folded_model
        from mtl_edge.bench.machine import torch_flops_per_image

        if threads:
            torch.set_num_threads(threads)
        model = load_folded_model(spec)
        fwd = getattr(model, "forward_features", model)

        def call(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return fwd(torch.from_numpy(x)).float().numpy()

        self.call = call
        self.info = {
            "provider": f"torch {torch.__version__} eager on cpu",
            "variant": "fp32",
            "threads": torch.get_num_threads(),
            "flops_per_image": torch_flops_per_image(model, self.shape),
            "torch_model": "folded (SS and BN folded into the convs)",
        }

    def probe(self) -> np.ndarray:
        return np.asarray(self.call(probe_images(self.shape)), dtype=np.float32)

    def run(self, batch: int, mode: str, budget: TimingBudget, warm: bool) -> dict[str, Any]:
        if mode != "host":
            raise ConfigError(f"{self.backend} runs on the host: mode {mode!r} does not apply")
        x = random_batch(batch, self.shape)
        return {"times": measure(lambda: self.call(x), budget, warm), "device_times": None}


def make_runner(spec: dict[str, Any]) -> Any:
    """The runner of spec["backend"]."""
    if spec["backend"] in TORCH_GPU:
        from mtl_edge.bench.latency_torch_gpu import TorchGpuRunner

        return TorchGpuRunner(spec)
    if spec["backend"] == "onnxruntime-cuda":
        from mtl_edge.bench.latency_ort_cuda import OrtCudaRunner

        return OrtCudaRunner(spec)
    return HostRunner(spec)


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, MtlEdgeError) else f"{type(e).__name__}: {e}"
    return (text.strip().splitlines() or [type(e).__name__])[0]


def worker_main(spec_json: str) -> None:
    """Entry of a worker process (see the module docstring for the protocol)."""
    spec = json.loads(spec_json)
    try:
        runner = make_runner(spec)
        info = dict(runner.info)
        if spec.get("probe"):
            info["probe"] = runner.probe().round(6).tolist()
    except Exception as e:  # noqa: BLE001 - any set-up failure is reported as a skip reason
        print(json.dumps({"error": _one_line(e)}), flush=True)
        return
    print(json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        try:
            budget = TimingBudget(**req["budget"])
            res = runner.run(int(req["batch"]), req.get("mode", "host"), budget, req["warm"])
        except Exception as e:  # noqa: BLE001 - one failing batch skips, the worker goes on
            res = {"error": _one_line(e)}
        print(json.dumps(res), flush=True)


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtl_edge.bench.latency_worker", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        tail = (err.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited ({tail})"}

    def request(self, batch: int, mode: str, budget: TimingBudget, warm: bool) -> dict[str, Any]:
        assert self.proc.stdin is not None
        req = {"batch": batch, "mode": mode, "budget": budget.to_dict(), "warm": warm}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {"error": "worker exited"}
        return self.read()

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bundle_path(spec: dict[str, Any]) -> Path:
    if not spec.get("bundle"):
        raise ConfigError(f"{spec['backend']}: needs --bundle B")
    return Path(spec["bundle"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    else:
        sys.exit("usage: python -m mtl_edge.bench.latency_worker --worker SPEC_JSON")
