"""The working tree every device call sends stays inside the budget the GPU plans assume."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LEASE = json.loads((REPO / "scripts" / "gpu" / "lease.json").read_text())


def tree_bytes() -> int:
    """Bytes of the files git tracks or sees untracked and not ignored (what a call sends)."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return sum(p.stat().st_size for p in (REPO / f.decode() for f in listed if f) if p.is_file())


def test_the_tree_fits_the_repo_budget_of_the_device_plans() -> None:
    budget = int(LEASE["repo_mib_max"] * (1 << 20))
    assert tree_bytes() <= budget, f"the tree is over {LEASE['repo_mib_max']} MiB"
    assert LEASE["repo_mib_max"] + LEASE["margin_mib"] < LEASE["call_mib"]
