"""Issue 20's GPU plan: plan.json against the device machine's limits, and the device-side
script end to end on the CPU (--dry-run) with a fake wheel, a tiny bundle and a fake $OUT.

What the dry run proves: the parts are joined and checked, the wheel installs into its own
folder, the FP16 variant is made, the smoke check and the benchmark run with the plan's own
settings and write at most 8 small files. What it cannot: anything about CUDA."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_fixtures import fake_wheel, make_registry_bundle

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
prepare = _module("prepare")
collect_mod = _module("collect")
PLAN = plan_mod.load_plan()


def test_every_call_carries_at_most_64_mib_and_the_parts_cover_the_wheel() -> None:
    wheel, limits = PLAN["wheel"], PLAN["limits"]
    assert wheel["part_mib"] <= limits["part_mib_max"] <= limits["call_mib"]
    n_parts = math.ceil(wheel["bytes"] / (wheel["part_mib"] * MIB))
    named = sorted(p for c in PLAN["calls"] for p in c.get("parts", []))
    assert named == list(range(1, n_parts + 1))  # each part once, in some call
    for call in PLAN["calls"]:
        size = plan_mod.carried_bytes(PLAN, call) + PLAN["repo_bytes"]
        assert size <= limits["call_mib"] * MIB, (call["n"], size / MIB)
    assert prepare.repo_bytes() <= PLAN["repo_bytes"]  # what a call sends of the repo itself
    assert wheel["file"].startswith("onnxruntime_gpu-1.31.1-cp312-cp312-")
    tag = wheel["file"].removesuffix(".whl").split("-")[-1]
    args = wheel["pip_download"]
    assert args[args.index("--platform") + 1] == tag and "--no-deps" in args
    assert args[args.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in args


def test_each_command_fits_its_timeout_and_the_plan_fits_ten_minutes() -> None:
    limits, est = PLAN["limits"], plan_mod.estimate(PLAN)
    for call in PLAN["calls"]:
        assert call["timeout_s"] <= limits["command_s"]
    compute = PLAN["calls"][-1]
    assert compute.get("runs_bench") and compute.get("bundle")
    before_bench = sum(PLAN["compute_steps_s"].values())
    # the benchmark's hard stop and the steps before it fit the call's timeout ...
    assert before_bench + PLAN["bench"]["timeout_s"] + 30 <= compute["timeout_s"]
    # ... its counted work fits before its deadline, and the deadline before the hard stop
    bench_work = sum(est["bench_s"].values())
    assert bench_work <= PLAN["bench"]["deadline_s"] + 60
    assert PLAN["bench"]["deadline_s"] + 60 <= PLAN["bench"]["timeout_s"]
    assert est["compute_command_s"] <= compute["timeout_s"]
    assert est["total_worst_s"] <= limits["plan_device_s"] <= limits["session_device_s"]


def test_the_counted_measurements_are_what_bench_latency_parses() -> None:
    from mtl_edge.bench.latency import LatencyConfig, settings_of

    bench = PLAN["bench"]
    cfg = LatencyConfig(settings=bench["settings"], batch_sizes=bench["batch_sizes"])
    parsed = settings_of(cfg)
    count = sum(len(s.modes) * len(s.batch_sizes(cfg.batch_sizes)) for s in parsed)
    assert count == len(plan_mod.measurements(bench)) == plan_mod.estimate(PLAN)["measurements"]
    pairs = {(s.backend, s.precision) for s in parsed}
    assert {("onnxruntime-cuda", "fp32"), ("onnxruntime-cuda", "fp16")} <= pairs
    assert {s.backend for s in parsed} >= {"torch-cuda", "torch-cuda-graphs", "torch-compile"}
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
    calls = [{"n": 1, "parts": [1]}, {"n": 2, "parts": [2]}, {"n": 3, "parts": [3]}]
    wheel = fake_wheel(tmp_path, int(2.5 * MIB))
    dest = tmp_path / "carry"
    manifest = prepare.split(wheel, dest, 1, calls)
    prepare.stage_bundle(tiny_registry_bundle, dest / "call3")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "MTL_EDGE_ORT_STORE": str(tmp_path / "store"),
    }
    return {"dest": dest, "env": env, "manifest": manifest, "tmp": tmp_path}


def _device(staged: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(HERE / "device.sh"), *args],
        capture_output=True,
        text=True,
        env=staged["env"],
        timeout=timeout,
        cwd=REPO,
    )


def test_split_parts_rejoin_to_the_wheel(staged: dict) -> None:
    m, dest = staged["manifest"], staged["dest"]
    assert [p["file"] for p in m["parts"]] == ["ort-gpu.part01", "ort-gpu.part02", "ort-gpu.part03"]
    parts = [dest / f"call{i}" / p["file"] for i, p in enumerate(m["parts"], 1)]
    joined = b"".join(p.read_bytes() for p in parts)
    assert hashlib.sha256(joined).hexdigest() == m["sha256"] and len(joined) == m["bytes"]
    assert all(p["bytes"] <= MIB for p in m["parts"])


def test_a_damaged_or_missing_part_stops_early(staged: dict) -> None:
    part = staged["dest"] / "call2" / "ort-gpu.part02"
    good = part.read_bytes()
    part.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    res = _device(staged, "receive", str(staged["dest"] / "call2"))
    assert res.returncode != 0 and "sha256 differs" in res.stderr + res.stdout
    part.write_bytes(good)
    assert _device(staged, "receive", str(staged["dest"] / "call1")).returncode == 0
    res = _device(staged, "compute", str(staged["dest"] / "call3"), "--dry-run")
    assert res.returncode != 0 and "missing ort-gpu.part02" in res.stdout + res.stderr
    steps = json.loads((Path(staged["env"]["OUT"]) / "steps.json").read_text())
    assert steps["rc"] != 0 and "bench" not in steps


@pytest.mark.slow
def test_the_compute_call_runs_end_to_end_on_the_cpu(staged: dict) -> None:
    for n in (1, 2):
        res = _device(staged, "receive", str(staged["dest"] / f"call{n}"))
        assert res.returncode == 0, res.stderr
    assert "parts 01,02 of 3 here, sha256 ok" in res.stdout
    res = _device(staged, "compute", str(staged["dest"] / "call3"), "--dry-run")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = Path(staged["env"]["OUT"])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= PLAN["limits"]["files_back"]
    for f in files:  # what comes back: small files, at most 2 folders down, plain names
        assert f.stat().st_size <= PLAN["limits"]["file_mib"] * MIB
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
    assert {"latency.json", "latency.png", "versions.txt", "plan.json", "commands.md"} <= kept
    commands = (dest / "commands.md").read_text()
    assert all(c["command"] in commands for c in PLAN["calls"]) and "Measured steps" in commands
