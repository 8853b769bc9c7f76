"""Issue 20's GPU plan: plan.json and the calls derived from it against the limits of
scripts/gpu/lease.json (the tree at its budget), and the device-side script end to end on the
CPU (--dry-run) with a fake wheel, a tiny bundle and a fake $OUT.

What the dry run proves: the parts of both payloads are joined and checked, the wheel
installs into its own folder, the bundle unpacks, the FP16 variant is made, the smoke check
and the benchmark run with the plan's own settings and write at most 8 small
files. What it cannot: anything about CUDA."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from gpu_fixtures import fake_wheel, make_registry_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "scripts" / "gpu" / "inference"
MIB = 1 << 20


def _module(name: str):
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(HERE))


plan_mod = _module("plan")
parts_mod = _module("parts")
prepare = _module("prepare")
collect_mod = _module("collect")
PLAN = plan_mod.load_plan()


def test_every_call_fits_the_lease_with_the_tree_at_its_budget() -> None:
    lease, calls = PLAN["lease"], plan_mod.layout(PLAN)
    cap = plan_mod.part_bytes(PLAN)
    assert cap == (lease["call_mib"] - lease["repo_mib_max"] - lease["margin_mib"]) * MIB
    assert cap <= 60 * MIB  # the "parts of at most 60 MiB"
    for call in calls:  # the tree counted at repo_mib_max, not at today's size
        assert all(p[2] <= cap for p in call["parts"]) and sum(p[2] for p in call["parts"]) <= cap
        sent = plan_mod.call_bytes(PLAN, call)
        assert sent == lease["repo_mib_max"] * MIB + sum(p[2] for p in call["parts"])
        assert sent + lease["margin_mib"] * MIB <= lease["call_mib"] * MIB, (call["n"], sent)
        assert call["carry"] == [f"{PLAN['carry_dir']}/call{call['n']}"]
    for name, size in plan_mod.payload_sizes(PLAN).items():  # each payload exactly once
        got = sorted((p[1], p[2]) for c in calls for p in c["parts"] if p[0] == name)
        assert [i for i, _ in got] == list(range(1, len(got) + 1)) and sum(
            n for _, n in got
        ) == size
    total = sum(plan_mod.payload_sizes(PLAN).values())
    assert len(calls) == math.ceil(total / cap)  # as few calls as the bytes need
    assert [c["runs_bench"] for c in calls] == [False] * (len(calls) - 1) + [True]
    assert "versions" in calls[0]["command"] and "compute" in calls[-1]["command"]
    wheel = PLAN["wheel"]
    assert wheel["file"].startswith("onnxruntime_gpu-1.31.1-cp312-cp312-")
    tag = wheel["file"].removesuffix(".whl").split("-")[-1]
    args = wheel["pip_download"]
    assert args[args.index("--platform") + 1] == tag and "--no-deps" in args
    assert args[args.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in args


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300 * MIB), min_size=1, max_size=4))
def test_any_payload_sizes_give_calls_that_cover_them_once(sizes: list[int]) -> None:
    named = {f"p{i}": n for i, n in enumerate(sizes)}
    calls, cap = plan_mod.layout(PLAN, named), plan_mod.part_bytes(PLAN)
    for name, size in named.items():
        got = [p for c in calls for p in c["parts"] if p[0] == name]
        assert sorted(p[1] for p in got) == list(range(1, math.ceil(size / cap) + 1))
        assert sum(p[2] for p in got) == size
    loads = [sum(p[2] for p in c["parts"]) for c in calls]
    assert max(loads) <= cap and loads[-1] == min(loads)  # the compute call carries least
    assert len(calls) <= math.ceil(sum(sizes) / cap) + len(sizes)


def test_each_command_fits_its_timeout_and_the_plan_fits_ten_minutes() -> None:
    lease, limits, est = PLAN["lease"], PLAN["limits"], plan_mod.estimate(PLAN)
    calls = plan_mod.layout(PLAN)
    for call in calls:
        assert call["timeout_s"] <= lease["command_s"]
    compute, bench = calls[-1], PLAN["bench"]
    before_bench = sum(PLAN["compute_steps_s"].values())
    # the benchmark's hard stop and the steps before it fit the call's timeout ...
    assert before_bench + bench["timeout_s"] + 30 <= compute["timeout_s"]
    # ... its counted work fits before its deadline, and the deadline before the hard stop
    assert sum(est["bench_s"].values()) <= bench["deadline_s"]
    assert bench["deadline_s"] + 60 <= bench["timeout_s"]
    assert est["compute_command_s"] <= compute["timeout_s"]
    assert [c["n"] for c in est["calls"]] == [c["n"] for c in calls]
    assert all(c["sent_mib"] >= lease["repo_mib_max"] for c in est["calls"])
    assert est["total_worst_s"] <= limits["plan_device_s"] <= lease["session_device_s"]
    assert est["total_worst_s"] - est["total_s"] == (
        PLAN["estimate_s"]["start_worst"] - PLAN["estimate_s"]["start"]
    )


def test_the_deadline_after_a_slow_chain_keeps_the_plan_in_ten_minutes() -> None:
    est, bench = plan_mod.estimate(PLAN), PLAN["bench"]
    on_time = sum(c["seconds"] for c in est["calls"][:-1])
    assert plan_mod.deadline_after(PLAN, on_time) == bench["deadline_s"]  # on plan: as planned
    compute = plan_mod.layout(PLAN)[-1]
    before = plan_mod.call_seconds(PLAN, compute) - plan_mod.compute_seconds(PLAN)
    before += sum(PLAN["compute_steps_s"].values())
    after = bench["warmup_s"] + bench["min_time_s"] + bench["cost_s"]["report"]
    for late in (30, 60, 90):
        held = on_time + late
        deadline = plan_mod.deadline_after(PLAN, held)
        assert 0 < deadline < bench["deadline_s"]
        assert held + before + deadline + after <= PLAN["limits"]["plan_device_s"]
    assert plan_mod.deadline_after(PLAN, on_time + 300) == 0  # too late for any of it


def test_the_documented_calls_are_the_derived_ones() -> None:
    doc = (REPO / PLAN["doc"]).read_text()
    for call in plan_mod.layout(PLAN):
        row = next((line for line in doc.splitlines() if line.startswith(f"| {call['n']} |")), "")
        assert call["command"] in row and f"timeout_s={call['timeout_s']}" in row, call["n"]
        assert all(f"{p[0]}.part{p[1]:02d}" in row for p in call["parts"]), row
    assert f"| {len(plan_mod.layout(PLAN)) + 1} |" not in doc


def test_the_counted_measurements_are_what_bench_latency_parses() -> None:
    from mtl_edge.bench.latency import LatencyConfig, settings_of

    bench = PLAN["bench"]
    cfg = LatencyConfig(settings=bench["settings"], batch_sizes=bench["batch_sizes"])
    parsed = settings_of(cfg)
    count = sum(len(s.modes) * len(s.batch_sizes(cfg.batch_sizes)) for s in parsed)
    assert count == len(plan_mod.measurements(bench)) == plan_mod.estimate(PLAN)["measurements"]
    pairs = {(s.backend, s.precision) for s in parsed}
    assert {("onnxruntime-cuda", "fp32"), ("onnxruntime-cuda", "fp16")} <= pairs
    assert {s.backend for s in parsed} >= {"torch-cuda", "torch-cuda-graphs"}
    assert {m for s in parsed if s.backend == "onnxruntime-cuda" for m in s.modes} == {
        "compute",
        "copies",
    }
    assert bench["min_time_s"] >= 3 and bench["parity_episodes"] >= 200  # the terms
    assert min(bench["batch_sizes"]) == 1 and max(bench["batch_sizes"]) == 256


def test_bench_args_are_accepted_by_the_cli_parser(tmp_path: Path) -> None:
    for dry in (False, True):
        args = plan_mod.bench_args(PLAN, dry_run=dry)
        res = subprocess.run(
            [sys.executable, "-m", "mtl_edge.cli", "bench", "latency", "--bundle",
             str(tmp_path / "absent"), *args, "--out", str(tmp_path / "o")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        # every option parsed; it stops at the missing bundle, before any work
        assert res.returncode == 1 and "absent" in res.stderr, res.stderr
        assert "No such option" not in res.stderr


# --- the device script on the CPU -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_registry_bundle(tmp_path_factory) -> Path:
    """A conv4 (width 4, 32 px) bundle exported by the project's exporter, FP32 only."""
    pytest.importorskip("torch")
    return make_registry_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def staged(tmp_path: Path, tiny_registry_bundle: Path) -> dict:
    """A fake 2.5 MiB wheel and the tiny bundle, staged under a lease shrunk to 1 MiB parts:
    calls 1 and 2 carry wheel parts 1 and 2, call 3 wheel part 3 and the bundle."""
    payloads = {
        "wheel": fake_wheel(tmp_path, int(2.5 * MIB)),
        "bundle": prepare.stage_bundle(tiny_registry_bundle, tmp_path / "payload"),
    }
    plan = {
        **PLAN,
        "lease": {**PLAN["lease"], "call_mib": 3, "repo_mib_max": 1, "margin_mib": 1},
        "wheel": {**PLAN["wheel"], "bytes": payloads["wheel"].stat().st_size},
        "bundle": {**PLAN["bundle"], "tar_bytes": payloads["bundle"].stat().st_size},
    }
    dest = tmp_path / "carry"
    manifest = prepare.stage(plan, payloads, dest)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "MTL_EDGE_ORT_STORE": str(tmp_path / "store"),
    }
    return {
        "dest": dest,
        "env": env,
        "manifest": manifest,
        "payloads": payloads,
        "plan": plan,
        "tmp": tmp_path,
    }


