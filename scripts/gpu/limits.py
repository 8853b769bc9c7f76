"""The lease limits every device plan under scripts/gpu/ reads (lease.json), in one place.

A plan's plan.json names the lease file (`"lease": "../lease.json"`); `load_plan` reads both,
with the lease's limits as plan["lease"] (and the file's path, relative to plan.json, as
plan["lease"]["file"]). `part_limit` is the most data one call may carry beside the working
tree at its budget: call_mib - repo_mib_max - margin_mib.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIB = 1 << 20


def load_plan(path: Path) -> dict[str, Any]:
    """plan.json at `path`, with the shared limits of the lease file it names in plan["lease"]."""
    plan = json.loads(path.read_text())
    lease = json.loads((path.parent / plan["lease"]).read_text())
    plan["lease"] = {"file": plan["lease"], **{k: v for k, v in lease.items() if k != "doc"}}
    return plan


def part_limit(plan: dict[str, Any]) -> int:
    """Bytes one call may carry beside the working tree at its budget, less the margin."""
    lease = plan["lease"]
    return int((lease["call_mib"] - lease["repo_mib_max"] - lease["margin_mib"]) * MIB)


def call_kind_and_command(device_sh: str, carry_dir: str, n: int, calls: int) -> tuple[str, str]:
    """(kind, command) of call n (from 1) of `calls` that carry data parts: the first receives
    and records the machine's versions, the last runs the compute command, the others receive.
    Each call's files travel in `<carry_dir>/call<n>`."""
    folder = f"{carry_dir}/call{n}"
    kind = "compute" if n == calls else "first" if n == 1 else "receive"
    command = {
        "first": f"{device_sh} receive {folder} && {device_sh} versions",
        "receive": f"{device_sh} receive {folder}",
        "compute": f"{device_sh} compute {folder}",
    }[kind]
    return kind, command
