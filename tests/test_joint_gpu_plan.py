"""Issue 19's lease plan: plan.json and the calls derived from it against the limits of
scripts/gpu/lease.json (the working tree at its budget), and the whole plan end to end on the
CPU (--dry-run: synthetic shards staged into as many calls as the real data takes, the device
side with a fake $OUT per call, then the development side's unpack, grid and learning curve on
what came back).

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
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "scripts" / "gpu" / "joint"
MIB = 1 << 20


def _module(name: str):
    """scripts/gpu/joint/<name>.py, whose `from plan import ...` must find this folder's
    plan.py, not another plan's already imported under the same name (the inference test's)."""
    saved = sys.modules.pop("plan", None)
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location(f"joint_{name}", HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(HERE))
        sys.modules.pop("plan", None)
        if saved is not None:
            sys.modules["plan"] = saved


plan_mod = _module("plan")
prepare = _module("prepare")
lease = _module("lease")
PLAN = plan_mod.load_plan()


def test_every_call_fits_the_lease_with_the_tree_at_its_budget() -> None:
    """Every call counted with the working tree at lease.json's repo_mib_max (the built-in
    bundle included), not at today's size; the parts cover the payload once."""
    lease, data, calls = PLAN["lease"], PLAN["data"], plan_mod.layout(PLAN)
    cap = plan_mod.part_limit(PLAN)
    assert cap == (lease["call_mib"] - lease["repo_mib_max"] - lease["margin_mib"]) * MIB
    assert cap == 39 * MIB  # lease.json: 64 - 24.5 (tree budget) - 0.5 (margin)
    for call in calls:
        assert all(size <= cap for _, size in call["parts"]), call
        data_and_tree = lease["repo_mib_max"] * MIB + sum(size for _, size in call["parts"])
        assert data_and_tree + lease["margin_mib"] * MIB <= lease["call_mib"] * MIB, call["n"]
        sent = plan_mod.call_bytes(PLAN, call)  # + the manifest, inside the margin
        assert data_and_tree < sent <= lease["call_mib"] * MIB, (call["n"], sent)
        assert call["carry"] == [f"{PLAN['carry_dir']}/call{call['n']}"]
    got = sorted(p for c in calls for p in c["parts"])
    assert [i for i, _ in got] == list(range(1, len(got) + 1))  # each part once, in order
    assert sum(size for _, size in got) == data["payload_bytes"]
    assert len(calls) == math.ceil(data["payload_bytes"] / cap) == 4  # 118.7 MiB / 39 MiB
    assert [c["compute"] for c in calls] == [False] * (len(calls) - 1) + [True]
    loads = [sum(size for _, size in c["parts"]) for c in calls]
    assert loads[-1] == min(loads)  # the compute call carries least: a rerun sends little
    assert "versions" in calls[0]["command"] and "compute" in calls[-1]["command"]
    assert prepare.repo_bytes() <= lease["repo_mib_max"] * MIB  # the tree keeps to its budget
    # the 4 shards of `mtl-edge data pack` (<= 60 MiB each) are what the payload holds
    assert data["shards"] == math.ceil(data["shard_bytes"] / (data["shard_max_mib"] * MIB)) == 4


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400 * MIB), st.integers(MIB // 4, 39 * MIB))  # at most 1,600 parts
def test_any_payload_gives_calls_that_carry_it_once(total: int, part: int) -> None:
    calls = plan_mod.layout(PLAN, total, part)
    sizes = [size for c in calls for _, size in c["parts"]]
    assert sum(sizes) == total and max(sizes) <= part and len(calls) == math.ceil(total / part)
    assert [i for c in calls for i, _ in c["parts"]] == list(range(1, len(calls) + 1))
    assert sizes[-1] == min(sizes) and calls[-1]["compute"]
    assert sum(c["compute"] for c in calls) == 1


def test_commands_fit_their_limits_and_the_lease_fits_13_minutes() -> None:
    lease, limits, est = PLAN["lease"], PLAN["limits"], plan_mod.estimate(PLAN)
    calls = plan_mod.layout(PLAN)
    for call in calls:
        assert 0 < call["timeout_s"] <= lease["command_s"] == 600
    compute = calls[-1]
    assert compute["timeout_s"] == plan_mod.compute_timeout(PLAN)
    assert compute["timeout_s"] <= limits["compute_command_s"] <= 9 * 60
    e = PLAN["estimate_s"]
    assert e["start_worst"] >= e["start"] >= 120  # 2-3 min
    # the estimate counts every call (the start, gaps, overheads, transfers at the tree's
    # budget), the compute call's whole timeout and the give-back ...
    assert [c["n"] for c in est["calls"]] == [c["n"] for c in calls]
    assert all(c["sent_mib"] >= lease["repo_mib_max"] for c in est["calls"])
    worst = sum(plan_mod.call_seconds(PLAN, c, e["start_worst"]) for c in calls) + e["give_back"]
    assert est["total_worst_s"] == pytest.approx(worst, abs=0.2)
    assert est["total_worst_s"] - est["total_s"] == pytest.approx(e["start_worst"] - e["start"])
    assert est["start"]["assumed_s"] == e["start"] and "start" in est["start"]["note"]
    # ... and fits 13 minutes even at the slowest start
    assert est["total_worst_s"] <= limits["plan_device_s"] == 13 * 60
    assert limits["plan_device_s"] <= lease["session_device_s"] == 15 * 60
    assert e["gap_between_calls"] < lease["warm_s"]  # the store survives between the calls
    comp, sched = PLAN["compute"], est["compute"]
    assert sched["deadline_s"] == plan_mod.deadline_s(PLAN)
    assert sched["deadline_s"] + comp["deadline_margin_s"] == compute["timeout_s"]
    assert comp["deadline_margin_s"] >= 30  # packing ends before the kill
    assert sched["fixed_s"] < sched["deadline_s"] and sched["training_s"] >= 300
    assert comp["smoke_timeout_s"] < sched["deadline_s"] / 3 + 1  # lease.py caps it there too
    # files back: the model tars + lease.json, smoke.json, versions.txt, compute.log
    assert len(PLAN["models"]) + 4 <= lease["files_back"]


def test_the_compute_deadline_follows_what_the_receive_calls_really_took() -> None:
    """`plan.py deadline --held-s S`: the lease still ends inside 13 minutes when the receive
    calls took longer than estimated (a slow start), and never plans past the planned deadline."""
    e, limits, comp = PLAN["estimate_s"], PLAN["limits"], PLAN["compute"]
    calls = plan_mod.layout(PLAN)
    receives = sum(plan_mod.call_seconds(PLAN, c, e["start_worst"]) for c in calls[:-1])
    compute = calls[-1]
    before = plan_mod.call_seconds(PLAN, compute, e["start"]) - compute["timeout_s"]
    assert plan_mod.deadline_after(PLAN, receives) == plan_mod.deadline_s(PLAN)  # on plan
    for held in (receives - 60, receives, receives + 60, receives + 120):
        deadline = plan_mod.deadline_after(PLAN, held)
        assert deadline <= plan_mod.deadline_s(PLAN)
        worst = held + before + deadline + comp["deadline_margin_s"] + e["give_back"]
        assert worst <= limits["plan_device_s"] + 1
    assert plan_mod.deadline_after(PLAN, receives + 60) < plan_mod.deadline_after(PLAN, receives)


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
    """Synthetic shards (like `mtl-edge data pack` of miniImageNet, tiny), staged in as many
    calls as the real payload takes (parts cut smaller: full ones, then a remainder)."""
    from mtl_edge.data.shards import pack_split
    from mtl_edge.data.synthetic import synthetic_split

    d = PLAN["dry_run"]["data"]
    split = synthetic_split("train", 0, d["size"], d["classes"], 1, 1, d["per_class"])
    shards = tmp_path / "shards" / "train"
    pack_split(split, shards, max_mib=d["shard_max_mib"])
    n = len(plan_mod.layout(PLAN))
    size = len(prepare.payload(shards, PLAN["data"]["xz_preset"]))
    manifest = prepare.stage(PLAN, shards, tmp_path / "carry", math.ceil(size / (n - 0.5)))
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MTL_EDGE_JOINT_STORE": str(tmp_path / "store"),
    }
    env.pop("DEADLINE_S", None)
    return {"carry": tmp_path / "carry", "env": env, "manifest": manifest, "tmp": tmp_path, "n": n}


