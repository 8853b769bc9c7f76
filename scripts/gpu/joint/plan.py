"""Issue 19's lease plan as data: its calls, the compute command's schedule, and the limits of
the lent machine they must fit (plan.json beside this file).

    python3 scripts/gpu/joint/plan.py estimate               device seconds per call, in all
    python3 scripts/gpu/joint/plan.py deadline --held-s S    the compute deadline to pass
                                                             (DEADLINE_S) after call 1 held S s
    python3 scripts/gpu/joint/plan.py calls                  the device calls, ready to make

Limits (/work/.library/device/README.md): 64 MiB sent per call, 10 minutes per command, 8 files
of 16 MiB back, 15 minutes of device time per session; this plan keeps to 13 minutes in all,
the machine's start included. tests/test_joint_gpu_plan.py checks plan.json against them and
runs the whole plan on the CPU (--dry-run).

The compute command is time-budgeted rather than counted: after the fixed steps (receive the
data, versions, the smoke check, a tiny CUDA training run) the three models share what is left
of `compute.deadline_s`, at the rates the smoke check measured on the recipe's own shapes, with
the same number of iterations for all three (`iterations`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

PLAN = Path(__file__).with_name("plan.json")
MIB = 1 << 20


def load_plan(path: Path = PLAN) -> dict[str, Any]:
    return json.loads(path.read_text())


def part_bytes(plan: dict[str, Any]) -> list[int]:
    """Bytes of each part of the compressed data (the payload cut into `data.parts` equal
    parts, the last one shorter)."""
    total, n = plan["data"]["payload_bytes"], plan["data"]["parts"]
    size = math.ceil(total / n)
    return [min(size, total - i * size) for i in range(n)]


def carried_bytes(plan: dict[str, Any], call: dict[str, Any]) -> int:
    """What a call carries besides the repository: its data part(s) and a small manifest."""
    parts = part_bytes(plan)
    return sum(parts[p - 1] for p in call.get("parts", [])) + 4096


def call_seconds(plan: dict[str, Any], call: dict[str, Any], start: float) -> float:
    """Device seconds of one call: the start (first call) or the gap before it, overhead,
    transfer, and its command (the compute call: its whole timeout, the worst case)."""
    est = plan["estimate_s"]
    size = carried_bytes(plan, call) + plan["repo_mib_max"] * MIB
    seconds = est["call_overhead"] + size / MIB / est["transfer_mib_per_s"]
    seconds += start if call["n"] == 1 else est["gap_between_calls"]
    return seconds + (call["timeout_s"] if call.get("compute") else call["command_s"])


def estimate(plan: dict[str, Any]) -> dict[str, Any]:
    """{"calls": [{n, carried_mib, seconds}], "total_s", "total_worst_s", "compute": ...}."""
    est = plan["estimate_s"]
    calls = [
        {
            "n": c["n"],
            "carried_mib": round((carried_bytes(plan, c) + plan["repo_mib_max"] * MIB) / MIB, 2),
            "seconds": round(call_seconds(plan, c, est["start"]), 1),
        }
        for c in plan["calls"]
    ]
    total = sum(c["seconds"] for c in calls) + est["give_back"]
    return {
        "calls": calls,
        "total_s": round(total, 1),
        "total_worst_s": round(total - est["start"] + est["start_worst"], 1),
        "compute": schedule(plan),
    }


def schedule(plan: dict[str, Any], deadline_s: float | None = None) -> dict[str, float]:
    """The compute command's plan: fixed steps, and the seconds left to the three models."""
    comp = plan["compute"]
    deadline = comp["deadline_s"] if deadline_s is None else deadline_s
    steps = comp["steps_s"]
    fixed = sum(v for k, v in steps.items() if k != "model_setup")
    fixed += steps["model_setup"] * len(plan["models"])
    return {"deadline_s": deadline, "fixed_s": fixed, "training_s": deadline - fixed}


def iterations(train_s: float, rates: dict[str, float], safety: float, least: int = 1) -> int:
    """The iterations all models can do one after the other in `train_s` seconds at `rates`
    (seconds per iteration by model), with a `safety` factor; at least `least`."""
    per_iteration = sum(rates.values())
    return max(least, int(safety * train_s / per_iteration)) if per_iteration > 0 else least


def deadline_after(plan: dict[str, Any], held_s: float) -> int:
    """The compute deadline that keeps the lease inside `limits.plan_device_s` once call 1 has
    held the machine `held_s` seconds: what is left, less the compute call's overhead,
    transfer, the command's margin beyond its deadline and the give-back."""
    est, limits = plan["estimate_s"], plan["limits"]
    call = next(c for c in plan["calls"] if c.get("compute"))
    size = carried_bytes(plan, call) + plan["repo_mib_max"] * MIB
    transfer = size / MIB / est["transfer_mib_per_s"]
    overhead = est["gap_between_calls"] + est["call_overhead"] + transfer
    margin = call["timeout_s"] - plan["compute"]["deadline_s"]
    left = limits["plan_device_s"] - held_s - overhead - margin - est["give_back"]
    return int(min(plan["compute"]["deadline_s"], left))


def main(argv: list[str]) -> int:
    plan = load_plan()
    if argv[:1] == ["estimate"]:
        print(json.dumps(estimate(plan), indent=1))
    elif argv[:1] == ["deadline"] and "--held-s" in argv:
        print(deadline_after(plan, float(argv[argv.index("--held-s") + 1])))
    elif argv[:1] == ["calls"]:
        for c in plan["calls"]:
            print(f"call {c['n']}: run(command={c['command']!r}, carry={c['carry']}, "
                  f"timeout_s={c['timeout_s']})")  # fmt: skip
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
