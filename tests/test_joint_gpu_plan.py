"""Issue 19's lease plan: plan.json against the device machine's limits, and the whole plan end
to end on the CPU (--dry-run: synthetic shards staged into two calls, the device side with a
fake $OUT, then the development side's unpack, grid and learning curve on what came back).

What the dry run proves: the data parts rejoin and unpack to shards whose sha256 match, the
smoke check runs and its verdicts pick the engine, the three models train for the same number
of iterations from the shards, and what comes back is at most 8 small files that restore into
runs the grid evaluates. What it cannot: anything about CUDA (the CUDA-graph engine is skipped
on the CPU; its logic is tested with a stand-in graph in tests/test_joint_batched.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "scripts" / "gpu" / "joint"
MIB = 1 << 20


def _module(name: str):
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location(f"joint_{name}", HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(HERE))


plan_mod = _module("plan")
prepare = _module("prepare")
lease = _module("lease")
PLAN = plan_mod.load_plan()


def test_every_call_sends_at_most_64_mib_and_the_parts_cover_the_data() -> None:
    limits, data = PLAN["limits"], PLAN["data"]
    parts = plan_mod.part_bytes(PLAN)
    assert sum(parts) == data["payload_bytes"] and len(parts) == data["parts"]
    assert max(parts) <= limits["part_mib_max"] * MIB <= limits["call_mib"] * MIB
    named = sorted(p for c in PLAN["calls"] for p in c.get("parts", []))
    assert named == list(range(1, data["parts"] + 1))  # each part once, in some call
    for call in PLAN["calls"]:
        size = plan_mod.carried_bytes(PLAN, call) + PLAN["repo_mib_max"] * MIB
        assert size <= limits["call_mib"] * MIB, (call["n"], size / MIB)
    assert prepare.repo_bytes() <= PLAN["repo_mib_max"] * MIB  # what a call sends of the repo
    # the 4 shards of `mtl-edge data pack` (<= 60 MiB each) are what the payload holds
    assert data["shards"] == math.ceil(data["shard_bytes"] / (data["shard_max_mib"] * MIB)) == 4


def test_commands_fit_their_limits_and_the_lease_fits_13_minutes() -> None:
    limits, est = PLAN["limits"], plan_mod.estimate(PLAN)
    for call in PLAN["calls"]:
        assert call["timeout_s"] <= limits["command_s"] == 600
    compute = [c for c in PLAN["calls"] if c.get("compute")]
    assert len(compute) == 1 and compute[0] is PLAN["calls"][-1]  # ONE compute command, last
    assert compute[0]["timeout_s"] <= limits["compute_command_s"] <= 9 * 60
    assert PLAN["estimate_s"]["start_worst"] >= PLAN["estimate_s"]["start"] >= 120  # 2-3 min
    # the worst case counts the compute call's whole timeout and the slowest start
    assert est["total_worst_s"] <= limits["plan_device_s"] == 13 * 60
    assert limits["plan_device_s"] <= limits["session_device_s"] == 15 * 60
    comp, sched = PLAN["compute"], est["compute"]
    assert comp["deadline_s"] + 30 <= compute[0]["timeout_s"]  # packing ends before the kill
    assert sched["fixed_s"] < sched["deadline_s"] and sched["training_s"] >= 300
    assert comp["smoke_timeout_s"] < comp["deadline_s"] / 3 + 1  # lease.py caps it there too
    # files back: the model tars + lease.json, smoke.json, versions.txt, compute.log
    assert len(PLAN["models"]) + 4 <= limits["files_back"]


def test_the_compute_deadline_follows_what_call_1_really_took() -> None:
    """`plan.py deadline --held-s S`: the lease still ends inside 13 minutes when call 1 took
    longer than estimated (a slow start), and never plans past the planned deadline."""
    est, limits, comp = PLAN["estimate_s"], PLAN["limits"], PLAN["compute"]
    call1 = plan_mod.call_seconds(PLAN, PLAN["calls"][0], est["start_worst"])
    call2 = PLAN["calls"][-1]
    size = plan_mod.carried_bytes(PLAN, call2) + PLAN["repo_mib_max"] * MIB
    overhead = (
        est["gap_between_calls"] + est["call_overhead"] + size / MIB / est["transfer_mib_per_s"]
    )
    for held in (call1 - 60, call1, call1 + 60, call1 + 120):
        deadline = plan_mod.deadline_after(PLAN, held)
        assert deadline <= comp["deadline_s"]
        worst = held + overhead + deadline + (call2["timeout_s"] - comp["deadline_s"])
        assert worst + est["give_back"] <= limits["plan_device_s"] + 1
    assert plan_mod.deadline_after(PLAN, call1 + 60) < plan_mod.deadline_after(PLAN, call1)


def test_the_recipe_gives_the_three_models_and_the_smoke_settings_parse() -> None:
    from mtl_edge.bench.joint_speed import parse_setting
    from mtl_edge.train.config import load_recipe

    methods = {
        m["name"]: load_recipe(REPO / PLAN["recipe"], [f"joint.beta={m['beta']}"]).joint.method
        for m in PLAN["models"]
    }
    assert methods == {
        "reptile-transfer": "reptile+transfer",
        "reptile": "reptile",
        "transfer": "transfer",
    }
    r = load_recipe(REPO / PLAN["recipe"])
    assert r.model.input_preprocess.size == 84 and r.model.args["width"] == 32
    assert r.joint.meta_batch == 5 and r.joint.batched and r.joint.cuda_graphs
    for spec in PLAN["smoke"]["checks"] + PLAN["dry_run"]["smoke_checks"]:
        parse_setting(spec)
    s = parse_setting(lease.spec_of([], 0.5))
    assert (s.size, s.width, s.shots, s.inner_steps, s.beta) == (84, 32, 15, 10, 0.5)
    assert plan_mod.iterations(100.0, {"a": 0.01, "b": 0.04}, 0.9) == 1800


def _report(engines: dict[str, tuple[str, float, float]]) -> dict:
    """A bench joint report of the three recipe settings: engine -> (name, rel diff, s/it)."""
    settings = []
    for m in PLAN["models"]:
        settings.append({
            "setting": {"name": lease.spec_of([], m["beta"])},
            "engines": {
                e: {"engine": name, "rel_diff_vs_loop": diff, "median_s": sec * (1 + m["beta"])}
                for e, (name, diff, sec) in engines.items()
            },
        })  # fmt: skip
    return {"results": {"settings": settings}}


def test_smoke_verdicts_choose_the_fastest_engine_that_learns_what_the_loop_learns() -> None:
    good = {
        "loop": ("loop", 0.0, 0.1),
        "batched": ("batched", 1e-6, 0.03),
        "cuda-graphs": ("batched+cuda-graphs", 1e-6, 0.01),
    }
    ok = lease.verdicts(_report(good), 1e-3)
    assert ok == {"loop": True, "batched": True, "cuda-graphs": True}
    engine, rates = lease.choose_engine(_report(good), PLAN, [], ok)
    assert engine == "cuda-graphs" and rates["transfer"] == pytest.approx(0.01)
    fell_back = good | {"cuda-graphs": ("batched", 1e-6, 0.01)}  # its capture failed
    ok = lease.verdicts(_report(fell_back), 1e-3)
    assert ok["cuda-graphs"] is False
    assert lease.choose_engine(_report(fell_back), PLAN, [], ok)[0] == "batched"
    wrong = good | {"batched": ("batched", 0.2, 0.03)}
    assert lease.verdicts(_report(wrong), 1e-3)["batched"] is False


# --- the whole plan on the CPU ----------------------------------------------------------------


@pytest.fixture
def staged(tmp_path: Path) -> dict:
    """Synthetic shards (like `mtl-edge data pack` of miniImageNet, tiny), staged in 2 calls."""
    from mtl_edge.data.shards import pack_split
    from mtl_edge.data.synthetic import synthetic_split

    d = PLAN["dry_run"]["data"]
    split = synthetic_split("train", 0, d["size"], d["classes"], 1, 1, d["per_class"])
    pack_split(split, tmp_path / "shards" / "train", max_mib=d["shard_max_mib"])
    manifest = prepare.stage(PLAN, tmp_path / "shards" / "train", tmp_path / "carry")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "MTL_EDGE_JOINT_STORE": str(tmp_path / "store"),
    }
    env.pop("DEADLINE_S", None)
    return {"carry": tmp_path / "carry", "env": env, "manifest": manifest, "tmp": tmp_path}


def _device(staged: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(HERE / "device.sh"), *args],
        capture_output=True,
        text=True,
        env=staged["env"],
        timeout=timeout,
        cwd=REPO,
    )


def test_a_damaged_or_missing_part_stops_early(staged: dict) -> None:
    assert staged["manifest"]["shards"] >= 2 and len(staged["manifest"]["parts"]) == 2
    part = staged["carry"] / "call1" / "joint-data.part01"
    good = part.read_bytes()
    part.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    res = _device(staged, "receive", str(staged["carry"] / "call1"))
    assert res.returncode != 0 and "sha256 differs" in res.stderr
    part.write_bytes(good)
    res = _device(staged, "compute", str(staged["carry"] / "call2"), "--dry-run")
    assert res.returncode == 1 and "missing joint-data.part01" in res.stdout + res.stderr
    record = json.loads((Path(staged["env"]["OUT"]) / "lease.json").read_text())
    assert record["ok"] is False and "train reptile" not in record["steps_s"]


@pytest.mark.slow
def test_the_whole_plan_runs_end_to_end_on_the_cpu(staged: dict) -> None:
    res = _device(staged, "receive", str(staged["carry"] / "call1"))
    assert res.returncode == 0, res.stderr
    assert "parts 01 of 2 here, sha256 ok" in res.stdout
    res = _device(staged, "compute", str(staged["carry"] / "call2"), "--dry-run")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = Path(staged["env"]["OUT"])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    limits = PLAN["limits"]
    assert len(files) <= limits["files_back"]
    for f in files:  # what comes back: small files, at most 2 folders down, plain names
        assert f.stat().st_size <= limits["file_mib"] * MIB
        assert len(f.relative_to(out).parts) <= limits["folders_deep"] + 1
        assert all(c.isalnum() or c in "._-" for c in f.name)
    names = {m["name"] for m in PLAN["models"]}
    assert {f.name for f in files} == {f"{n}.tar" for n in names} | {
        "lease.json", "smoke.json", "versions.txt", "compute.log",
    }  # fmt: skip
    record = json.loads((out / "lease.json").read_text())
    assert record["ok"] is True and record["engine"] == "batched"
    assert record["smoke"] == {"loop": True, "batched": True}
    reached = {n: m["iteration"] for n, m in record["models"].items()}
    assert set(reached) == names and len(set(reached.values())) == 1  # the same count for all
    assert reached["reptile"] == record["iterations_planned"] > 0
    assert record["total_s"] < record["deadline_s"]
    assert json.loads((out / "smoke.json").read_text())["kind"] == "joint-speed"

    collect = [sys.executable, str(HERE / "collect.py")]
    runs, results = staged["tmp"] / "runs", staged["tmp"] / "results"
    where = ["--runs", str(runs), "--results", str(results)]
    tiny = ["--dataset", "synthetic", "-o", "size=16", "-o", "per_class=20", "--episodes", "2"]
    for args in (
        ["unpack", str(out)],
        ["grid", "--ways", "5,20", "--shots", "1,5", *tiny],
        ["curve", "--every", "4", *tiny],
    ):
        res = subprocess.run([*collect, *args, *where], capture_output=True, text=True,
                             timeout=600, cwd=staged["tmp"])  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    expected = {"grid.json", "grid.md", "grid.png", "curve.json", "curve.png", "commands.md"}
    expected |= {"lease.json", "plan.json", "joint-gpu.toml"}
    assert expected <= {p.name for p in results.iterdir()}
    grid = json.loads((results / "grid.json").read_text())
    assert [m["name"] for m in grid["models"]] == ["transfer", "reptile", "reptile-transfer"]
    assert {(d["ways"], d["shots"]) for d in grid["differences"]} == {
        (5, 1), (5, 5), (20, 1), (20, 5),
    }  # fmt: skip
    assert "| 5-way 1-shot | 51.0 |" in (results / "grid.md").read_text()
    curve = json.loads((results / "curve.json").read_text())
    its = [p["iteration"] for p in curve["points"]]
    assert its == sorted(its) and its[-1] == reached["reptile"] and len(its) >= 2
