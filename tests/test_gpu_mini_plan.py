"""Issue 18's GPU plan (scripts/gpu/mini/) on the CPU: the recipe's work and the calls against
the lease's limits, the compact shards, the results packing (bundles and checkpoints whole),
and the whole plan end to end - prepare, device.sh receive / compute --dry-run into a fake
$OUT, finish.py on what comes back."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "scripts" / "gpu" / "mini"


def _load(name: str):
    """A module of scripts/gpu/mini under its own name (scripts/gpu/inference has a plan.py
    too, and the suite imports both)."""
    spec = importlib.util.spec_from_file_location(f"gpu_mini_{name}", MINI / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shards = _load("shards")
plan_mod = _load("plan")
results = _load("results")

MIB = 1 << 20


def _folders(root: Path, splits: dict[str, int], per_class: int = 8) -> Path:
    """root/miniimagenet/<split>/<class>/<class><i>.jpg: noisy colour patches per class."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for c in range(classes):
            folder = root / "miniimagenet" / split / f"n{split[:2]}{c:03d}"
            folder.mkdir(parents=True)
            base = rng.integers(0, 255, 3)
            for i in range(per_class):
                a = np.clip(base + rng.normal(0, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(folder / f"{folder.name}{i:04d}.jpg")
    return root


def test_the_plan_fits_the_lease() -> None:
    plan = plan_mod.load_plan()
    lease, est = plan["lease"], plan_mod.estimate(plan)
    calls = plan_mod.layout(plan)
    # miniImageNet train: 159 MB of JPEG in 39 MiB shards (64 - 24 tree - 1 margin) = 4 calls
    assert plan_mod.part_bytes(plan) == 39 * MIB and len(calls) == 4
    assert sum(c["bytes"] for c in calls) >= plan["data"]["bytes"]
    assert all(plan_mod.call_bytes(plan, c) <= lease["call_mib"] * MIB for c in calls)
    assert [c["compute"] for c in calls] == [False, False, False, True]
    assert calls[-1]["bytes"] == min(c["bytes"] for c in calls)  # a rerun sends the least
    # commands: the compute one with packing, its smoke and training at their limits
    c = plan["compute"]
    assert est["compute_command_worst_s"] <= c["timeout_s"] <= plan["limits"]["compute_command_s"]
    assert c["timeout_s"] <= lease["command_s"] and all(x["timeout_s"] <= 600 for x in calls)
    # device time in all, the start assumed at start_worst (180 s) and every limit reached
    assert plan["estimate_s"]["start_worst"] >= 150
    assert est["total_worst_s"] <= plan["limits"]["plan_device_s"] <= lease["session_device_s"]
    # files back: the parts and RESULTS.json + compute.log, each under 16 MiB, at most 8
    r = plan["results"]
    assert r["part_mib"] < lease["file_mib"]
    assert r["max_parts"] + len(r["other_files"]) <= lease["files_back"]


def test_the_recipe_is_the_tf_setting_with_its_budget() -> None:
    from mtl_edge.train.config import load_recipe

    plan = plan_mod.load_plan()
    cfg = load_recipe(plan["recipe"])
    assert cfg.model.backbone == "resnet12" and cfg.model.args["widths"] == [64, 128, 256, 512]
    assert cfg.runtime.time_budget == plan["compute"]["train_budget"]
    assert (cfg.runtime.amp, cfg.runtime.channels_last, cfg.runtime.compile) == ("bf16", True, True)
    assert cfg.runtime.save == "end" and cfg.meta.inner_loop == "batched"
    assert cfg.pretrain.val_episodes == cfg.meta.val_episodes == 0 and cfg.meta.snapshots >= 2
    work = plan_mod.work(plan)
    pre, meta = work["pretrain"], work["meta"]
    # the TF code: 10,000 iterations of batch 64; 17 epochs of 600 batches are 10,200
    assert pre["steps"] == 17 * (38400 // 64) and pre["images"] == 64 * pre["steps"]
    assert abs(pre["steps"] - 10000) / 10000 < 0.03
    assert meta["tasks"] == cfg.meta.iterations * (cfg.meta.meta_batch + cfg.hard_tasks.count)
    # training FLOPs of an image: forward + input gradients (not the image's) + weight gradients
    fwd = pre["forward_flops_per_image"]
    assert 2.9 * fwd < pre["flops"] / pre["images"] < 3 * fwd
    assert meta["flops"] > 0 and 0 < work["kept_fraction"]["meta"] <= 1


def test_shards_round_trip_within_the_cap(tmp_path: Path) -> None:
    root = _folders(tmp_path / "data", {"train": 3})
    train = root / "miniimagenet" / "train"
    cap = 12_000
    manifest = shards.pack(train, tmp_path / "shards", cap)
    assert len(manifest["shards"]) >= 2 and manifest["files"] == 24
    for s in manifest["shards"]:
        got = sum((tmp_path / "shards" / n).stat().st_size for n in (s["bin"], s["npy"]))
        assert got == s["bytes"] <= cap
    store = tmp_path / "store"
    assert "1 of" in shards.receive(store, _only(tmp_path, manifest, 0))
    with pytest.raises(shards.ShardError, match="missing"):
        shards.unpack(store, tmp_path / "out")
    for k in range(1, len(manifest["shards"])):
        shards.receive(store, _only(tmp_path, manifest, k))
    assert shards.unpack(store, tmp_path / "out") == 24
    for path in train.rglob("*.jpg"):
        assert (tmp_path / "out" / path.relative_to(train)).read_bytes() == path.read_bytes()
    bad = _only(tmp_path, manifest, 0)
    (bad / manifest["shards"][0]["bin"]).write_bytes(b"x")
    with pytest.raises(shards.ShardError, match="sha256 differs"):
        shards.receive(store, bad)


def _only(tmp_path: Path, manifest: dict, k: int) -> Path:
    """A call folder carrying shard k."""
    folder = tmp_path / f"call{k}"
    folder.mkdir(exist_ok=True)
    (folder / shards.MANIFEST).write_text(json.dumps(manifest))
    for name in ("bin", "npy"):
        f = manifest["shards"][k][name]
        (folder / f).write_bytes((tmp_path / "shards" / f).read_bytes())
    return folder


def test_packing_keeps_bundles_and_checkpoints_whole(tmp_path: Path) -> None:
    from device_fixtures import make_bundle
    from model_fixtures import tiny_checkpoint

    from mtl_edge.bundle import Bundle
    from mtl_edge.train.checkpoint import load_checkpoint, read_checkpoint

    run = tmp_path / "run"
    make_bundle(run / "export" / "bundle", meta_ways=5)  # manifest, model, head_init_*.npy
    assert list((run / "export" / "bundle").glob("*.npy"))
    first = tiny_checkpoint(run / "meta" / "snapshot-1.pt", size=16)
    ckpt = read_checkpoint(first)
    ckpt["optimizer"] = {"state": {0: torch.ones(1000)}}
    torch.save(ckpt, run / "meta" / "best.pt")  # the same weights, plus resume-only state
    (run / "stages.json").write_text("{}")
    out = tmp_path / "OUT"
    record = results.pack(run, out, part_mib=0.05, max_parts=50)
    assert record["dtype"] == "fp32" and len(record["parts"]) >= 2
    assert all((out / p["file"]).stat().st_size <= 0.05 * MIB for p in record["parts"])
    one = first.stat().st_size
    assert record["bytes"] < 1.5 * one  # the second checkpoint's tensors are stored once
    back = tmp_path / "back"
    results.restore(out, back)
    bundle = Bundle.load(back / "run" / "export" / "bundle", verify=True)
    assert sorted(bundle.manifest["files"]) == sorted(
        p.name for p in (run / "export" / "bundle").iterdir() if p.name != "manifest.json"
    )
    for name in ("snapshot-1.pt", "best.pt"):
        got, want = load_checkpoint(back / "run" / "meta" / name), load_checkpoint(first)
        ours, theirs = got.backbone.state_dict(), want.backbone.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert "optimizer" not in read_checkpoint(back / "run" / "meta" / "best.pt")
    assert (back / "run" / "stages.json").read_text() == "{}"
    # too few parts allowed for FP32: the weights come back in bf16, and say so
    only = tmp_path / "only"
    (only / "meta").mkdir(parents=True)
    (only / "meta" / "best.pt").write_bytes(first.read_bytes())
    n = len(results.pack(only, tmp_path / "OUT2", 0.004, 1000)["parts"])
    half = results.pack(only, tmp_path / "OUT3", 0.004, n - 1)
    assert n >= 4 and half["dtype"] == "bf16"
    restored = results.restore(tmp_path / "OUT3", tmp_path / "back3")
    assert load_checkpoint(tmp_path / "back3" / "run" / "meta" / "best.pt") and restored
    (out / record["parts"][0]["file"]).write_bytes(b"0")
    with pytest.raises(results.ResultsError, match="sha256 differs"):
        results.restore(out, tmp_path / "again")


def test_the_whole_plan_runs_on_the_cpu(tmp_path: Path) -> None:
    root = _folders(tmp_path / "data", {"train": 4, "val": 3, "test": 5})
    py = [sys.executable, str(MINI / "prepare.py")]
    got = subprocess.run(
        [*py, "--data", str(root), "--dest", str(tmp_path / "dev"), "--cap-bytes", "12000"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    calls = json.loads(got.stdout)
    assert len(calls) >= 3 and calls[-1]["compute"] and not calls[0]["compute"]
    out = tmp_path / "OUT"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env["MTL_EDGE_MINI_STORE"] = str(tmp_path / "store")
    for call in calls:
        cmd = call["command"].split() + (["--dry-run"] if call["compute"] else [])
        ran = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert "RESULTS.json" in files and "compute.log" in files and len(files) <= 8
    assert all((out / f).stat().st_size < 16 * MIB for f in files)
    log = (out / "compute.log").read_text()
    assert "smoke: ok=True" in log and "done (train exit 0)" in log
    res = tmp_path / "res"
    fin = subprocess.run(
        [sys.executable, str(MINI / "finish.py"), str(out), "--data", str(root),
         "--recipe", str(MINI / "tiny.toml"), "--work", str(tmp_path / "work"),
         "--out", str(res), "--val-episodes", "4"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert fin.returncode == 0, fin.stdout[-2000:] + fin.stderr[-2000:]
    for name in ("device-recipe.resolved.json", "device-stages.json", "device-steps.json",
                 "device-smoke.json", "pretrain-budget.json", "curves.png", "accuracy.json",
                 "accuracy.md", "int8-vs-fp32.json", "manifest.json", "validation.json",
                 "enroll_predict.json"):  # fmt: skip
        assert (res / name).is_file(), name
    rows = json.loads((res / "accuracy.json").read_text())
    assert {r["head"] for r in rows if r["model"] != "bundle"} == {
        "mtl", "centroid", "logreg", "finetune"}  # fmt: skip
    assert any(r["precision"] == "int8-cpu - fp32" for r in rows)
    people = json.loads((res / "enroll_predict.json").read_text())
    assert len(people["classes"]) == 5 and people["predicted"] == 5 * 3
    chosen = json.loads((res / "validation.json").read_text())
    assert chosen["chosen"] in chosen["scores"] and len(chosen["scores"]) == 3
    smoke = json.loads((res / "device-smoke.json").read_text())
    assert smoke["ok"] and smoke["second_order"] and smoke["inner_loop"] == "batched"
