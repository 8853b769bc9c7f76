"""`mtl-edge train pipeline`: the resumable pipeline (see `mtl_edge.train.pipeline`).

`register(train_app)` adds the command to the `train` command group.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from mtl_edge.errors import ConfigError


def _summary(record: dict) -> list[str]:
    from mtl_edge.train.pipeline import STAGES

    lines = []
    stages = record.get("stages", {})
    for name in [s for s in STAGES if s in stages]:
        e = stages[name]
        ips = e.get("images_per_s")
        extra = f", {ips:.1f} images/s" if ips else ""
        lines.append(f"{name}: {e.get('status')} in {e.get('wall_s', 0):.1f} s{extra}")
    return lines


def register(train_app: typer.Typer) -> None:
    """Add `pipeline` to the `train` command group."""

    @train_app.command(
        name="pipeline",
        help="Run pretrain -> meta -> metatest -> export -> bench in RUN, each stage resumable; "
        "timings in RUN/stages.json, tables and curves in RUN/report/.",
    )
    def pipeline(
        recipe: Path = typer.Option(..., "--recipe", help="Pipeline recipe TOML."),
        out: Path = typer.Option(..., "--out", help="Run folder RUN (created)."),
        overrides: list[str] = typer.Option(
            [], "--set", help="Override a recipe value: KEY=VALUE, e.g. pretrain.epochs=2."
        ),
        stages: str | None = typer.Option(
            None, "--stages", help="Comma list of stages to run (default: all five)."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Skip finished stages, continue unfinished ones."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print stages.json as JSON."),
    ) -> None:
        from mtl_edge.train.pipeline import load_recipe, parse_stages, run_pipeline

        names = parse_stages(stages)
        record = run_pipeline(load_recipe(recipe, overrides), out, names, resume)
        if as_json:
            typer.echo(json.dumps(record, indent=2))
            return
        for line in _summary(record):
            typer.echo(line)
        typer.echo(f"report: {out / 'report'}")

    @train_app.command(
        name="loader-check",
        help="Training images/s through the device-resident loader vs a synthetic fixed batch "
        "(same model, same steps); issue 9 wants a ratio of at least 0.9.",
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
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        from mtl_edge.atomicio import atomic_write_json
        from mtl_edge.data.registry import open_split
        from mtl_edge.preprocess import Preprocess
        from mtl_edge.train.backbones import create_backbone
        from mtl_edge.train.gpu_data import DeviceDataset
        from mtl_edge.train.pipeline import compare_input_throughput, parse_value

        opts = {}
        for item in options:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"-o {item!r}: write KEY=VALUE, e.g. -o per_class=60")
            opts[key] = parse_value(value)
        data_split = open_split(kind, root, split, **opts)
        cfg = (
            Preprocess(size=size, color_mode=data_split.color_mode)
            if (data_split.color_mode == "RGB")
            else Preprocess(size=size, color_mode="L", mean=(0.5,), std=(0.5,))
        )
        data = DeviceDataset.from_split(data_split, cfg, device, channels_last=channels_last)
        in_channels = cfg.channels
        result = compare_input_throughput(
            lambda: create_backbone(backbone, in_channels=in_channels), data, steps, batch_size
        )
        result.update(backbone=backbone, size=size, split=data_split.name, images=len(data))
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


def main() -> None:
    """`python -m mtl_edge.train.pipeline_cli pipeline ...`: the command without the `mtl-edge`
    group wiring (the GPU script uses it), with the CLI's one-line errors."""
    import sys

    from mtl_edge.errors import MtlEdgeError

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)

    @app.callback()
    def _root() -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        app(prog_name="pipeline_cli")
    except MtlEdgeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
