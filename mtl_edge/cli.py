"""The `mtl-edge` command line.

Each command group lives in `mtl_edge.commands.<module>` and exposes `register(app, name)`.
Only the module of the group being run is imported, so `mtl-edge predict` on a device never
imports torch, and `mtl-edge --help` imports nothing heavy. Groups whose issue has not landed
yet answer "not implemented yet" with exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import typer

from mtl_edge.errors import MtlEdgeError

#: group name -> (module under mtl_edge.commands, one-line help)
GROUPS: dict[str, tuple[str, str]] = {
    "train": ("train", "Pre-train, meta-train and evaluate backbones (needs torch)."),
    "export": ("export", "Fold SS and BatchNorm, export ONNX / TensorRT, write a model bundle."),
    "enroll": ("enroll", "Enroll new classes from a few images into a gallery."),
    "predict": ("predict", "Classify images with a bundle and a gallery."),
    "gallery": ("gallery", "List, rename, remove and inspect enrolled classes."),
    "serve": ("serve", "Serve enroll / predict over HTTP with a web page and metrics."),
    "bench": ("bench", "Latency, accuracy and enrollment benchmarks."),
    "data": ("data", "Verify, describe and pack datasets."),
    "demo": ("demo", "Run the whole pipeline on built-in synthetic data."),
    "info": ("info", "Print versions, CPU flags, GPUs and available backends."),
}


def _requested_group(argv: Sequence[str]) -> str | None:
    """The first positional argument, i.e. the group the user asked for."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def _register_placeholder(app: typer.Typer, name: str, help_text: str) -> None:
    @app.command(
        name=name,
        help=help_text,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )
    def _placeholder() -> None:
        # Only reached for groups whose module is not present yet.
        typer.echo(f"error: `mtl-edge {name}` is not implemented yet", err=True)
        raise typer.Exit(2)


def build_app(argv: Sequence[str]) -> typer.Typer:
    """Build the root app, importing only the module of the requested group."""
    app = typer.Typer(
        name="mtl-edge",
        help="Few-shot recognition for edge devices (Meta-Transfer Learning).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def _root(
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    ) -> None:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )

    wanted = _requested_group(argv)
    for name, (module, help_text) in GROUPS.items():
        if name != wanted:
            _register_placeholder(app, name, help_text)
            continue
        try:
            mod = importlib.import_module(f"mtl_edge.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"mtl_edge.commands.{module}":
                raise
            _register_placeholder(app, name, help_text)
            continue
        mod.register(app, name)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        build_app(args)(args=args, prog_name="mtl-edge", standalone_mode=True)
    except MtlEdgeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
