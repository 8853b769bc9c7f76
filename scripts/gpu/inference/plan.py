"""The GPU inference plan of issue 20 as data: its calls, the benchmark they run, the time each
is expected to take, and the limits of the lent machine they must fit.

    python3 scripts/gpu/inference/plan.py estimate        the device-time budget, per call
    python3 scripts/gpu/inference/plan.py bench-args      the `bench latency` options
    python3 scripts/gpu/inference/plan.py bench-args --dry-run   the same, sized for a CPU

Everything comes from plan.json beside this file; tests/test_gpu_inference_plan.py checks it
against the limits (/work/.library/device/README.md: 64 MiB per call, 10 minutes per command,
8 files of 16 MiB back, and this plan's own 10 minutes of device time in all).

The benchmark's time is counted, not guessed: (setting, mode, batch) triples x (warm-up +
min-time), plus per-worker set-up, cuDNN algorithm search per shape, compile time per
torch.compile batch, the GPU peaks and the parity pass; the fixed costs are estimates, named
as such in plan.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PLAN = Path(__file__).with_name("plan.json")
MIB = 1 << 20


def load_plan(path: Path = PLAN) -> dict[str, Any]:
    return json.loads(path.read_text())


def parse_setting(entry: str, batch_sizes: list[int]) -> tuple[str, str, list[str], list[int]]:
    """(backend, precision, modes, batches) of a "backend:precision[:m+m][@b/b]" entry."""
    spec, _, at = entry.partition("@")
    parts = spec.split(":")
    modes = parts[2].split("+") if len(parts) > 2 else ["compute"]
    batches = [int(b) for b in at.split("/")] if at else list(batch_sizes)
    return parts[0], parts[1], modes, batches


def measurements(bench: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """Every (backend, precision, mode, batch) the benchmark times, in order."""
    out = []
    for entry in bench["settings"]:
        backend, precision, modes, batches = parse_setting(entry, bench["batch_sizes"])
        out += [(backend, precision, m, b) for b in batches for m in modes]
    return out


def bench_seconds(bench: dict[str, Any]) -> dict[str, float]:
    """The estimated seconds of the `bench latency` command, by part."""
    cost = bench["cost_s"]
    timed = measurements(bench)
    workers = bench["settings"]
    ort_shapes = sum(
        len(parse_setting(e, bench["batch_sizes"])[3])
        for e in workers
        if e.startswith("onnxruntime-cuda")
    )
    compiles = sum(
        len(parse_setting(e, bench["batch_sizes"])[3])
        for e in workers
        if e.startswith("torch-compile")
    )
    return {
        "timing": len(timed) * (bench["warmup_s"] + bench["min_time_s"]),
        "worker_setup": len(workers) * cost["worker_setup"],
        "cudnn_search": ort_shapes * cost["cudnn_search_per_shape"],
        "compile": compiles * cost["compile_per_batch"],
        "gpu_peak": cost["gpu_peak"],
        "parity": cost["parity"],
        "pipeline": cost["pipeline"],
        "report": cost["report"],
    }


def compute_seconds(plan: dict[str, Any]) -> float:
    """The compute command: its steps before the benchmark, and the benchmark."""
    return sum(plan["compute_steps_s"].values()) + sum(bench_seconds(plan["bench"]).values())


def call_seconds(plan: dict[str, Any], call: dict[str, Any], carried_bytes: int) -> float:
    """Device seconds of one call: its start (first call), transfer, command and the gap."""
    est = plan["estimate_s"]
    seconds = est["call_overhead"] + carried_bytes / MIB / est["transfer_mib_per_s"]
    seconds += est["start"] if call["n"] == 1 else est["gap_between_calls"]
    if call.get("runs_bench"):
        seconds += compute_seconds(plan)
    else:
        seconds += call["command_s"]
    return seconds


def carried_bytes(plan: dict[str, Any], call: dict[str, Any]) -> int:
    """What the call carries besides the repository: its wheel part, and the bundle."""
    wheel = plan["wheel"]
    part = wheel["part_mib"] * MIB
    n_parts = -(-wheel["bytes"] // part)
    size = 0
    for p in call.get("parts", []):
        size += part if p < n_parts else wheel["bytes"] - part * (n_parts - 1)
    if call.get("bundle"):
        size += plan["bundle"]["fp32_bytes"] + plan["bundle"]["manifest_bytes"]
    return size


def estimate(plan: dict[str, Any]) -> dict[str, Any]:
    """{"calls": [{n, carried_mib, seconds}], "total_s", "total_worst_s", "compute_command_s"}."""
    calls = []
    for call in plan["calls"]:
        size = carried_bytes(plan, call) + plan["repo_bytes"]
        calls.append(
            {
                "n": call["n"],
                "carried_mib": round(size / MIB, 2),
                "seconds": round(call_seconds(plan, call, size), 1),
            }
        )
    total = sum(c["seconds"] for c in calls)
    est = plan["estimate_s"]
    bench = bench_seconds(plan["bench"])
    compute = compute_seconds(plan)
    return {
        "calls": calls,
        "total_s": round(total, 1),
        "total_worst_s": round(total - est["start"] + est["start_worst"], 1),
        "compute_command_s": round(compute, 1),
        "bench_s": {k: round(v, 1) for k, v in bench.items()},
        "measurements": len(measurements(plan["bench"])),
    }


def bench_args(plan: dict[str, Any], dry_run: bool = False) -> list[str]:
    """The `bench latency` options of the plan (sized down for a CPU with `dry_run`)."""
    b = {**plan["bench"], **(plan["dry_run"] if dry_run else {})}
    if dry_run:  # every setting at the dry run's few small batches
        b["settings"] = [entry.partition("@")[0] for entry in b["settings"]]
    args = [
        "--settings", ",".join(b["settings"]),
        "--batch-sizes", ",".join(map(str, b["batch_sizes"])),
        "--order", "setting", "--rounds", "1",
        "--min-time", str(b["min_time_s"]), "--min-runs", str(b["min_runs"]),
        "--warmup", str(b["warmup_s"]), "--warmup-runs", str(b["warmup_runs"]),
        "--deadline", str(b["deadline_s"]),
        "--parity-episodes", str(b["parity_episodes"]),
        "--pipeline-images", str(b["pipeline_images"]),
        "--no-peak",
    ]  # fmt: skip
    return [*args, "--dry-run"] if dry_run else args


def main(argv: list[str]) -> int:
    plan = load_plan()
    if argv[:1] == ["estimate"]:
        print(json.dumps(estimate(plan), indent=1))
    elif argv[:1] == ["bench-args"]:
        print(" ".join(f"'{a}'" for a in bench_args(plan, "--dry-run" in argv)))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
