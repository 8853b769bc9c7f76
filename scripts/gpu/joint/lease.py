"""Issue 19's lease on the GPU machine (run through device.sh, which makes mtl_edge importable).

    lease.py receive DIR                  store the data part(s) carried in DIR, sha256 checked
    lease.py versions                     machine, driver, torch -> $OUT/versions.txt
    lease.py compute DIR [--dry-run] [--deadline-s S]

The receive calls (all but the last of `plan.layout`) leave parts 1 .. N-1 in the store; the
compute call carries part N. compute, against one deadline (`plan.deadline_s`, or DEADLINE_S
from `plan.py deadline --held-s S`, from its start):

1. receive DIR (the last part); join the N parts in order (every one present, each checked on
   arrival), check the whole payload's sha256, unpack the shards into the store and check
   every shard's sha256 against its index.json;
2. decode the split once into the store's cache, in the background (the training runs read it);
3. smoke check, `mtl-edge bench joint` on CUDA: on small synthetic tasks every engine (loop,
   batched, CUDA graphs) for Reptile + transfer, fo-Proto-MAML + transfer and second-order
   MAML must learn what the loop learns (within plan.json's tolerance); on the recipe's own
   shapes, seconds per iteration of each model with each engine. A batched engine that
   differs, or a smoke run that fails twice, stops the lease (nothing is trained); CUDA graphs
   that fail their check are switched off for the training and the lease goes on;
4. a tiny training run through `mtl-edge train joint` on CUDA (data on the GPU, checkpoint
   written and read back);
5. the three models (plan.json "models": Reptile + transfer first, the slowest, then plain
   Reptile and plain transfer), one process each, with the fastest engine that passed, all for
   the same number of iterations: as many as the time left allows at the smoke's rates
   (`plan.iterations`), a checkpoint every iterations / 8 (the learning curve); each run has
   a time limit (it saves where it got), and a run that stops early sets the count for the
   ones after it;
6. pack each model's run folder (checkpoints, metrics, log) into $OUT/<model>.tar, and
   lease.json (steps, rates, iterations planned and reached, engine, smoke verdicts).

$OUT then holds versions.txt, smoke.json, lease.json, compute.log and the three tars: 7 files.
--dry-run does all of it on the CPU with plan.json's tiny overrides (tests/test_joint_gpu_plan.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from plan import deadline_s as planned_deadline  # noqa: E402
from plan import iterations, load_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
RECIPE = REPO / "recipes" / "joint-gpu.toml"
STORE = Path(os.environ.get("MTL_EDGE_JOINT_STORE", "/tmp/mtl-edge-joint"))
OUT = Path(os.environ.get("OUT", REPO / "out" / "device"))
CLI = [sys.executable, "-m", "mtl_edge.cli"]


class LeaseError(Exception):
    """A step that stops the lease; its message is the one line printed."""


def say(msg: str) -> None:
    print(f"[lease {dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- data ---------------------------------------------------------------------------------


def receive(carried: Path) -> dict[str, Any]:
    """Copy the parts in `carried` into STORE/parts (atomically) and check their sha256; the
    manifest. Every part before the last one carried must already be here (the machine kept
    the store since the earlier calls), or the chain of calls starts again."""
    manifest_file = carried / "MANIFEST.json"
    if not manifest_file.is_file():
        raise LeaseError(f"{manifest_file}: missing; carry the folder prepare.py wrote")
    manifest = json.loads(manifest_file.read_text())
    (STORE / "parts").mkdir(parents=True, exist_ok=True)
    shutil.copy2(manifest_file, STORE / "MANIFEST.json")
    got = []
    for i, part in enumerate(manifest["parts"], 1):
        src, dst = carried / part["file"], STORE / "parts" / part["file"]
        if not src.is_file():
            continue
        tmp = dst.with_suffix(".tmp")
        shutil.copy2(src, tmp)
        if sha256(tmp) != part["sha256"]:
            tmp.unlink()
            raise LeaseError(f"{part['file']}: sha256 differs from MANIFEST.json; send it again")
        tmp.replace(dst)
        got.append(i)
    if not got:
        raise LeaseError(f"{carried}: no part of MANIFEST.json; carry the folder prepare.py wrote")
    _require_parts(manifest, max(got))
    n = len(manifest["parts"])
    say(f"part {','.join(f'{i:02d}' for i in got)} received; parts 01-{max(got):02d} of {n} here")
    return manifest


def _require_parts(manifest: dict[str, Any], upto: int) -> None:
    """Parts 1 .. upto are in the store with their manifest sizes (their sha256 was checked
    when they came), else LeaseError."""
    missing = [
        p["file"]
        for p in manifest["parts"][:upto]
        if not (f := STORE / "parts" / p["file"]).is_file() or f.stat().st_size != p["bytes"]
    ]
    if missing:
        raise LeaseError(
            f"missing {', '.join(missing)} (a fresh machine?): make the calls again from call 1"
        )


def unpack(manifest: dict[str, Any]) -> Path:
    """Join the N parts, check the payload, unpack and check the shards; their folder."""
    _require_parts(manifest, len(manifest["parts"]))
    parts = [STORE / "parts" / p["file"] for p in manifest["parts"]]
    h = hashlib.sha256()
    for p in parts:
        h.update(p.read_bytes())
    if h.hexdigest() != manifest["sha256"]:
        raise LeaseError("the joined data's sha256 differs from MANIFEST.json; send it again")
    dest = STORE / "shards"
    shutil.rmtree(dest, ignore_errors=True)
    with lzma.open(_Joined(parts)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        tar.extractall(dest, filter="data")
    from mtl_edge.data.shards import check_shard, read_index

    folder = dest / manifest["split"]
    for entry in read_index(folder)["shards"]:
        check_shard(folder, entry)
    say(f"{manifest['shards']} shards of {manifest['images']} images in {folder}, sha256 ok")
    return dest


class _Joined:
    """The parts read one after the other as one binary file (for lzma.open)."""

    def __init__(self, parts: list[Path]) -> None:
        self.files = [p.open("rb") for p in parts]

    def read(self, size: int = -1) -> bytes:
        while self.files:
            data = self.files[0].read(size)
            if data:
                return data
            self.files.pop(0).close()
        return b""


def write_versions() -> None:
    lines = [f"# versions ({dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')})"]
    for cmd in (
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
         "--format=csv"],
        [sys.executable, "-c", "import sys, torch; print(sys.version.split()[0], 'torch', "
         "torch.__version__, 'cuda', torch.version.cuda, 'cudnn', "
         "torch.backends.cudnn.version(), 'gpu', torch.cuda.is_available())"],
    ):  # fmt: skip
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            lines.append((res.stdout + res.stderr).strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"{cmd[0]}: {e}")
    (OUT / "versions.txt").write_text("\n".join(lines) + "\n")
    say("versions -> versions.txt: " + " | ".join(lines[1:])[:300])


def decode_in_background(overrides: list[str], errors: list[str]) -> threading.Thread:
    """Decode the recipe's training split into its cache (the training processes read it);
    a failure lands in `errors` (the training runs then decode for themselves)."""
    from mtl_edge.data.decode import decoded_images
    from mtl_edge.train.config import load_recipe
    from mtl_edge.train.torchdata import open_train_split

    recipe = load_recipe(RECIPE, overrides)
    pre = recipe.model.input_preprocess

    def work() -> None:
        try:
            split = open_train_split(recipe.data, pre.color_mode)
            workers = max(1, (os.cpu_count() or 2) - 4)  # leave cores to the smoke check
            decoded_images(split, pre.resize or pre.size, recipe.data.cache_dir, workers, False)
        except Exception as e:  # noqa: BLE001 - reported, and the runs decode again
            errors.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=work, name="decode", daemon=True)
    thread.start()
    return thread


# -- smoke check and plan ------------------------------------------------------------------


def spec_of(overrides: list[str], beta: float) -> str:
    """`bench joint` setting spec of the recipe's shapes (with `overrides`) at `beta`."""
    from mtl_edge.train.config import load_recipe

    r = load_recipe(RECIPE, [*overrides, f"joint.beta={beta}"])
    j = r.joint
    keys = {
        "size": r.model.input_preprocess.size, "width": r.model.args.get("width", 32),
        "ways": j.ways, "shots": j.shots, "queries": j.queries, "meta_batch": j.meta_batch,
        "inner_steps": j.inner_steps, "meta": j.meta, "beta": j.beta, "head_init": j.head_init,
        "second_order": str(j.second_order).lower(),
    }  # fmt: skip
    return "paper-84:" + ":".join(f"{k}={v}" for k, v in keys.items())


