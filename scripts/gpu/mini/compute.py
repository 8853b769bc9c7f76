"""The compute command's two Python steps (device.sh runs them; docs/gpu-pipeline.md).

    compute.py smoke OUT_DIR [--set K=V ...]
        Every code path the training uses on this machine, on synthetic data, in seconds:
        pre-training steps and meta-transfer steps with the batched closed-form inner loop
        (second order, HT on), under the precision, channels-last, torch.compile and fused
        optimizers the H200 recipe asks for, and a checkpoint saved and loaded back.
        Writes OUT_DIR/smoke.json; exits non-zero on the first error.
    compute.py train RECIPE RUN --deadline-s S [--set K=V ...]
        Pre-training then meta-transfer (the staged runner, `mtl-edge train pipeline
        --stages pretrain,meta`) with the deadline guard: after S seconds (or on SIGINT /
        SIGTERM) the running stage ends its epoch, saves and returns, so what was trained is
        kept; the stages' own time budget (runtime.time_budget) should end them before.

Smoke recipe: smoke.toml beside this file; --set overrides it (the dry run: runtime.device=cpu,
runtime.compile=false).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
SMOKE = HERE / "smoke.toml"


def smoke(out: Path, overrides: list[str]) -> dict[str, object]:
    """Run the smoke stages; the record written to out/smoke.json."""
    import torch

    from mtl_edge.train.checkpoint import load_checkpoint
    from mtl_edge.train.config import load_recipe
    from mtl_edge.train.precision import fused_options, resolve_precision
    from mtl_edge.train.torchdata import resolve_device
    from mtl_edge.workflows.pipeline import run_pipeline

    cfg = load_recipe(str(SMOKE), overrides)
    device = resolve_device(cfg.runtime)
    prec = resolve_precision(cfg.runtime.amp, cfg.runtime.channels_last, device)
    t0 = time.perf_counter()
    record = run_pipeline(cfg, "smoke.toml", out / "run", "pretrain,meta")
    meta = load_checkpoint(out / "run" / "meta" / "best.pt")
    x = torch.zeros((2, *meta.preprocess.input_shape))
    feats = meta.backbone.eval()(x)
    result = {
        "ok": all(e["status"] == "done" for e in record["stages"].values()),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "precision": prec.to_dict(),
        "compile": cfg.runtime.compile,
        "fused_optimizers": bool(fused_options(device)),
        "inner_loop": cfg.meta.inner_loop,
        "second_order": cfg.meta.second_order,
        "checkpoint_features": list(feats.shape),
        "wall_s": round(time.perf_counter() - t0, 1),
        "stages": {
            k: {"status": v["status"], "wall_s": v["wall_s"]} for k, v in record["stages"].items()
        },
    }
    (out / "smoke.json").write_text(json.dumps(result, indent=1))
    return result


def train(recipe: str, run: Path, deadline_s: float, overrides: list[str]) -> int:
    """The guarded training stages; 0 when both finished (early stops included)."""
    from mtl_edge.train import deadline
    from mtl_edge.train.config import load_recipe, recipe_source
    from mtl_edge.workflows.pipeline import run_pipeline

    deadline.install()
    timer = threading.Timer(deadline_s, deadline.request)
    timer.daemon = True
    timer.start()
    cfg = load_recipe(recipe, overrides)
    record = run_pipeline(cfg, recipe_source(recipe, overrides), run, "pretrain,meta")
    timer.cancel()
    for name, e in record["stages"].items():
        print(
            f"{name}: {e['status']} in {e['wall_s']:.1f} s, {e.get('images_per_s') or 0:.0f} img/s"
        )
    return 0 if all(e["status"] == "done" for e in record["stages"].values()) else 1


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smoke")
    s.add_argument("out", type=Path)
    t = sub.add_parser("train")
    t.add_argument("recipe")
    t.add_argument("run", type=Path)
    t.add_argument("--deadline-s", type=float, required=True)
    for p in (s, t):
        p.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    if args.cmd == "smoke":
        result = smoke(args.out, args.overrides)
        print(f"smoke: ok={result['ok']} in {result['wall_s']} s on {result['device']}")
        return 0 if result["ok"] else 1
    return train(args.recipe, args.run, args.deadline_s, args.overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
