"""`mtl-edge train`: pre-train, meta-train (SS + HT) and evaluate few-shot backbones.

    mtl-edge train pretrain --recipe R --out RUN [--set key=value ...] [--resume]
    mtl-edge train meta     --recipe R --out RUN [--set meta.pretrained=RUN0/best.pt] [--resume]
    mtl-edge train evaluate --checkpoint C --ways 5 --shots 1,5 [--episodes N]
                            [--heads mtl,centroid,logreg,finetune] [--data ROOT --dataset KIND]
                            [--split test] [--grid] [--json]

The joint-method (`train joint`) and pipeline (`train pipeline`) commands register themselves
into the same group when their modules are installed.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import typer

from mtl_edge.errors import ConfigError


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


def evaluate_checkpoint(
    checkpoint: str | Path,
    ways: int,
    shots: list[int],
    episodes: int,
    heads: list[str],
    queries: int = 15,
    seed: int = 0,
    data: str | None = None,
    dataset: str | None = None,
    split: str = "test",
    device: str = "auto",
) -> dict[str, Any]:
    """Meta-test a checkpoint on a split (the checkpoint's own dataset unless `dataset`)."""
    from mtl_edge.train.checkpoint import load_checkpoint
    from mtl_edge.train.config import DataConfig, from_dict
    from mtl_edge.train.metatest import meta_test
    from mtl_edge.train.torchdata import open_recipe_split, parse_device

    loaded = load_checkpoint(checkpoint)
    if dataset is not None:
        data_cfg = DataConfig(kind=dataset, root=data or "")
    else:
        table = dict((loaded.raw.get("config") or {}).get("data") or {})
        if loaded.raw.get("stage") == "joint":  # a joint recipe's [data] has keys of its own
            table = {k: v for k, v in table.items() if k in ("kind", "root", "options")}
            table["default_subdir"] = "miniimagenet"  # where joint recipes look when root is ""
        data_cfg = from_dict(DataConfig, table, f"{checkpoint} config")
        if data:
            data_cfg.root = data
    eval_split = open_recipe_split(data_cfg, split, loaded.preprocess.color_mode)
    dev = parse_device(device, "--device")
    return meta_test(
        loaded.model.to(dev),
        eval_split,
        loaded.preprocess,
        ways=ways,
        shots_list=shots,
        episodes=episodes,
        queries=queries,
        seed=seed,
        heads=heads,
        device=dev,
    )


def register(app: typer.Typer, name: str) -> None:
    train_app = typer.Typer(
        help="Pre-train, meta-train and evaluate backbones (needs torch).", no_args_is_help=True
    )
    app.add_typer(train_app, name=name)

    @train_app.command("pretrain")
    def pretrain_cmd(
        recipe: str = typer.Option(..., "--recipe", help="Recipe TOML path or packaged name."),
        out: Path = typer.Option(..., "--out", help="Run folder (created)."),
        overrides: list[str] = typer.Option(
            [], "--set", help="Override a recipe value: KEY=VALUE, e.g. pretrain.epochs=2."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue from RUN/last.pt."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Phase 1: train the backbone as a classifier over the base classes."""
        from mtl_edge.train.config import TrainConfig, load_config

        cfg = load_config(TrainConfig, recipe, overrides)  # errors before torch is imported
        from mtl_edge.train.pretrain import pretrain

        result = pretrain(cfg, out, resume=resume, source=str(recipe))
        _print(result, as_json)

    @train_app.command("meta")
    def meta_cmd(
        recipe: str = typer.Option(..., "--recipe", help="Recipe TOML path or packaged name."),
        out: Path = typer.Option(..., "--out", help="Run folder (created)."),
        overrides: list[str] = typer.Option(
            [], "--set", help="Override a recipe value, e.g. meta.pretrained=RUN0/best.pt."
        ),
        pretrained: str | None = typer.Option(
            None, "--pretrained", help="Pre-training checkpoint (else meta.pretrained)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue from RUN/last.pt."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Phase 2: meta-transfer (SS + FC init, hard tasks) from a pre-training checkpoint."""
        from mtl_edge.train.config import TrainConfig, load_config

        cfg = load_config(TrainConfig, recipe, overrides)
        from mtl_edge.train.meta_train import meta_train

        result = meta_train(cfg, out, init=pretrained, resume=resume, source=str(recipe))
        _print(result, as_json)

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
        split: str = typer.Option("test", "--split", help="Split to draw episodes from."),
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
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Meta-test a checkpoint: mean +- 95% interval per head and shot count."""
        ways_list = _ints(ways or ("5,20,35" if grid else "5"), "--ways")
        shots_list = _ints(shots or ("1,5,100" if grid else "1,5"), "--shots")
        if grid:
            try:
                grid_mod = importlib.import_module("mtl_edge.train.grid")
            except ModuleNotFoundError:
                raise ConfigError(
                    "--grid needs mtl_edge.train.grid, which is not installed"
                ) from None
            grid_mod.evaluate_grid_cli(
                checkpoint if len(checkpoint) > 1 else checkpoint[0],
                data,
                dataset or "folders",
                split,
                ways_list,
                shots_list,
                episodes,
                seed,
                as_json,
                out=out,
                queries=queries,
                adapt=adapt,
                device=device,
            )
            return
        if len(checkpoint) != 1 or len(ways_list) != 1:
            raise ConfigError("--checkpoint and --ways take one value each without --grid")
        result = evaluate_checkpoint(
            checkpoint[0],
            ways_list[0],
            shots_list,
            episodes,
            [h.strip() for h in heads.split(",") if h.strip()],
            queries,
            seed,
            data,
            dataset,
            split,
            device,
        )
        typer.echo(json.dumps(result, indent=2) if as_json else format_results(result))

    for module in ("mtl_edge.train.joint_cli", "mtl_edge.train.pipeline_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(train_app)


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    best = result.get("best_val")
    typer.echo(f"best checkpoint: {result['checkpoint']}")
    typer.echo(f"last checkpoint: {result['last']}")
    if best is not None:
        typer.echo(f"best validation accuracy: {best:.2f} %")
    for label, path in (result.get("checkpoints") or {}).items():
        typer.echo(f"{label} checkpoint: {path}")
