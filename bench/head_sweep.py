"""Test-time settings of the FC head against nearest-centroid, on one checkpoint's episodes.

    python -m mtl_edge.bench.head_sweep --checkpoint RUN/best.pt --split val \
        --settings 20x5,20x1,5x5,5x1 --steps 0,10,25,50,100,200,400 --lr 0.5,2 --out DIR

For each N-way K-shot setting, every (steps T, lr) pair of the MTL head (the rest of the recipe
is the checkpoint's deploy head, changed by `--head KEY=VALUE`) runs on the same seeded episodes
as cosine nearest-centroid and logistic regression (`train evaluate`'s episodes for the same
split, ways, shots, queries and seed). The report holds each head's accuracy and its paired
difference from centroid; the plot draws that difference against the step size T x lr. Choose
a recipe's [head] steps and lr with it on validation classes, never on the test split.

Writes DIR/head-sweep.json and DIR/head-sweep.png.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtl_edge.atomicio import atomic_write_json
from mtl_edge.bench.plots import _pyplot, save_figure
from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.errors import ConfigError, MtlEdgeError
from mtl_edge.fewshot.evaluate import evaluate_episodes
from mtl_edge.fewshot.heads import HeadFactory, feature_head
from mtl_edge.train.checkpoint import load_checkpoint
from mtl_edge.train.evaluate import checkpoint_split, with_head_overrides
from mtl_edge.train.metatest import extract_features, image_loader

BASELINES = ("centroid", "logreg")


def parse_setting(text: str) -> tuple[int, int]:
    """ "20x5" -> (ways 20, shots 5).

    Raises:
        ConfigError: not WAYSxSHOTS with positive integers.
    """
    ways, sep, shots = text.strip().partition("x")
    if not (sep and ways.isdigit() and shots.isdigit() and int(ways) > 1 and int(shots) > 0):
        raise ConfigError(f"--settings {text!r}: write WAYSxSHOTS, e.g. 20x5")
    return int(ways), int(shots)


def recipe_name(steps: int, lr: float) -> str:
    """The report's name of the MTL head with `steps` steps at `lr`, e.g. "mtl T=100 lr=0.2"."""
    return f"mtl T={steps} lr={lr:g}"


def sweep(
    checkpoint: Path,
    split: str,
    settings: Sequence[tuple[int, int]],
    steps: Sequence[int],
    lrs: Sequence[float],
    episodes: int = 600,
    queries: int = 15,
    seed: int = 0,
    head: Sequence[str] = (),
    data: str | None = None,
) -> dict[str, Any]:
    """Every (steps, lr) MTL head and the baselines on the same episodes of each setting.

    Returns:
        JSON-able: {"checkpoint", "split", "fingerprint", "episodes", "queries", "seed",
        "base_head" (the deploy head the sweep changes), "settings": [{"ways", "shots",
        "heads": [{"name", "steps", "lr", "mean", "ci95", "minus_centroid",
        "minus_centroid_ci95"}]}]}; accuracies in percent (4 decimals), steps/lr null for the
        baselines.
    """
    loaded = with_head_overrides(load_checkpoint(checkpoint), head)
    eval_split = checkpoint_split(loaded, split, data)
    features = extract_features(
        loaded.backbone, image_loader(eval_split, loaded.preprocess), len(eval_split), name=split
    )
    grid = {(t, lr): with_head_overrides(loaded, [f"steps={t}", f"lr={lr}"]).head
            for t in steps for lr in lrs}  # fmt: skip
    factories: dict[str, HeadFactory] = {name: feature_head(name) for name in BASELINES}
    settings_of = {recipe_name(t, lr): (t, lr) for t, lr in grid}
    for (t, lr), recipe in grid.items():
        factories[recipe_name(t, lr)] = feature_head("mtl", recipe, loaded.meta_init)
    rows = []
    for ways, shots in settings:
        sampler = EpisodeSampler.for_split(eval_split, ways, shots, queries, seed)
        results = evaluate_episodes(
            features, eval_split.labels, sampler.episodes(episodes), factories,
            f"{ways}-way {shots}-shot",
        )  # fmt: skip
        heads = []
        for name, r in results.items():
            diff, half = r.minus(results["centroid"])
            t_lr = settings_of.get(name, (None, None))
            numbers = {"mean": r.mean, "ci95": r.ci95, "minus_centroid": diff,
                       "minus_centroid_ci95": half}  # fmt: skip
            heads.append({"name": name, "steps": t_lr[0], "lr": t_lr[1]}
                         | {k: round(v, 4) for k, v in numbers.items()})  # fmt: skip
        rows.append({"ways": ways, "shots": shots, "heads": heads})
    return {
        "checkpoint": str(checkpoint),
        "split": eval_split.name,
        "fingerprint": eval_split.fingerprint(),
        "episodes": episodes,
        "queries": queries,
        "seed": seed,
        "base_head": loaded.head.to_dict(),
        "settings": rows,
    }


