"""`mtl-edge enroll`: enroll classes into a gallery from image files or a folder of classes."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mtl_edge.errors import ConfigError

if TYPE_CHECKING:
    from mtl_edge.enroller import Enroller

BACKEND_HELP = "auto | onnxruntime | onnxruntime-cpu | onnxruntime-cuda | tensorrt."
PRECISION_HELP = "fp32 | fp16 | int8 | int8-cpu (int8 on the CPU runs the int8-cpu variant)."
# The options `enroll` and `predict` share.
BUNDLE_OPT = typer.Option(
    None,
    "--bundle",
    "-b",
    envvar="MTL_EDGE_BUNDLE",
    help="Model bundle folder (default: the built-in mini-cpu bundle).",
)
BACKEND_OPT = typer.Option("auto", "--backend", help=BACKEND_HELP)
PRECISION_OPT = typer.Option("fp32", "--precision", help=PRECISION_HELP)
THREADS_OPT = typer.Option(None, "--threads", help="onnxruntime intra-op threads.")
BATCH_SIZE_OPT = typer.Option(32, "--batch-size", help="Images per backbone run.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of text.")
SIGNATURE_OPT = typer.Option(
    None,
    "--require-signature",
    envvar="MTL_EDGE_TRUSTED_KEY",
    metavar="PUBLIC_KEY",
    help="Refuse a bundle that is not signed by this Ed25519 public key (PEM or ssh-ed25519).",
)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal; yields the (done, total) callback,
    or None when progress is off."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def open_enroller(
    description: str,
    bundle: Path | None,
    gallery: Path,
    backend: str,
    precision: str,
    threads: int | None,
    batch_size: int,
    trusted_key: Path | None = None,
    **options: Any,
) -> Iterator[Enroller]:
    """An `Enroller` whose feature extraction in the block drives `progress_bar(description)`.

    The arguments are `Enroller`'s (`bundle` None: the built-in bundle; `trusted_key`:
    --require-signature); `options` are its other keywords (e.g. `feature_dtype`).
    """
    from mtl_edge.bundles import resolve_bundle
    from mtl_edge.enroller import Enroller

    with progress_bar(description) as progress:
        yield Enroller(
            resolve_bundle(bundle),
            gallery,
            backend=backend,
            precision=precision,
            threads=threads,
            batch_size=batch_size,
            progress=progress,
            trusted_key=trusted_key,
            **options,
        )


def register(app: typer.Typer, name: str) -> None:
    @app.command(
        name=name,
        help=(
            "Enroll classes into a gallery: `--class NAME IMAGE...` for one class, or "
            "`--from-folder DIR` for one class per sub-folder. The head is refitted on every "
            "stored feature; old images are not re-read."
        ),
    )
    def enroll(
        images: list[Path] = typer.Argument(None, help="Images of the --class (explicit files)."),
        bundle: Path = BUNDLE_OPT,
        gallery: Path = typer.Option(
            ..., "--gallery", "-g", envvar="MTL_EDGE_GALLERY", help="Gallery file (created)."
        ),
        class_name: str = typer.Option(None, "--class", "-c", help="Name of the class to enroll."),
        from_folder: Path = typer.Option(
            None, "--from-folder", help="Folder with one sub-folder of images per class."
        ),
        append: bool = typer.Option(
            False, "--append", help="Add the images to classes that are already enrolled."
        ),
        backend: str = BACKEND_OPT,
        precision: str = PRECISION_OPT,
        threads: int = THREADS_OPT,
        batch_size: int = BATCH_SIZE_OPT,
        feature_dtype: str = typer.Option(
            "float16", "--feature-dtype", help="How a new gallery stores features: float16|float32."
        ),
        require_signature: Path = SIGNATURE_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        if (class_name is None) == (from_folder is None):
            raise ConfigError("enroll: give either --class NAME IMAGE... or --from-folder DIR")
        if class_name is not None and not images:
            raise ConfigError(f"enroll --class {class_name}: list the image files after it")
        if from_folder is not None and images:
            raise ConfigError("enroll --from-folder: takes no image arguments (use --class)")
        with open_enroller(
            "extracting features",
            bundle,
            gallery,
            backend,
            precision,
            threads,
            batch_size,
            require_signature,
            feature_dtype=feature_dtype,
        ) as enroller:
            if class_name is not None:
                counts = {class_name: enroller.enroll_class(class_name, images, append=append)}
            else:
                counts = enroller.enroll_folder(from_folder, append=append)
        info = enroller.info()
        extractor = enroller.extractor
        result = {
            "gallery": str(gallery),
            "enrolled": counts,
            "classes": len(info["classes"]),
            "examples": info["examples"],
            "threshold": info["threshold"],
            "threshold_mode": info["threshold_mode"],
            "backend": extractor.name,
            "provider": extractor.provider,
            "precision": extractor.precision,
        }
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        for cls, n in counts.items():
            typer.echo(f"enrolled {cls!r}: {n} images")
        typer.echo(
            f"{gallery}: {result['classes']} classes, {result['examples']} images, rejection "
            f"threshold {result['threshold']:.3f} ({result['threshold_mode']}); "
            f"features by {extractor.name} on {extractor.provider} ({extractor.precision})"
        )
