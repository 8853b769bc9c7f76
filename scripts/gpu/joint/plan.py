"""Issue 19's lease plan as data: its calls, the compute command's schedule, and the limits of
the lent machine they must fit.

    python3 scripts/gpu/joint/plan.py estimate               device seconds per call, in all
    python3 scripts/gpu/joint/plan.py deadline --held-s S    the compute deadline to pass
                                                             (DEADLINE_S) once the receive
                                                             calls held the machine S s
    python3 scripts/gpu/joint/plan.py calls [--held-s S]     the device calls, ready to make

The machine's limits come from scripts/gpu/lease.json (shared by every device plan: 64 MiB per
call, of which the working tree may take repo_mib_max, 10 minutes per command, 8 files of
16 MiB back, 15 minutes of device time per session); the rest from plan.json beside this file,
with this plan's own 13 minutes in all, the machine's start included.
tests/test_joint_gpu_plan.py checks the one against the other and runs the whole plan on the
CPU (--dry-run).

The calls are derived from the sizes: the compressed shards are cut into parts of at most
call_mib - repo_mib_max - margin_mib, one part per call (a full part leaves no room for a
second one); the calls before the last only receive, and the last, which carries the smallest
part (the remainder), runs the compute command. That command's timeout is what the 13 minutes
leave after the receive calls at the slowest start (at most compute_command_s), and its
deadline that timeout less deadline_margin_s.

The compute command is time-budgeted rather than counted: after the fixed steps (receive the
data, versions, the smoke check, a tiny CUDA training run) the three models share what is left
of the deadline, at the rates the smoke check measured on the recipe's own shapes, with the
same number of iterations for all three (`iterations`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/gpu: limits.py
import limits  # noqa: E402

PLAN = Path(__file__).with_name("plan.json")
MIB = limits.MIB
DEVICE_SH = "bash scripts/gpu/joint/device.sh"
MANIFEST_BYTES = 4096  # MANIFEST.json, beside every call's part


def load_plan(path: Path = PLAN) -> dict[str, Any]:
    """plan.json with the lease limits in plan["lease"] (`limits.load_plan`)."""
    return limits.load_plan(path)


part_limit = limits.part_limit


def part_sizes(total: int, part_bytes: int) -> list[int]:
    """Sizes of the parts of a `total`-byte payload cut every `part_bytes` bytes."""
    full, rest = divmod(total, part_bytes)
    return [part_bytes] * full + ([rest] if rest else [])


def _calls(plan: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """The calls of parts of `sizes`, the compute call's timeout left at 0 (`layout` sets it)."""
    calls = []
    for n, size in enumerate(sizes, 1):
        kind, command = limits.call_kind_and_command(DEVICE_SH, plan["carry_dir"], n, len(sizes))
        folder = f"{plan['carry_dir']}/call{n}"
        calls.append(
            {
                "n": n,
                "parts": [[n, size]],
                "carry": [folder],
                "command": command,
                "timeout_s": plan["calls"]["timeout_s"].get(kind, 0),
                "compute": kind == "compute",
            }
        )
    return calls


def layout(
    plan: dict[str, Any], payload_bytes: int | None = None, part_bytes: int | None = None
) -> list[dict[str, Any]]:
    """The calls: [{n, parts: [[index, bytes]], carry, command, timeout_s, compute}], part n
    in call n, the last call the compute call; the payload defaults to plan.json's, the part
    size to `part_limit` (the dry run passes smaller ones)."""
    total = payload_bytes or plan["data"]["payload_bytes"]
    calls = _calls(plan, part_sizes(total, part_bytes or part_limit(plan)))
    calls[-1]["timeout_s"] = compute_timeout(plan)
    return calls


def call_bytes(plan: dict[str, Any], call: dict[str, Any]) -> int:
    """What one call sends: the working tree at its budget (repo_mib_max), its part(s) and the
    manifest."""
    return (
        int(plan["lease"]["repo_mib_max"] * MIB) + sum(p[1] for p in call["parts"]) + MANIFEST_BYTES
    )


def _before_command(plan: dict[str, Any], call: dict[str, Any], start: float) -> float:
    """Device seconds of a call before its command runs: the start (call 1) or the gap before
    it, the call's overhead and its transfer."""
    est = plan["estimate_s"]
    seconds = est["call_overhead"] + call_bytes(plan, call) / MIB / est["transfer_mib_per_s"]
    return seconds + (start if call["n"] == 1 else est["gap_between_calls"])


