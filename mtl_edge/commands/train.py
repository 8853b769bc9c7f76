"""`mtl-edge train`: pre-train, meta-train (SS + HT), the joint method, the pipeline, evaluate.

    mtl-edge train pretrain --recipe R --out RUN [--set key=value ...] [--resume]
                            [--time-budget 60m]
    mtl-edge train meta     --recipe R --out RUN [--pretrained RUN0/best.pt] [--resume]
                            [--time-budget 30m]
    mtl-edge train joint    --recipe R --out RUN [--set joint.beta=0.5 ...]
    mtl-edge train pipeline --recipe R --out RUN [--stages a,b] [--resume]
    mtl-edge train evaluate --checkpoint C [--ways 5 --shots 1,5 --episodes N --heads ...]
                            [--split test] [--head KEY=VALUE] [--grid --adapt KEY=VALUE]
                            [--json]
    mtl-edge train loader-check [--data-kind K --data ROOT -o KEY=VALUE ...]

Every command reads one recipe (`mtl_edge.train.config.load_recipe`) with `--set` overrides;
this module only parses options and calls the layer that does the work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mtl_edge.errors import ConfigError

RECIPE_OPT = typer.Option(..., "--recipe", help="Recipe TOML path or packaged name.")
OUT_OPT = typer.Option(..., "--out", help="Run folder (created).")
SET_OPT = typer.Option(
    [], "--set", help="Override a recipe value: KEY=VALUE, e.g. pretrain.epochs=2 (repeatable)."
)
JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON.")
BUDGET_OPT = typer.Option(
    None,
    "--time-budget",
    help="Wall time of this stage, e.g. 90m or 1h30m: its first steps are timed and the epochs "
    "(pretrain) or meta-batches (meta) set to end inside it; see RUN/budget.json.",
)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: write integers separated by commas, e.g. 1,5"
        ) from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} {text!r}: need positive integers, e.g. 1,5")
    return values


def format_results(result: dict[str, Any]) -> str:
    """meta_test's table as text: one line per shots and head, mean +- 95% interval."""
    lines = [
        f"{result['split']}: {result['ways']}-way, {result['queries']} queries, "
        f"{result['episodes']} episodes, seed {result['seed']}"
    ]
    for shots, table in result["results"].items():
        for head, r in table.items():
            lines.append(
                f"  {shots}-shot {head:<10} {r['mean']:6.2f} +- {r['ci95']:.2f} %"
                f"  ({r['episodes']} episodes)"
            )
    return "\n".join(lines)


