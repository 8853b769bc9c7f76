"""`mtl-edge gallery`: list, inspect, rename, remove, restore and re-extract enrolled classes."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mtl_edge.commands.enroll import BACKEND_HELP, PRECISION_HELP, SIGNATURE_OPT, progress_bar

GALLERY_ARG = typer.Argument(..., help="Gallery file.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of text.")


def _echo(as_json: bool, data: dict, text: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else text)


def register(app: typer.Typer, name: str) -> None:
    sub = typer.Typer(
        name=name,
        help="List, rename, remove and inspect enrolled classes.",
        no_args_is_help=True,
    )
    app.add_typer(sub, name=name)

    @sub.command("list", help="Enrolled classes and their image counts.")
    def list_(gallery: Path = GALLERY_ARG, as_json: bool = JSON_OPT) -> None:
        from mtl_edge.gallery import Gallery

        classes = Gallery.load(gallery).info()["classes"]
        text = "\n".join(f"{c['name']}\t{c['count']}" for c in classes) or "(no classes)"
        _echo(as_json, {"gallery": str(gallery), "classes": classes}, text)

    @sub.command("info", help="Model, head recipe, threshold and classes of a gallery.")
    def info(gallery: Path = GALLERY_ARG, as_json: bool = JSON_OPT) -> None:
        from mtl_edge.gallery import Gallery, prev_path

        data = {"gallery": str(gallery), **Gallery.load(gallery).info()}
        data["previous_copy"] = str(prev_path(gallery)) if prev_path(gallery).exists() else None
        recipe = data["recipe"]
        text = "\n".join(
            [
                f"gallery: {gallery} (generation {data['generation']}, created {data['created']})",
                f"model: {data['backbone']} {data['model_id'][:16]}, variant "
                f"{data['variant'] or 'not recorded'} ({data['feature_dim']}-d features stored "
                f"as {data['feature_dtype']})",
                f"head: {recipe['steps']} steps at lr {recipe['lr']}, init {recipe['init']} "
                f"(used: {data['head_init']}), normalize {recipe['normalize']}",
                f"threshold: {data['threshold']:.3f} ({data['threshold_mode']}, rejection "
                f"{data['rejection']}) "
                f"{json.dumps(data['calibration'])}",
                f"classes: {len(data['classes'])}, images: {data['examples']}",
                f"previous copy: {data['previous_copy'] or 'none'}",
            ]
        )
        _echo(as_json, data, text)

    @sub.command("remove", help="Remove a class (the head is refitted).")
    def remove(
        gallery: Path = GALLERY_ARG,
        class_name: str = typer.Argument(..., help="Class to remove."),
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.gallery import edit_gallery

        with edit_gallery(gallery) as g:
            g.remove_class(class_name)
        _echo(as_json, {"removed": class_name, "classes": len(g)}, f"removed {class_name!r}")

    @sub.command("rename", help="Rename a class.")
    def rename(
        gallery: Path = GALLERY_ARG,
        old: str = typer.Argument(..., help="Current name."),
        new: str = typer.Argument(..., help="New name."),
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.gallery import edit_gallery

        with edit_gallery(gallery) as g:
            g.rename_class(old, new)
        _echo(as_json, {"renamed": old, "to": new}, f"renamed {old!r} to {new!r}")

    @sub.command("threshold", help="Set the rejection threshold (0..1), or 'auto' to calibrate.")
    def threshold(
        gallery: Path = GALLERY_ARG,
        value: str = typer.Argument(..., help="A probability in [0, 1], or 'auto'."),
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.errors import ConfigError
        from mtl_edge.gallery import edit_gallery

        try:
            parsed = None if value == "auto" else float(value)
        except ValueError:
            raise ConfigError(f"threshold {value!r}: use a number in [0, 1] or 'auto'") from None
        with edit_gallery(gallery) as g:
            g.set_threshold(parsed)
        data = {"threshold": g.threshold, "mode": g.threshold_mode}
        _echo(as_json, data, f"threshold {g.threshold:.3f} ({g.threshold_mode})")

    @sub.command(
        "rejection",
        help="Set the open-set rule: cosine (to the class prototypes) or probability; the "
        "threshold goes back to auto.",
    )
    def rejection(
        gallery: Path = GALLERY_ARG,
        rule: str = typer.Argument(..., help="cosine or probability."),
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.gallery import edit_gallery

        with edit_gallery(gallery) as g:
            g.set_rejection(rule)
        data = {"rejection": g.rejection, "threshold": g.threshold, "mode": g.threshold_mode}
        text = f"rejection {g.rejection}, threshold {g.threshold:.3f} ({g.threshold_mode})"
        _echo(as_json, data, text)

    @sub.command(
        "restore",
        help=(
            "Replace a damaged gallery with its previous good copy (the replaced file is kept "
            "under a unique name). A healthy gallery is rolled back only with --force."
        ),
    )
    def restore(
        gallery: Path = GALLERY_ARG,
        force: bool = typer.Option(
            False, "--force", help="Roll back a gallery that is not damaged."
        ),
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.gallery import prev_path, restore_previous

        aside = restore_previous(gallery, force=force)
        text = f"restored {gallery} from {prev_path(gallery)}"
        if aside != gallery:
            text += f"; the replaced file is kept as {aside}"
        _echo(as_json, {"restored": str(gallery), "replaced_file": str(aside)}, text)

    @sub.command(
        "reextract",
        help=(
            "Rebuild a gallery for another bundle or variant from its stored image paths (each "
            "must still be a regular file with the sha256 stored at enrollment)."
        ),
    )
    def reextract(
        gallery: Path = GALLERY_ARG,
        bundle: Path = typer.Option(
            ..., "--bundle", "-b", envvar="MTL_EDGE_BUNDLE", help="The new model bundle."
        ),
        backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
        precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
        threads: int = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
        require_signature: Path = SIGNATURE_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.enroller import Enroller

        with progress_bar("re-extracting") as progress:
            enroller = Enroller(
                bundle,
                gallery,
                backend,
                precision,
                threads,
                progress=progress,
                trusted_key=require_signature,
            )
            count = enroller.reextract()
        data = {
            "gallery": str(gallery),
            "images": count,
            "model_id": enroller.bundle.model_id,
            "variant": enroller.variant,
        }
        _echo(as_json, data, f"re-extracted {count} images with {bundle}")