def _device(staged: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(HERE / "device.sh"), *args],
        capture_output=True,
        text=True,
        env=staged["env"],
        timeout=timeout,
        cwd=REPO,
    )


def test_staged_parts_rejoin_to_each_payload(staged: dict) -> None:
    dest, manifest = staged["dest"], staged["manifest"]
    assert sorted(p.name for p in dest.glob("call*")) == ["call1", "call2", "call3"]
    assert sorted(p.name for p in (dest / "call3").iterdir()) == [
        "MANIFEST.json",
        "bundle.part01",
        "wheel.part03",
    ]
    for entry in manifest["payloads"]:
        parts = [next(dest.glob(f"call*/{p['file']}")) for p in entry["parts"]]
        joined = b"".join(p.read_bytes() for p in parts)
        assert joined == staged["payloads"][entry["name"]].read_bytes()
        assert hashlib.sha256(joined).hexdigest() == entry["sha256"]
        assert all(p.stat().st_size <= MIB for p in parts)
    for folder in dest.glob("call*"):  # every call brings the whole manifest
        assert json.loads((folder / "MANIFEST.json").read_text()) == manifest


def test_staging_sizes_that_plan_other_calls_is_refused(staged: dict) -> None:
    plan = {**staged["plan"], "bundle": {**staged["plan"]["bundle"], "tar_bytes": 2 * MIB}}
    with pytest.raises(SystemExit, match="bundle.tar_bytes"):
        prepare.stage(plan, staged["payloads"], staged["tmp"] / "other")


