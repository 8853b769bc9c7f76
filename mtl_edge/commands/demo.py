"""`mtl-edge demo`: the whole method on built-in synthetic data (`mtl_edge.workflows.demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer, name: str) -> None:
    @app.command(name=name, help="Run the whole pipeline on built-in synthetic data.")
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="Demo folder (replaced)."),
        quick: bool = typer.Option(False, "--quick", help="Tiny settings (seconds, for tests)."),
        overrides: list[str] = typer.Option(
            [], "--set", help="Override a value of the demo recipe, e.g. pretrain.epochs=5."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    ) -> None:
        from mtl_edge.workflows.demo import run_demo, summary_lines

        result = run_demo(out, quick, overrides=overrides)
        if as_json:
            typer.echo(json.dumps(result, indent=2, default=str))
        else:
            typer.echo("\n".join(summary_lines(result)))
