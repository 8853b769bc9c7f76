"""Copy what issue 20's device calls sent back into bench/results/<date>-h200-inference/.

    python3 scripts/gpu/inference/prepare.py collect COMPUTE_FILES

COMPUTE_FILES is the `files_at` folder of the compute call (versions.txt, latency.json/.md/.png,
smoke.json, steps.json, compute.log). Written there: those files, plan.json and lease.json as
they were run, and commands.md with each call exactly as made and the estimate next to the
measured steps. Review the folder, then `git add` it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

from plan import PLAN, estimate, layout

REPO = Path(__file__).resolve().parents[3]
KEEP = (
    "versions.txt",
    "latency.json",
    "latency.md",
    "latency.png",
    "smoke.json",
    "steps.json",
    "compute.log",
)


def collect(plan: dict[str, Any], compute: Path, name: str = "h200-inference") -> Path:
    dest = REPO / "bench" / "results" / f"{dt.date.today().isoformat()}-{name}"
    dest.mkdir(parents=True, exist_ok=True)
    for f in KEEP:
        if (compute / f).is_file():
            shutil.copy2(compute / f, dest / f)
    shutil.copy2(PLAN, dest / "plan.json")
    shutil.copy2(PLAN.parent / plan["lease"]["file"], dest / "lease.json")
    steps_file = compute / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else {}
    lines = ["# Device calls as run (issue 20)", ""]
    for call in layout(plan):
        parts = ", ".join(f"{p[0]}.part{p[1]:02d}" for p in call["parts"])
        lines += [
            f"{call['n']}. carry `{json.dumps(call['carry'])}` ({parts}), "
            f"timeout_s {call['timeout_s']}:",
            f"   `{call['command']}`",
        ]
    est = estimate(plan)
    lines += ["", f"Estimated device time: {est['total_s']:.0f} s (worst start: "
              f"{est['total_worst_s']:.0f} s); compute command {est['compute_command_s']:.0f} s.",
              "", "Measured steps of the compute call (s):", ""]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in steps.items()]
    (dest / "commands.md").write_text("\n".join(lines) + "\n")
    return dest
