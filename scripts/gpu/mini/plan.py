"""Issue 18's GPU plan as data: miniImageNet pre-training + meta-transfer in one 15-minute H200
lease (docs/gpu-pipeline.md). Only training runs there; the rest runs here (finish.py).

    python3 scripts/gpu/mini/plan.py calls       each call's `run` arguments (JSON)
    python3 scripts/gpu/mini/plan.py estimate    the device-time budget, per call
    python3 scripts/gpu/mini/plan.py work        the recipe's work: steps, tasks, FLOPs, and the
                                                 time it would take at plan.json's rates

The machine's limits come from scripts/gpu/lease.json (64 MiB per call of which the working
tree may take repo_mib_max, 10 minutes per command, 8 files of 16 MiB back); this plan's own
limits (13 minutes of device time in all, a 9-minute compute command) and its assumptions
from plan.json. tests/test_gpu_mini_plan.py checks the one against the other.

Calls: the train split in compact shards (shards.py) of at most call_mib - repo_mib_max -
margin_mib each, one shard per call, the smallest last; the last call also runs the compute
command (device.sh compute): smoke, pre-training, meta-transfer, results packed into $OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/gpu: limits.py
import limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from shards import ROW, shard_sizes  # noqa: E402

PLAN = Path(__file__).with_name("plan.json")
MIB = limits.MIB
DEVICE_SH = "bash scripts/gpu/mini/device.sh"


def load_plan(path: Path = PLAN) -> dict[str, Any]:
    """plan.json with the lease limits in plan["lease"] (`limits.load_plan`)."""
    return limits.load_plan(path)


part_bytes = limits.part_limit


def shard_bytes(plan: dict[str, Any]) -> list[int]:
    """Bytes of each shard (.bin + .npy) for plan.json's split, files of its mean size."""
    data = plan["data"]
    mean = data["bytes"] // data["files"]
    counts = shard_sizes([mean] * data["files"], part_bytes(plan))
    return [n * (mean + ROW.itemsize) for n in counts]


def layout(plan: dict[str, Any], sizes: list[int] | None = None) -> list[dict[str, Any]]:
    """The calls: [{n, shard, bytes, carry, command, timeout_s, compute}], one shard each."""
    sizes = sizes or shard_bytes(plan)
    calls = []
    for n, size in enumerate(sizes, 1):
        folder = f"{plan['carry_dir']}/call{n}"
        last = n == len(sizes)
        calls.append(
            {
                "n": n,
                "shard": n - 1,
                "bytes": size,
                "carry": [folder],
                "command": f"{DEVICE_SH} {'compute' if last else 'receive'} {folder}",
                "timeout_s": plan["compute"]["timeout_s"] if last else 60,
                "compute": last,
            }
        )
    return calls


def compute_seconds(plan: dict[str, Any], worst: bool = False) -> float:
    """The compute command: its steps; `worst`: smoke and training run to their limits."""
    c = plan["compute"]
    steps = dict(c["steps_s"])
    if worst:
        steps["smoke"] = c["smoke_timeout_s"]
        steps["train"] = parse_budget(c["train_budget"]) + c["train_grace_s"]
    return float(sum(steps.values()))


def parse_budget(text: str) -> float:
    """Seconds of "6m", "5m30s" or "300" (the forms plan.json uses)."""
    total, num = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            num += ch
        else:
            total += float(num) * {"h": 3600, "m": 60, "s": 1}[ch]
            num = ""
    return total + (float(num) if num else 0.0)


def call_bytes(plan: dict[str, Any], call: dict[str, Any]) -> int:
    """What one call sends: the working tree at its budget and the shard."""
    return int(plan["lease"]["repo_mib_max"] * MIB) + call["bytes"]


def returned_bytes(plan: dict[str, Any]) -> int:
    """What comes back at most: the result parts and the other files (small)."""
    r = plan["results"]
    return int(r["max_parts"] * r["part_mib"] * MIB + len(r["other_files"]) * MIB)