def test_a_damaged_or_missing_part_stops_early(staged: dict) -> None:
    part = staged["dest"] / "call2" / "wheel.part02"
    good = part.read_bytes()
    part.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    res = _device(staged, "receive", str(staged["dest"] / "call2"))
    assert res.returncode != 0 and "sha256 differs" in res.stderr + res.stdout
    part.write_bytes(good)
    assert _device(staged, "receive", str(staged["dest"] / "call1")).returncode == 0
    res = _device(staged, "compute", str(staged["dest"] / "call3"), "--dry-run")
    assert res.returncode != 0 and "missing wheel.part02" in res.stdout + res.stderr
    steps = json.loads((Path(staged["env"]["OUT"]) / "steps.json").read_text())
    assert steps["rc"] != 0 and "bench" not in steps


def test_a_part_changed_in_the_store_fails_the_join(staged: dict) -> None:
    store = staged["tmp"] / "store"
    for n in (1, 2, 3):
        parts_mod.receive(store, staged["dest"] / f"call{n}")
    assert parts_mod.join(store, "bundle").read_bytes() == staged["payloads"]["bundle"].read_bytes()
    (store / "parts" / "wheel.part01").write_bytes(b"not the part")
    with pytest.raises(parts_mod.PartError, match="joined sha256"):
        parts_mod.join(store, "wheel")
    assert not (store / PLAN["wheel"]["file"]).exists()