def _print_run(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    typer.echo(f"best checkpoint: {result['checkpoint']}")
    typer.echo(f"last checkpoint: {result['last']}")
    if result.get("best_val") is not None:
        typer.echo(f"best validation accuracy: {result['best_val']:.2f} %")
    for label, path in (result.get("checkpoints") or {}).items():
        typer.echo(f"{label} checkpoint: {path}")


def register(app: typer.Typer, name: str) -> None:
    train_app = typer.Typer(
        help="Pre-train, meta-train and evaluate backbones (needs torch).", no_args_is_help=True
    )
    app.add_typer(train_app, name=name)

    @train_app.command("pretrain")
    def pretrain_cmd(
        recipe: str = RECIPE_OPT,
        out: Path = OUT_OPT,
        overrides: list[str] = SET_OPT,
        resume: bool = typer.Option(False, "--resume", help="Continue from RUN/last.pt."),
        time_budget: str | None = BUDGET_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        """Phase 1: train the backbone as a classifier over the base classes."""
        from mtl_edge.train.config import load_recipe, recipe_source
        from mtl_edge.train.pretrain import pretrain

        cfg = load_recipe(recipe, overrides)
        source = recipe_source(recipe, overrides)
        _print_run(pretrain(cfg, out, resume, source, time_budget), as_json)

    @train_app.command("meta")
    def meta_cmd(
        recipe: str = RECIPE_OPT,
        out: Path = OUT_OPT,
        overrides: list[str] = SET_OPT,
        pretrained: str | None = typer.Option(
            None, "--pretrained", help="Pre-training checkpoint (else meta.pretrained)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue from RUN/last.pt."),
        time_budget: str | None = BUDGET_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        """Phase 2: meta-transfer (SS + FC init, hard tasks) from a pre-training checkpoint."""
        from mtl_edge.train.config import load_recipe, recipe_source
        from mtl_edge.train.meta_train import meta_train

        cfg = load_recipe(recipe, overrides)
        source = recipe_source(recipe, overrides)
        _print_run(meta_train(cfg, out, pretrained, resume, source, time_budget), as_json)

    @train_app.command(
        "joint",
        help="Train Reptile/MAML + transfer (Eshratifar et al.) from a recipe into a run folder.",
    )
    def joint_cmd(
        recipe: str = RECIPE_OPT,
        out: Path = OUT_OPT,
        overrides: list[str] = SET_OPT,
        time_limit: float = typer.Option(
            0.0, "--time-limit", help="Stop after SECONDS of training and save (0: none)."
        ),
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.train.config import load_recipe, recipe_source
        from mtl_edge.train.joint_train import train_joint

        cfg = load_recipe(recipe, overrides)
        path = train_joint(cfg, out, recipe_source(recipe, overrides), time_limit)
        if as_json:
            typer.echo(json.dumps({"checkpoint": str(path), "method": cfg.joint.method}))
        else:
            typer.echo(f"{cfg.joint.method}: checkpoint {path}")

    @train_app.command(
        "pipeline",
        help="Run pretrain -> meta -> metatest -> export -> bench in RUN, each stage resumable; "
        "timings in RUN/stages.json, tables and curves in RUN/report/.",
    )
    def pipeline_cmd(
        recipe: str = RECIPE_OPT,
        out: Path = typer.Option(..., "--out", help="Run folder RUN (created)."),
        overrides: list[str] = SET_OPT,
        stages: str | None = typer.Option(
            None, "--stages", help="Comma list of stages to run (default: all five)."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Skip finished stages, continue unfinished ones."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print stages.json as JSON."),
    ) -> None:
        from mtl_edge.train.config import load_recipe, recipe_source
        from mtl_edge.workflows.pipeline import run_pipeline

        cfg = load_recipe(recipe, overrides)
        record = run_pipeline(cfg, recipe_source(recipe, overrides), out, stages, resume)
        if as_json:
            typer.echo(json.dumps(record, indent=2))
            return
        for stage, e in record.get("stages", {}).items():
            ips = e.get("images_per_s")
            extra = f", {ips:.1f} images/s" if ips else ""
            typer.echo(f"{stage}: {e.get('status')} in {e.get('wall_s', 0):.1f} s{extra}")
        typer.echo(f"report: {out / 'report'}")

    @train_app.command("evaluate")
    def evaluate_cmd(
        checkpoint: list[Path] = typer.Option(..., "--checkpoint", help="A training checkpoint."),
        ways: str | None = typer.Option(
            None, "--ways", help="N (default 5; with --grid a comma list, default 5,20,35)."
        ),
        shots: str | None = typer.Option(
            None, "--shots", help="K values, comma separated (default 1,5; --grid: 1,5,100)."
        ),
        episodes: int = typer.Option(600, "--episodes", help="Test episodes per setting."),
        queries: int = typer.Option(15, "--queries", help="Queries per class."),
        heads: str = typer.Option(
            "mtl,centroid,logreg", "--heads", help="Heads: mtl, centroid, logreg, finetune."
        ),
        seed: int = typer.Option(0, "--seed", help="Episode seed."),
        data: str | None = typer.Option(None, "--data", help="Dataset root (else the recipe's)."),
        dataset: str | None = typer.Option(
            None, "--dataset", help="Dataset kind (folders, omniglot, ...; else the recipe's)."
        ),
        split: str = typer.Option("test", "--split", help="Split (spec) to draw episodes from."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:i]."),
        grid: bool = typer.Option(False, "--grid", help="The joint-method evaluation grid."),
        out: Path | None = typer.Option(
            None, "--out", help="--grid: the JSON report (default: beside the first checkpoint)."
        ),
        adapt: list[str] = typer.Option(
            [],
            "--adapt",
            help="--grid: override every model's adaptation, KEY=VALUE (kind, steps, lr, "
            "batch_size, head_init), e.g. --adapt kind=centroid (repeatable).",
        ),
        head: list[str] = typer.Option(
            [],
            "--head",
            help="Override the checkpoint's deploy head (the mtl head), KEY=VALUE (steps, lr, "
            "init, normalize, weight_decay, loss), e.g. --head steps=200 (repeatable).",
        ),
        as_json: bool = JSON_OPT,
    ) -> None:
        """Meta-test a checkpoint: mean +- 95% interval per head and shot count."""
        from mtl_edge.train.evaluate import evaluate_checkpoint
        from mtl_edge.train.grid import format_table, run_grid
        from mtl_edge.train.torchdata import parse_device

        dev = parse_device(device, "--device")
        ways_list = _ints(ways or ("5,20,35" if grid else "5"), "--ways")
        shots_list = _ints(shots or ("1,5,100" if grid else "1,5"), "--shots")
        if grid and head:
            raise ConfigError("--head applies without --grid; with --grid use --adapt")
        if grid:
            report = run_grid(
                checkpoint, dataset or "folders", data, split, ways_list, shots_list,
                episodes, queries, seed, adapt, dev, out,
            )  # fmt: skip
            typer.echo(json.dumps(report, indent=2) if as_json else format_table(report))
            return
        if len(checkpoint) != 1 or len(ways_list) != 1:
            raise ConfigError("--checkpoint and --ways take one value each without --grid")
        names = [h.strip() for h in heads.split(",") if h.strip()]
        protocol = {"ways": ways_list[0], "shots": shots_list, "episodes": episodes}
        protocol |= {"queries": queries, "heads": names, "seed": seed}
        result = evaluate_checkpoint(checkpoint[0], protocol, split, data, dataset, dev, head)
        typer.echo(json.dumps(result, indent=2) if as_json else format_results(result))

    @train_app.command(
        name="loader-check",
        help="Training images/s through the device-resident loader vs a synthetic fixed batch "
        "(same model, same steps); the loader should reach a ratio of at least 0.9.",
    )
    def loader_check(
        kind: str = typer.Option("synthetic", "--data-kind", help="Dataset layout (open_split)."),
        root: Path | None = typer.Option(None, "--data", help="Dataset folder."),
        split: str = typer.Option("train", "--split", help="Split to load."),
        options: list[str] = typer.Option([], "-o", help="Reader option KEY=VALUE."),
        backbone: str = typer.Option("resnet12-wide", "--backbone", help="Backbone name."),
        size: int = typer.Option(84, "--size", help="Network input size."),
        steps: int = typer.Option(30, "--steps", help="Timed training steps per run."),
        batch_size: int = typer.Option(128, "--batch-size", help="Images per step."),
        device: str | None = typer.Option(None, "--device", help="cuda or cpu (default: auto)."),
        channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
        out: Path | None = typer.Option(None, "--out", help="Also write the result JSON here."),
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.atomicio import atomic_write_json
        from mtl_edge.bench.loader_check import run_loader_check
        from mtl_edge.settings import parse_options

        result = run_loader_check(
            kind, root, split, parse_options(options), backbone, size, steps, batch_size,
            device, channels_last,
        )  # fmt: skip
        if out is not None:
            atomic_write_json(out, result)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        typer.echo(
            f"{backbone} at {size}px on {result['device']}: loader "
            f"{result['loader_images_per_s']:.1f} images/s, synthetic "
            f"{result['synthetic_images_per_s']:.1f} images/s, ratio {result['ratio']:.3f}"
        )