def smoke(
    plan: dict[str, Any], overrides: list[str], dry: bool, engines: list[str], timeout_s: float
) -> dict:
    """Run `bench joint` (checks + the recipe's rates); its report, or LeaseError."""
    sm = plan["smoke"]
    checks = plan["dry_run"]["smoke_checks"] if dry else sm["checks"]
    rates = [spec_of(overrides, m["beta"]) for m in plan["models"]]
    rounds = plan["dry_run"]["rate_rounds"] if dry else sm["rate_rounds"]
    out = STORE / "smoke"
    cmd = [*CLI, "bench", "joint", "--settings", ",".join([*checks, *rates]), "--engines",
           ",".join(engines), "--rounds", str(rounds), "--warmup", "1", "--check", "3",
           "--device", "cpu" if dry else "cuda", "--out", str(out)]  # fmt: skip
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise LeaseError(f"bench joint ran past {timeout_s:.0f} s") from None
    print(res.stdout[-4000:], res.stderr[-4000:], sep="\n", flush=True)
    if res.returncode != 0:
        raise LeaseError(f"bench joint exited {res.returncode}: {res.stderr.strip()[-300:]}")
    return json.loads((out / "joint-speed.json").read_text())


def verdicts(report: dict[str, Any], tolerance: float) -> dict[str, bool]:
    """engine -> whether it learned what the loop learned in every check (and, for CUDA graphs,
    really replayed: a failed capture runs eagerly and says so in its engine name)."""
    ok: dict[str, bool] = {}
    for s in report["results"]["settings"]:
        for name, e in s["engines"].items():
            good = e["rel_diff_vs_loop"] is not None and e["rel_diff_vs_loop"] <= tolerance
            if name == "cuda-graphs":
                good = good and e["engine"] == "batched+cuda-graphs"
            ok[name] = ok.get(name, True) and good
    return ok