def plot_sweep(report: dict[str, Any], path: Path) -> Path:
    """One panel per setting: MTL minus centroid (points, 95 % interval) against T x lr (log
    axis; T = 0 drawn at the left edge), one line per lr; logistic regression dashed."""
    plt = _pyplot()
    settings = report["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        sweep_heads = [h for h in s["heads"] if h["steps"] is not None]
        floor = min((h["steps"] * h["lr"] for h in sweep_heads if h["steps"]), default=1.0) / 4
        for lr in sorted({h["lr"] for h in sweep_heads}):
            line = sorted((h for h in sweep_heads if h["lr"] == lr), key=lambda h: h["steps"])
            x = [max(h["steps"] * lr, floor) for h in line]
            ax.errorbar(
                x, [h["minus_centroid"] for h in line],
                yerr=[h["minus_centroid_ci95"] for h in line], marker="o", capsize=2,
                label=f"lr {lr:g}",
            )  # fmt: skip
        logreg = next(h for h in s["heads"] if h["name"] == "logreg")
        ax.axhline(logreg["minus_centroid"], color="grey", ls="--", label="logreg")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{s['ways']}-way {s['shots']}-shot")
        ax.set_xlabel("T x lr (T = 0 at the left edge)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("accuracy minus centroid (points)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"FC head test-time steps, {report['split']}, {report['episodes']} episodes")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def format_sweep(report: dict[str, Any]) -> str:
    """The report as text: one line per setting and head."""
    lines = []
    for s in report["settings"]:
        lines.append(f"{s['ways']}-way {s['shots']}-shot ({report['episodes']} episodes)")
        for h in s["heads"]:
            lines.append(
                f"  {h['name']:<22} {h['mean']:6.2f} +- {h['ci95']:.2f}   vs centroid "
                f"{h['minus_centroid']:+.2f} +- {h['minus_centroid_ci95']:.2f}"
            )
    return "\n".join(lines)


def _numbers(text: str, kind: type, option: str) -> list[Any]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: need comma-separated numbers") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--split", default="val", help="Split spec (validation classes).")
    parser.add_argument("--data", default=None, help="Dataset root (else the checkpoint's).")
    parser.add_argument("--settings", default="20x5,20x1,5x5,5x1", help="WAYSxSHOTS list.")
    parser.add_argument("--steps", default="0,10,25,50,100,200,400")
    parser.add_argument("--lr", default="0.5,2")
    parser.add_argument("--head", action="append", default=[], help="KEY=VALUE (repeatable).")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default).")
    parser.add_argument("--out", type=Path, required=True, help="Folder for the JSON and PNG.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = sweep(
            args.checkpoint, args.split, [parse_setting(s) for s in args.settings.split(",")],
            _numbers(args.steps, int, "--steps"), _numbers(args.lr, float, "--lr"),
            args.episodes, args.queries, args.seed, args.head, args.data,
        )  # fmt: skip
    except MtlEdgeError as e:  # a user's mistake: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "head-sweep.json", report)
    plot_sweep(report, args.out / "head-sweep.png")
    print(format_sweep(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
