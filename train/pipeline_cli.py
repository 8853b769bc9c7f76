"""`mtl-edge train pipeline`: the resumable pipeline (see `mtl_edge.train.pipeline`).

`register(train_app)` adds the command to the `train` command group.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer


def _summary(record: dict) -> list[str]:
    lines = []
    for name, e in record.get("stages", {}).items():
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