def rates_of(report: dict[str, Any], plan: dict[str, Any], overrides: list[str], engine: str):
    """Seconds per iteration of each model with `engine` at the recipe's shapes."""
    by_name = {s["setting"]["name"]: s for s in report["results"]["settings"]}
    return {
        m["name"]: by_name[spec_of(overrides, m["beta"])]["engines"][engine]["median_s"]
        for m in plan["models"]
    }


def choose_engine(report, plan, overrides, ok: dict[str, bool]) -> tuple[str, dict[str, float]]:
    """The passing engine that runs the three models fastest, and its rates."""
    best = None
    for engine in ("cuda-graphs", "batched", "loop"):
        if not ok.get(engine, engine == "loop"):
            continue
        try:
            rates = rates_of(report, plan, overrides, engine)
        except KeyError:
            continue
        if best is None or sum(rates.values()) < sum(best[1].values()):
            best = (engine, rates)
    if best is None:
        raise LeaseError("no engine measured the recipe's shapes; see smoke.json")
    return best


ENGINE_SETS = {
    "cuda-graphs": ["joint.batched=true", "joint.cuda_graphs=true"],
    "batched": ["joint.batched=true", "joint.cuda_graphs=false"],
    "loop": ["joint.batched=false", "joint.cuda_graphs=false"],
}


# -- training ------------------------------------------------------------------------------


def train(name: str, sets: list[str], limit_s: float, grace_s: float) -> dict[str, Any]:
    """`mtl-edge train joint` of one model into STORE/runs/name; its last metrics line."""
    run = STORE / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    cmd = [*CLI, "train", "joint", "--recipe", str(RECIPE), "--out", str(run),
           "--time-limit", f"{max(limit_s, 1.0):.1f}", "--json"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    say(f"train {name}: time limit {limit_s:.0f} s; {' '.join(sets)}")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s + grace_s)
    except subprocess.TimeoutExpired:
        raise LeaseError(f"train {name}: still running {grace_s:.0f} s past its limit") from None
    print(res.stderr[-2000:], flush=True)
    if res.returncode != 0 or not (run / "last.pt").is_file():
        raise LeaseError(f"train {name} exited {res.returncode}: {res.stderr.strip()[-300:]}")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def pack(name: str, limit_bytes: int) -> Path:
    """The run folder as OUT/<name>.tar (every file; intermediate checkpoints thinned out if
    the tar would pass the size limit of a returned file)."""
    run = STORE / "runs" / name
    files = sorted(p for p in run.rglob("*") if p.is_file())
    ckpts = [p for p in files if p.name.startswith("it") and p.suffix == ".pt"]
    while sum(p.stat().st_size for p in files) + 512 * 3 * len(files) > limit_bytes and ckpts:
        drop = ckpts.pop(1 if len(ckpts) > 1 else 0)  # keep the first, every other after
        files.remove(drop)
        say(f"pack {name}: {drop.name} left out (size limit)")
    target = OUT / f"{name}.tar"
    with tarfile.open(target, "w") as tar:
        for p in files:
            tar.add(p, arcname=f"{name}/{p.relative_to(run)}")
    return target


@contextmanager
def step(record: dict[str, Any], name: str):
    t0 = time.monotonic()
    say(f"{name} ...")
    try:
        yield
    finally:
        record["steps_s"][name] = round(time.monotonic() - t0, 1)
        say(f"{name}: {record['steps_s'][name]} s")