def test_a_bundle_tar_reaching_outside_its_folder_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(parts_mod.PartError, match="bad.tar"):
        parts_mod.unpack(bad, tmp_path / "bundle")
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.slow
def test_the_compute_call_runs_end_to_end_on_the_cpu(staged: dict) -> None:
    for n in (1, 2):
        res = _device(staged, "receive", str(staged["dest"] / f"call{n}"))
        assert res.returncode == 0, res.stderr
    assert "parts here: wheel 1,2 of 3; bundle none of 1; sha256 ok" in res.stdout
    res = _device(staged, "compute", str(staged["dest"] / "call3"), "--dry-run")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = Path(staged["env"]["OUT"])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= PLAN["lease"]["files_back"]
    for f in files:  # what comes back: small files, at most 2 folders down, plain names
        assert f.stat().st_size <= PLAN["lease"]["file_mib"] * MIB
        assert len(f.relative_to(out).parts) <= 3 and all(c.isalnum() or c in "._-" for c in f.name)
    assert {f.name for f in files} >= {"latency.json", "latency.md", "latency.png", "smoke.json"}
    site = Path(staged["env"]["MTL_EDGE_ORT_STORE"]) / "site"
    assert (site / "mtl_edge_fake_ort_gpu" / "__init__.py").is_file()  # its own folder only
    assert importlib.util.find_spec("mtl_edge_fake_ort_gpu") is None
    assert json.loads((out / "smoke.json").read_text())["ok"] is True
    steps = json.loads((out / "steps.json").read_text())
    assert steps["rc"] == 0 and {"install", "fp16", "smoke", "bench"} <= set(steps)
    doc = json.loads((out / "latency.json").read_text())
    ran = {(s["backend"], s["precision"], s["mode"]) for s in doc["results"]["settings"]}
    for entry in PLAN["bench"]["settings"]:
        backend, precision, modes, _ = plan_mod.parse_setting(entry, [1])
        assert {(backend, precision, m) for m in modes} <= ran, doc["results"]["skipped"]
    parity = doc["results"]["parity"]
    assert set(parity["variants"]) == {"fp32", "fp16"} and parity["variants"]["fp32"]["pass"]
    assert "matmul" in doc["results"]["gpu_peak"] and "goals" in doc["results"]
    collect_mod.REPO = staged["tmp"] / "repo"  # collect into a scratch tree, not this repo
    dest = collect_mod.collect(PLAN, out)
    kept = {p.name for p in dest.iterdir()}
    assert {"latency.json", "latency.png", "versions.txt", "plan.json", "lease.json"} <= kept
    commands = (dest / "commands.md").read_text()
    assert all(c["command"] in commands for c in plan_mod.layout(PLAN))
    assert "Measured steps" in commands and "commands.md" in kept