def _device(staged: dict, *args: str, call: int) -> subprocess.CompletedProcess[str]:
    """device.sh with call `call`'s own, empty $OUT (tmp/out/call<n>), as on the device."""
    out = staged["tmp"] / "out" / f"call{call}"
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["bash", str(HERE / "device.sh"), *args],
        capture_output=True,
        text=True,
        env={**staged["env"], "OUT": str(out)},
        timeout=1800,  # the dry run's deadline (1200 s) and its packing
        cwd=REPO,
    )


def _receive(staged: dict, n: int) -> subprocess.CompletedProcess[str]:
    return _device(staged, "receive", str(staged["carry"] / f"call{n}"), call=n)


def test_a_damaged_or_missing_part_stops_early(staged: dict) -> None:
    n = staged["n"]
    assert staged["manifest"]["shards"] >= 2 and len(staged["manifest"]["parts"]) == n == 4
    assert sorted(p.name for p in staged["carry"].iterdir()) == [f"call{i}" for i in range(1, 5)]
    part = staged["carry"] / "call1" / "joint-data.part01"
    good = part.read_bytes()
    part.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    res = _receive(staged, 1)
    assert res.returncode != 0 and "sha256 differs" in res.stderr
    part.write_bytes(good)
    res = _receive(staged, 2)  # part 1 never arrived: said at once, not in the compute call
    assert res.returncode == 1 and "missing joint-data.part01" in res.stderr
    res = _device(staged, "compute", str(staged["carry"] / f"call{n}"), "--dry-run", call=n)
    assert res.returncode == 1 and "missing joint-data.part01" in res.stdout + res.stderr
    out = staged["tmp"] / "out" / f"call{n}"
    record = json.loads((out / "lease.json").read_text())
    assert record["ok"] is False and "train reptile" not in record["steps_s"]


