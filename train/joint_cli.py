"""`mtl-edge train joint`: train a joint transfer + meta-learning recipe into a run folder.

`register(train_app)` is called by the `mtl-edge train` command group.
"""

from __future__ import annotations

import json

import typer


def register(train_app: typer.Typer) -> None:
    """Add the `joint` command to the `mtl-edge train` group."""

    @train_app.command(
        name="joint",
        help="Train Reptile/MAML + transfer (Eshratifar et al.) from a recipe into a run folder.",
    )
    def joint(
        recipe: str = typer.Option(
            ..., "--recipe", help="A TOML file or a recipe name from recipes/ (joint-reptile...)."
        ),
        out: str = typer.Option(..., "--out", help="The run folder to create."),
        overrides: list[str] = typer.Option(  # noqa: B008 - typer's declaration style
            [], "--set", help="Override a recipe key, e.g. --set joint.beta=0.5 (repeatable)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        from mtl_edge.train.joint_train import load_recipe, train_joint

        cfg = load_recipe(recipe, overrides)
        path = train_joint(cfg, out)
        if as_json:
            typer.echo(json.dumps({"checkpoint": str(path), "method": cfg.joint.method}))
        else:
            typer.echo(f"{cfg.joint.method}: checkpoint {path}")