def call_seconds(plan: dict[str, Any], call: dict[str, Any], start: float) -> float:
    """Device seconds of one call (the compute call: its whole timeout, the worst case)."""
    if call["compute"]:
        return _before_command(plan, call, start) + call["timeout_s"]
    kind = "first" if call["n"] == 1 else "receive"
    return _before_command(plan, call, start) + plan["calls"]["command_s"][kind]


def compute_timeout(plan: dict[str, Any]) -> int:
    """The compute command's timeout: what `limits.plan_device_s` leaves after the receive
    calls at the slowest start, the compute call's own gap, overhead and transfer, and the
    give-back; at most `limits.compute_command_s` (9 minutes)."""
    est, limits = plan["estimate_s"], plan["limits"]
    calls = _calls(plan, part_sizes(plan["data"]["payload_bytes"], part_limit(plan)))
    spent = sum(call_seconds(plan, c, est["start_worst"]) for c in calls[:-1])
    spent += _before_command(plan, calls[-1], est["start_worst"]) + est["give_back"]
    return int(min(limits["compute_command_s"], limits["plan_device_s"] - spent))


def deadline_s(plan: dict[str, Any]) -> int:
    """The compute command's planned deadline (from its start): its timeout less the margin
    that packing and a run stopped at its time limit may need."""
    return compute_timeout(plan) - plan["compute"]["deadline_margin_s"]


def schedule(plan: dict[str, Any], deadline: float | None = None) -> dict[str, float]:
    """The compute command's plan: fixed steps, and the seconds left to the three models."""
    steps = plan["compute"]["steps_s"]
    deadline = deadline_s(plan) if deadline is None else deadline
    fixed = sum(v for k, v in steps.items() if k != "model_setup")
    fixed += steps["model_setup"] * len(plan["models"])
    return {"deadline_s": deadline, "fixed_s": fixed, "training_s": deadline - fixed}


def iterations(train_s: float, rates: dict[str, float], safety: float, least: int = 1) -> int:
    """The iterations all models can do one after the other in `train_s` seconds at `rates`
    (seconds per iteration by model), with a `safety` factor; at least `least`."""
    per_iteration = sum(rates.values())
    return max(least, int(safety * train_s / per_iteration)) if per_iteration > 0 else least


def estimate(plan: dict[str, Any]) -> dict[str, Any]:
    """{"start", "calls": [{n, parts, sent_mib, seconds}], "total_s", "total_worst_s",
    "compute"}: the seconds at the assumed start, and at the slowest one."""
    est = plan["estimate_s"]
    calls = [
        {
            "n": c["n"],
            "parts": [f"joint-data.part{p[0]:02d}" for p in c["parts"]],
            "sent_mib": round(call_bytes(plan, c) / MIB, 2),
            "seconds": round(call_seconds(plan, c, est["start"]), 1),
        }
        for c in layout(plan)
    ]
    total = sum(c["seconds"] for c in calls) + est["give_back"]
    return {
        "start": {"assumed_s": est["start"], "worst_s": est["start_worst"], "note": est["note"]},
        "calls": calls,
        "total_s": round(total, 1),
        "total_worst_s": round(total - est["start"] + est["start_worst"], 1),
        "compute": schedule(plan),
    }


def deadline_after(plan: dict[str, Any], held_s: float) -> int:
    """The compute deadline that keeps the lease inside `limits.plan_device_s` once the
    receive calls have held the machine `held_s` seconds (the lease's held_s in the last
    receive's reply): what is left, less the compute call's gap, overhead and transfer, the
    command's margin beyond its deadline and the give-back; never more than planned."""
    est = plan["estimate_s"]
    before = _before_command(plan, layout(plan)[-1], est["start"])
    left = plan["limits"]["plan_device_s"] - held_s - before - est["give_back"]
    left -= plan["compute"]["deadline_margin_s"]
    return int(min(deadline_s(plan), left))


def main(argv: list[str]) -> int:
    plan = load_plan()
    held = float(argv[argv.index("--held-s") + 1]) if "--held-s" in argv else None
    if argv[:1] == ["estimate"]:
        print(json.dumps(estimate(plan), indent=1))
    elif argv[:1] == ["deadline"] and held is not None:
        print(deadline_after(plan, held))
    elif argv[:1] == ["calls"]:
        for c in layout(plan):
            cmd = c["command"]
            if c["compute"] and held is not None:
                cmd = f"DEADLINE_S={deadline_after(plan, held)} {cmd}"
            print(f"call {c['n']}: run(command={cmd!r}, carry={c['carry']}, "
                  f"timeout_s={c['timeout_s']})")  # fmt: skip
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