def compute(carried: Path, dry: bool, deadline_s: float | None) -> int:
    plan = load_plan()
    comp, t0 = plan["compute"], time.monotonic()
    default = plan["dry_run"]["deadline_s"] if dry else planned_deadline(plan)
    deadline_s = deadline_s or float(os.environ.get("DEADLINE_S") or default)
    deadline = t0 + deadline_s
    record: dict[str, Any] = {"issue": plan["issue"], "dry_run": dry, "deadline_s": deadline_s}
    record |= {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    record |= {"steps_s": {}, "models": {}}
    base = [f'data.root="{STORE / "shards"}"', f'data.cache_dir="{STORE / "cache"}"']
    overrides = base + (plan["dry_run"]["overrides"] + ['runtime.device="cpu"'] if dry else [])
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        with step(record, "receive"):
            unpack(receive(carried))
        with step(record, "versions"):
            write_versions()
        decode_errors: list[str] = []
        decoding = decode_in_background(overrides, decode_errors)
        engines = plan["smoke"]["check_engines"]
        with step(record, "smoke"):
            cap = plan["dry_run"]["smoke_timeout_s"] if dry else comp["smoke_timeout_s"]
            timeout = min(cap, (deadline - time.monotonic()) / 3)
            try:
                report = smoke(plan, overrides, dry, engines, timeout)
            except LeaseError as e:  # once more, without graphs, in what the first try left
                say(f"smoke: {e}; again without CUDA graphs")
                record["smoke_first_try"] = str(e)
                engines = [e for e in engines if e != "cuda-graphs"]
                report = smoke(plan, overrides, dry, engines, timeout)
            shutil.copy2(STORE / "smoke" / "joint-speed.json", OUT / "smoke.json")
        ok = verdicts(report, plan["smoke"]["tolerance"])
        record["smoke"] = ok
        failed = [e for e in plan["smoke"]["required"] if not ok.get(e)]
        if failed:
            raise LeaseError(f"{', '.join(failed)} differs from the loop here (see smoke.json)")
        engine, rates = choose_engine(report, plan, overrides, ok)
        record |= {"engine": engine, "rates_s_per_iteration": rates}
        with step(record, "tiny_train"):
            tiny = [*overrides, *ENGINE_SETS[engine], *plan["dry_run"]["overrides"]]
            tiny += ["joint.iterations=3", "joint.checkpoint_every=2", "runtime.threads=0"]
            tiny += ['data.kind="synthetic"', "data.options={size=16,per_class=8,train_classes=6}"]
            train("tiny", tiny, comp["tiny_train_timeout_s"], 30)
        with step(record, "decode wait"):
            decoding.join()
        if decode_errors:
            record["decode_error"] = decode_errors[0]
            say(f"decode: {decode_errors[0]}; the runs decode for themselves")
        setup, pack_s = comp["steps_s"]["model_setup"], comp["steps_s"]["pack"]
        left = deadline - time.monotonic() - pack_s - setup * len(plan["models"])
        n = iterations(left, rates, comp["safety"], comp["min_iterations"])
        if dry:
            n = min(n, plan["dry_run"]["max_iterations"])
        every = max(1, n // comp["curve_points"])
        record |= {"iterations_planned": n, "checkpoint_every": every}
        say(f"plan: {n} iterations per model ({engine}; rates {rates}), a checkpoint every {every}")
        for i, m in enumerate(plan["models"]):
            after = plan["models"][i + 1 :]
            later = sum(setup + n * rates[x["name"]] for x in after)
            limit = deadline - time.monotonic() - pack_s - later - setup
            sets = [*overrides, *ENGINE_SETS[engine], f"joint.beta={m['beta']}"]
            sets += [f"joint.iterations={n}", f"joint.checkpoint_every={every}"]
            with step(record, f"train {m['name']}"):
                last = train(m["name"], sets, limit, grace_s=60)
            record["models"][m["name"]] = last
            n = min(n, int(last["iteration"]))  # the later models do no more than this one
        with step(record, "pack"):
            for m in plan["models"]:
                pack(m["name"], plan["lease"]["file_mib"] << 20)
        record["ok"] = True
        return 0
    except LeaseError as e:
        record |= {"ok": False, "error": str(e)}
        print(f"lease: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        record["total_s"] = round(time.monotonic() - t0, 1)
        (OUT / "lease.json").write_text(json.dumps(record, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Issue 19's lease, device side (see the docstring).")
    ap.add_argument("what", choices=("receive", "versions", "compute"))
    ap.add_argument("dir", nargs="?", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--deadline-s", type=float)
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        if args.what == "receive":
            receive(args.dir)
        elif args.what == "versions":
            write_versions()
        else:
            return compute(args.dir, args.dry_run, args.deadline_s)
    except LeaseError as e:
        print(f"lease: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