def call_seconds(plan: dict[str, Any], call: dict[str, Any], worst: bool = False) -> float:
    """Device seconds of one call: start (first) or the gap before it, overhead, transfer,
    command (and for the compute call, its files coming back)."""
    est = plan["estimate_s"]
    s = est["call_overhead"] + call_bytes(plan, call) / MIB / est["transfer_mib_per_s"]
    s += (
        (est["start_worst"] if worst else est["start"])
        if call["n"] == 1
        else est["gap_between_calls"]
    )
    if call["compute"]:
        return (
            s
            + compute_seconds(plan, worst)
            + returned_bytes(plan) / MIB / est["transfer_mib_per_s"]
        )
    return s + est["receive_command"]


def estimate(plan: dict[str, Any]) -> dict[str, Any]:
    """{"calls": [{n, sent_mib, seconds}], "total_s", "total_worst_s", "compute_command_s",
    "compute_command_worst_s"}."""
    calls = layout(plan)
    rows = [
        {
            "n": c["n"],
            "sent_mib": round(call_bytes(plan, c) / MIB, 2),
            "seconds": round(call_seconds(plan, c), 1),
            "command": c["command"],
        }
        for c in calls
    ]
    return {
        "calls": rows,
        "total_s": round(sum(call_seconds(plan, c) for c in calls), 1),
        "total_worst_s": round(sum(call_seconds(plan, c, worst=True) for c in calls), 1),
        "compute_command_s": compute_seconds(plan),
        "compute_command_worst_s": compute_seconds(plan, worst=True),
        "returned_mib_max": round(returned_bytes(plan) / MIB, 1),
    }


def work(plan: dict[str, Any], recipe: str | None = None) -> dict[str, Any]:
    """The recipe's full schedule: steps, images, tasks and FLOPs per stage (counted by
    `mtl_edge.train.flops.stage_flops`), and the seconds at plan.json's assumed rates, beside
    the training budget that cuts it (runtime.time_budget, `mtl_edge.train.budget`)."""
    from mtl_edge.train.config import load_recipe
    from mtl_edge.train.flops import stage_flops

    cfg = load_recipe(recipe or plan["recipe"])
    p, m, ht = cfg.pretrain, cfg.meta, cfg.hard_tasks
    data = plan["data"]
    steps_per_epoch = data["files"] // p.batch_size
    size = int(cfg.model.preprocess.get("size", 84))
    shape = (3, size, size)
    pre_images = p.epochs * steps_per_epoch * p.batch_size
    pre = stage_flops(
        "pretrain", cfg.model.backbone, dict(cfg.model.args), cfg, shape,
        {"train_images": pre_images, "classes": data["classes"]},
    )  # fmt: skip
    tasks_per_batch = m.meta_batch + (ht.count if m.hard_tasks and ht.count else 0)
    tasks = m.iterations * tasks_per_batch
    n_s, n_q = m.ways * m.shots, m.ways * m.queries
    meta = stage_flops(
        "meta", cfg.model.backbone, dict(cfg.model.args), cfg, shape,
        {"tasks": tasks, "support_images": tasks * n_s, "query_images": tasks * n_q},
    )  # fmt: skip
    t = plan["throughput"]
    pre_s = pre["total"] / (t["bf16_flops_per_s"] * t["pretrain_fraction"])
    meta_s = m.iterations * t["meta_batch_s"]
    budget = parse_budget(plan["compute"]["train_budget"])
    share = cfg.runtime.pretrain_share
    return {
        "pretrain": {
            "epochs": p.epochs,
            "steps": p.epochs * steps_per_epoch,
            "images": pre_images,
            "flops": pre["total"],
            "forward_flops_per_image": pre["forward_per_image"],
            "full_schedule_s": round(pre_s, 1),
            "budget_s": round(budget * share, 1),
        },
        "meta": {
            "meta_batches": m.iterations,
            "tasks": tasks,
            "flops": meta["total"],
            "full_schedule_s": round(meta_s, 1),
            "budget_s": round(budget * (1 - share), 1),
        },
        "kept_fraction": {
            "pretrain": round(min(1.0, budget * share / pre_s), 3),
            "meta": round(min(1.0, budget * (1 - share) / meta_s), 3),
        },
        "assumptions": t["note"],
    }


def main(argv: list[str]) -> int:
    plan = load_plan()
    if argv[:1] == ["calls"]:
        print(json.dumps(layout(plan), indent=1))
    elif argv[:1] == ["estimate"]:
        print(json.dumps(estimate(plan), indent=1))
    elif argv[:1] == ["work"]:
        print(json.dumps(work(plan, argv[1] if len(argv) > 1 else None), indent=1))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
