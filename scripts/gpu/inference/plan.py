"""The GPU inference plan of issue 20 as data: its calls, the benchmark they run, the time each
is expected to take, and the limits of the lent machine they must fit.

    python3 scripts/gpu/inference/plan.py calls           each call's `run` arguments (JSON)
    python3 scripts/gpu/inference/plan.py estimate        the device-time budget, per call
    python3 scripts/gpu/inference/plan.py deadline HELD_S  BENCH_DEADLINE_S for the compute
                                                          call after HELD_S s of device time
    python3 scripts/gpu/inference/plan.py bench-args      the `bench latency` options
    python3 scripts/gpu/inference/plan.py bench-args --dry-run   the same, sized for a CPU

The machine's limits come from scripts/gpu/lease.json (shared by every device plan: 64 MiB per
call, of which the working tree may take repo_mib_max, 10 minutes per command, 8 files of
16 MiB back); the rest from plan.json beside this file, with this plan's own 10 minutes of
device time in all. tests/test_gpu_inference_plan.py checks the one against the other.

The calls are derived from the sizes: each payload (the wheel, the bundle's tar) is cut into
parts of at most call_mib - repo_mib_max - margin_mib, the parts are packed into as few calls
as hold them (first fit, largest first) and the call carrying least comes last and runs the
benchmark, so that a rerun of it on the warm machine sends little.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/gpu: limits.py
import limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # also under PYTHONSAFEPATH=1 (device.sh)
from parts import part_sizes  # noqa: E402

PLAN = Path(__file__).with_name("plan.json")
MIB = limits.MIB
DEVICE_SH = "bash scripts/gpu/inference/device.sh"


def load_plan(path: Path = PLAN) -> dict[str, Any]:
    """plan.json with the lease limits in plan["lease"] (`limits.load_plan`)."""
    return limits.load_plan(path)


part_bytes = limits.part_limit


def payload_sizes(plan: dict[str, Any]) -> dict[str, int]:
    """Bytes of each payload carried in parts, from plan.json (prepare.py passes real ones)."""
    return {"wheel": plan["wheel"]["bytes"], "bundle": plan["bundle"]["tar_bytes"]}


def layout(plan: dict[str, Any], sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The calls: [{n, parts: [[payload, index, bytes], ...], carry, command, timeout_s,
    runs_bench}], every part in exactly one call, each call's parts within part_bytes."""
    cap = part_bytes(plan)
    parts = [
        [name, i, n]
        for name, total in (sizes or payload_sizes(plan)).items()
        for i, n in enumerate(part_sizes(total, cap), 1)
    ]
    bins: list[list[list[Any]]] = []
    for part in sorted(parts, key=lambda p: -p[2]):  # first fit decreasing (stable)
        home = next((b for b in bins if sum(p[2] for p in b) + part[2] <= cap), None)
        if home is None:
            bins.append(home := [])
        home.append(part)
    bins.sort(key=lambda b: -sum(p[2] for p in b))  # the lightest call last: it runs the bench
    spec, calls = plan["calls"], []
    for n, carried in enumerate(bins, 1):
        kind, command = limits.call_kind_and_command(DEVICE_SH, plan["carry_dir"], n, len(bins))
        folder = f"{plan['carry_dir']}/call{n}"
        calls.append(
            {
                "n": n,
                "parts": sorted(carried, key=lambda p: (p[0] != "wheel", p[1])),
                "carry": [folder],
                "command": command,
                "timeout_s": spec["timeout_s"][kind],
                "runs_bench": kind == "compute",
            }
        )
    return calls


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


def call_bytes(plan: dict[str, Any], call: dict[str, Any]) -> int:
    """What one call sends: the working tree at its budget (repo_mib_max), and its parts."""
    return int(plan["lease"]["repo_mib_max"] * MIB) + sum(p[2] for p in call["parts"])


def call_seconds(plan: dict[str, Any], call: dict[str, Any]) -> float:
    """Device seconds of one call: its start (first call) or the gap before it, overhead,
    transfer and command."""
    est = plan["estimate_s"]
    seconds = est["call_overhead"] + call_bytes(plan, call) / MIB / est["transfer_mib_per_s"]
    seconds += est["start"] if call["n"] == 1 else est["gap_between_calls"]
    if call["runs_bench"]:
        return seconds + compute_seconds(plan)
    return seconds + plan["calls"]["command_s"]["first" if call["n"] == 1 else "receive"]


def estimate(plan: dict[str, Any]) -> dict[str, Any]:
    """{"calls": [{n, parts, sent_mib, seconds}], "total_s", "total_worst_s",
    "compute_command_s", "bench_s", "measurements"}."""
    calls = [
        {
            "n": call["n"],
            "parts": [f"{p[0]}.part{p[1]:02d}" for p in call["parts"]],
            "sent_mib": round(call_bytes(plan, call) / MIB, 2),
            "seconds": round(call_seconds(plan, call), 1),
        }
        for call in layout(plan)
    ]
    total = sum(c["seconds"] for c in calls)
    est = plan["estimate_s"]
    return {
        "calls": calls,
        "total_s": round(total, 1),
        "total_worst_s": round(total - est["start"] + est["start_worst"], 1),
        "compute_command_s": round(compute_seconds(plan), 1),
        "bench_s": {k: round(v, 1) for k, v in bench_seconds(plan["bench"]).items()},
        "measurements": len(measurements(plan["bench"])),
    }


def deadline_after(plan: dict[str, Any], held_s: float) -> int:
    """BENCH_DEADLINE_S for the compute call once `held_s` s of device time are spent (the
    lease's held_s in the last receive's reply): the most that keeps the plan within
    plan_device_s, and never more than the plan's own deadline. Counted off: the compute
    call's gap, overhead and transfer, the steps before the benchmark, and after the deadline
    the measurement then under way and the report."""
    compute, bench = layout(plan)[-1], plan["bench"]
    before = call_seconds(plan, compute) - compute_seconds(plan)
    before += sum(plan["compute_steps_s"].values())
    after = bench["warmup_s"] + bench["min_time_s"] + bench["cost_s"]["report"]
    left = plan["limits"]["plan_device_s"] - held_s - before - after
    return max(0, min(bench["deadline_s"], int(left)))


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
    if argv[:1] == ["calls"]:
        print(json.dumps(layout(plan), indent=1))
    elif argv[:1] == ["estimate"]:
        print(json.dumps(estimate(plan), indent=1))
    elif argv[:1] == ["deadline"] and len(argv) == 2:
        deadline, cost = deadline_after(plan, float(argv[1])), plan["bench"]["cost_s"]
        if deadline < cost["gpu_peak"] + cost["parity"]:  # these two run before any deadline
            print("plan: too late for the benchmark's settings in 10 minutes", file=sys.stderr)
        print(deadline)
    elif argv[:1] == ["bench-args"]:
        print(" ".join(f"'{a}'" for a in bench_args(plan, "--dry-run" in argv)))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
