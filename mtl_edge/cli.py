"""The `mtl-edge` command line.

Each command group lives in `mtl_edge.commands.<module>` and exposes `register(app, name)`.
Only the module of the group being run is imported, so `mtl-edge predict` on a device never
imports torch, and `mtl-edge --help` imports nothing heavy.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import typer

from mtl_edge.errors import MtlEdgeError, UnavailableError


def _train() -> ModuleType:
    from mtl_edge.commands import train

    return train


def _export() -> ModuleType:
    from mtl_edge.commands import export

    return export


def _enroll() -> ModuleType:
    from mtl_edge.commands import enroll

    return enroll


def _predict() -> ModuleType:
    from mtl_edge.commands import predict

    return predict


def _gallery() -> ModuleType:
    from mtl_edge.commands import gallery

    return gallery


def _serve() -> ModuleType:
    from mtl_edge.commands import serve

    return serve


def _bench() -> ModuleType:
    from mtl_edge.commands import bench

    return bench


def _data() -> ModuleType:
    from mtl_edge.commands import data

    return data


def _demo() -> ModuleType:
    from mtl_edge.commands import demo

    return demo


def _info() -> ModuleType:
    from mtl_edge.commands import info

    return info


#: group name -> (loader of its `mtl_edge.commands` module, one-line help). Each loader imports
#: its module only when called, so only the requested group is imported.
GROUPS: dict[str, tuple[Callable[[], ModuleType], str]] = {
    "train": (_train, "Pre-train, meta-train and evaluate backbones (needs torch)."),
    "export": (_export, "Fold SS and BatchNorm, export ONNX / TensorRT, write a model bundle."),
    "enroll": (_enroll, "Enroll new classes from a few images into a gallery."),
    "predict": (_predict, "Classify images with a bundle and a gallery."),
    "gallery": (_gallery, "List, rename, remove and inspect enrolled classes."),
    "serve": (_serve, "Serve enroll / predict over HTTP with a web page and metrics."),
    "bench": (_bench, "Latency, accuracy and enrollment benchmarks."),
    "data": (_data, "Verify, describe and pack datasets."),
    "demo": (_demo, "Run the whole pipeline on built-in synthetic data."),
    "info": (_info, "Print versions, CPU flags, GPUs and available backends."),
}


def _requested_group(argv: Sequence[str]) -> str | None:
    """The first positional argument, i.e. the group the user asked for."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def _register_listing(app: typer.Typer, name: str, help_text: str) -> None:
    """List a group that was not requested in --help without importing its module."""

    @app.command(
        name=name,
        help=help_text,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )
    def _listed() -> None:  # never run: the requested group is the real one
        raise typer.Exit(2)


#: Third-party modules a command group may need, and the extra that installs them.
EXTRAS = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "scipy": "train",
    "matplotlib": "train",
    "onnxruntime": "cpu",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "prometheus_client": "serve",
}


def missing_dependency(command: str, error: ModuleNotFoundError) -> UnavailableError | None:
    """The one-line error for a third-party module `command` needs and lacks (None when the
    missing module is part of mtl-edge itself: that is a bug, not an install problem)."""
    missing = (error.name or "").split(".")[0]
    if not missing or missing == "mtl_edge":
        return None
    extra = EXTRAS.get(missing)
    fix = f"pip install 'mtl-edge[{extra}]'" if extra else f"pip install {missing}"
    return UnavailableError(
        f"`mtl-edge {command}` needs {missing}, which is not installed here; {fix}"
    )


def _load_group(name: str, load: Callable[[], ModuleType]) -> ModuleType:
    """The group's module; a missing third-party dependency is one line with exit code 2."""
    try:
        return load()
    except ModuleNotFoundError as e:
        error = missing_dependency(name, e)
        if error is None:
            raise
        raise error from None


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
    for name, (load, help_text) in GROUPS.items():
        if name != wanted:
            _register_listing(app, name, help_text)
            continue
        _load_group(name, load).register(app, name)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            build_app(args)(args=args, prog_name="mtl-edge", standalone_mode=True)
        except ModuleNotFoundError as e:  # a dependency imported when the command runs
            error = missing_dependency(_requested_group(args) or "", e)
            if error is None:
                raise
            raise error from None
    except MtlEdgeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
