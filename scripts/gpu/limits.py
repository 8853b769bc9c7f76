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