@pytest.mark.slow
def test_the_whole_plan_runs_end_to_end_on_the_cpu(staged: dict) -> None:
    n, lease = staged["n"], PLAN["lease"]
    calls = plan_mod.layout(PLAN)
    for i in range(1, n):
        res = _receive(staged, i)
        assert res.returncode == 0, res.stderr
        assert f"parts 01-{i:02d} of {n} here" in res.stdout
        if "versions" in calls[i - 1]["command"]:
            res = _device(staged, "versions", call=i)
            assert res.returncode == 0, res.stderr
    assert (staged["tmp"] / "out" / "call1" / "versions.txt").is_file()
    res = _device(staged, "compute", str(staged["carry"] / f"call{n}"), "--dry-run", call=n)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"parts 01-{n:02d} of {n} here" in res.stdout
    for i in range(1, n + 1):  # what every call sends back: <= 8 plain files of <= 16 MiB
        out = staged["tmp"] / "out" / f"call{i}"
        files = sorted(p for p in out.rglob("*") if p.is_file())
        assert len(files) <= lease["files_back"]
        for f in files:
            assert f.stat().st_size <= lease["file_mib"] * MIB
            assert len(f.relative_to(out).parts) <= PLAN["limits"]["folders_deep"] + 1
            assert all(c.isalnum() or c in "._-" for c in f.name)
    out = staged["tmp"] / "out" / f"call{n}"  # the compute call's
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {m["name"] for m in PLAN["models"]}
    assert {f.name for f in files} == {f"{name}.tar" for name in names} | {
        "lease.json", "smoke.json", "versions.txt", "compute.log",
    }  # fmt: skip
    record = json.loads((out / "lease.json").read_text())
    assert record["ok"] is True and record["engine"] == "batched"
    assert record["smoke"] == {"loop": True, "batched": True}
    reached = {k: m["iteration"] for k, m in record["models"].items()}
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
    assert json.loads((results / "plan.json").read_text())["lease"] == PLAN["lease"]
    commands = (results / "commands.md").read_text()
    assert all(f"{c['n']}. carry" in commands for c in calls) and "DEADLINE" not in commands
    grid = json.loads((results / "grid.json").read_text())
    assert [m["name"] for m in grid["models"]] == ["transfer", "reptile", "reptile-transfer"]
    assert {(d["ways"], d["shots"]) for d in grid["differences"]} == {
        (5, 1), (5, 5), (20, 1), (20, 5),
    }  # fmt: skip
    assert "| 5-way 1-shot | 51.0 |" in (results / "grid.md").read_text()
    curve = json.loads((results / "curve.json").read_text())
    its = [p["iteration"] for p in curve["points"]]
    assert its == sorted(its) and its[-1] == reached["reptile"] and len(its) >= 2
