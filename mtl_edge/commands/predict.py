"""`mtl-edge predict`: classify images with a bundle and a gallery."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mtl_edge.commands.enroll import BACKEND_HELP, PRECISION_HELP, progress_bar


def register(app: typer.Typer, name: str) -> None:
    @app.command(
        name=name,
        help=(
            "Classify images: prints the best class and its probability, or 'unknown' when the "
            "top probability is under the gallery's rejection threshold."
        ),
    )
    def predict(
        images: list[Path] = typer.Argument(..., help="Image files to classify."),
        bundle: Path = typer.Option(
            ..., "--bundle", "-b", envvar="MTL_EDGE_BUNDLE", help="Model bundle folder."
        ),
        gallery: Path = typer.Option(
            ..., "--gallery", "-g", envvar="MTL_EDGE_GALLERY", help="Gallery file."
        ),
        top_k: int = typer.Option(1, "--top-k", "-k", help="Show the k best classes."),
        threshold: float = typer.Option(
            None, "--threshold", help="Override the gallery's rejection threshold (0 disables)."
        ),
        backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
        precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
        threads: int = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per backbone run."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ) -> None:
        from mtl_edge.enroller import Enroller
        from mtl_edge.errors import ConfigError

        if top_k < 1:
            raise ConfigError(f"--top-k {top_k}: must be at least 1")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--threshold {threshold}: use a probability in [0, 1]")
        with progress_bar("classifying") as progress:
            enroller = Enroller(
                bundle,
                gallery,
                backend=backend,
                precision=precision,
                threads=threads,
                batch_size=batch_size,
                progress=progress,
            )
            preds = enroller.predict(images, top_k=top_k, threshold=threshold)
        if as_json:
            rows = [
                {"image": str(p), **pred.to_dict()} for p, pred in zip(images, preds, strict=True)
            ]
            typer.echo(json.dumps(rows, indent=2))
            return
        for path, pred in zip(images, preds, strict=True):
            line = f"{path}: {pred.label} ({pred.probability:.3f})"
            if top_k > 1:
                line += "  [" + ", ".join(f"{n} {p:.3f}" for n, p in pred.top_k) + "]"
            typer.echo(line)
