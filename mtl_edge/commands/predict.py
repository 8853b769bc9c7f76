"""`mtl-edge predict`: classify images with a bundle and a gallery."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mtl_edge.commands.enroll import (
    BACKEND_OPT,
    BATCH_SIZE_OPT,
    BUNDLE_OPT,
    JSON_OPT,
    PRECISION_OPT,
    SIGNATURE_OPT,
    THREADS_OPT,
    open_enroller,
)


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
        bundle: Path | None = BUNDLE_OPT,
        gallery: Path = typer.Option(
            ..., "--gallery", "-g", envvar="MTL_EDGE_GALLERY", help="Gallery file."
        ),
        top_k: int = typer.Option(1, "--top-k", "-k", help="Show the k best classes."),
        threshold: float = typer.Option(
            None, "--threshold", help="Override the gallery's rejection threshold (0 disables)."
        ),
        backend: str = BACKEND_OPT,
        precision: str = PRECISION_OPT,
        threads: int = THREADS_OPT,
        batch_size: int = BATCH_SIZE_OPT,
        require_signature: Path = SIGNATURE_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.errors import ConfigError

        if top_k < 1:
            raise ConfigError(f"--top-k {top_k}: must be at least 1")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--threshold {threshold}: use a probability in [0, 1]")
        with open_enroller(
            "classifying", bundle, gallery, backend, precision, threads, batch_size,
            require_signature,
        ) as enroller:  # fmt: skip
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
