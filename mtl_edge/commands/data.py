"""`mtl-edge data`: verify a dataset, describe its episodes, pack it into tar shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer

from mtl_edge import settings
from mtl_edge.errors import DatasetError

#: Layouts `--kind auto` recognises, in the order they are tried.
AUTO_HELP = (
    "Dataset layout: auto, folders, csv, omniglot, fc100, cifar-fs, tiered, tiered-pickle, "
    "shards or synthetic (ROOT is then ignored)."
)


def detect_kind(root: Path, split: str) -> str:
    """Guess the `open_split` kind of `root` for `split`."""
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; pass the dataset folder")
    if (root / split / "index.json").is_file() or (root / "index.json").is_file():
        return "shards"
    if (root / "images_background").is_dir() or root.name.startswith("images_"):
        return "omniglot"
    if (root / split).is_dir():
        return "folders"
    if (root / "cifar-100-python").is_dir() or (root / "meta").is_file():
        raise DatasetError(f"{root}: CIFAR-100 pickles; pass --kind fc100 or --kind cifar-fs")
    if (root / f"{split}_images_png.pkl").is_file():
        return "tiered-pickle"
    if (root / "splits" / f"{split}.csv").is_file() or (root / f"{split}.csv").is_file():
        return "csv"
    raise DatasetError(
        f"{root}: cannot tell the layout for split {split!r}; pass --kind (see --help)"
    )


def resolve_kind(kind: str, root: Path, split: str) -> str:
    """`kind`, with "auto" replaced by the detected layout ("synthetic" for ROOT `synthetic`)."""
    if kind != "auto":
        return kind
    return "synthetic" if str(root) == "synthetic" else detect_kind(root, split)


def open_dataset(kind: str, root: Path, split: str, **options: Any) -> Any:
    """`open_split` with `kind="auto"` resolved; imported lazily (no torch either way)."""
    from mtl_edge.data.registry import open_split

    return open_split(resolve_kind(kind, root, split), root, split, **options)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """`--option key=value` pairs, values read as TOML literals (5, true, ["a"], 'x')."""
    return settings.parse_options(items or [], "--option", "val_alphabets=5")


OPTION_HELP = (
    "Reader option key=value (repeatable), e.g. val_alphabets=5, rotations=true, "
    "color_mode=L, on_error=skip."
)


def episode_stats(split: Any, episodes: list[Any]) -> dict[str, Any]:
    """Statistics of an episode list over `split`: classes and images used, and coverage."""
    appearances = np.zeros(split.num_classes, dtype=np.int64)
    images: set[int] = set()
    for e in episodes:
        appearances[e.classes] += 1
        images.update(e.support.tolist())
        images.update(e.query.tolist())
    first = episodes[0]
    used = appearances[appearances > 0]
    return {
        "split": split.name,
        "episodes": len(episodes),
        "ways": first.ways,
        "shots": first.shots,
        "queries": first.queries,
        "images_per_episode": first.ways * (first.shots + first.queries),
        "classes_total": split.num_classes,
        "classes_used": int(len(used)),
        "class_coverage": float(len(used) / split.num_classes),
        "class_appearances": {
            "min": int(appearances.min()),
            "mean": float(appearances.mean()),
            "max": int(appearances.max()),
        },
        "images_total": len(split),
        "distinct_images": len(images),
        "image_coverage": float(len(images) / len(split)),
    }


def register(app: typer.Typer, name: str) -> None:
    group = typer.Typer(help="Verify, describe and pack datasets.", no_args_is_help=True)
    app.add_typer(group, name=name)

    @group.command("verify")
    def verify(
        root: Path = typer.Argument(..., help="Dataset folder (splits, class folders, Omniglot)."),
        as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
        no_hash: bool = typer.Option(False, "--no-hash", help="Skip the SHA256SUMS check."),
        workers: int = typer.Option(0, "--workers", help="Decoding processes (0: all cores)."),
        color_mode: str = typer.Option("RGB", "--color-mode", help="Decode to RGB or L."),
    ) -> None:
        """Count classes and images, check SHA256SUMS, decode every image, report duplicates.

        Exit code 1 when an image is missing or corrupt, a checksum differs or a class is empty.
        """
        from mtl_edge.data.checks import format_report
        from mtl_edge.data.verify import verify_dataset

        report = verify_dataset(
            root, check_hash=not no_hash, workers=workers or None, color_mode=color_mode
        )
        if as_json:
            typer.echo(json.dumps(report.to_dict(), indent=2))
        else:
            typer.echo(format_report(report))
        if not report.ok:
            raise typer.Exit(1)

    @group.command("episodes")
    def episodes(
        root: Path = typer.Argument(..., help="Dataset folder (or 'synthetic')."),
        split: str = typer.Option("test", "--split", help="Split to sample from."),
        ways: int = typer.Option(5, "--ways", help="Classes per episode (N)."),
        shots: int = typer.Option(1, "--shots", help="Support images per class (K)."),
        queries: int = typer.Option(15, "--queries", help="Query images per class (Q)."),
        count: int = typer.Option(100, "--episodes", help="Number of episodes."),
        seed: int = typer.Option(0, "--seed", help="Episode i is a function of (seed, i)."),
        kind: str = typer.Option("auto", "--kind", help=AUTO_HELP),
        option: list[str] = typer.Option(None, "--option", "-o", help=OPTION_HELP),
        out: Path | None = typer.Option(None, "--out", help="Save the episode list as JSON."),
        as_json: bool = typer.Option(False, "--json", help="Print statistics as JSON."),
    ) -> None:
        """Sample a fixed, seeded episode list and print its statistics."""
        from mtl_edge.data.episodes import EpisodeSampler, save_episodes

        if count < 1:
            raise DatasetError(f"--episodes={count}: need at least 1")
        kind = resolve_kind(kind, root, split)
        options = parse_options(option)
        data = open_dataset(kind, root, split, **options)
        sampler = EpisodeSampler.for_split(data, ways, shots, queries, seed)
        eps = sampler.episodes(count)
        stats = episode_stats(data, eps)
        stats["seed"] = seed
        stats["fingerprint"] = data.fingerprint(root if root.is_dir() else None)
        if out is not None:
            meta = {k: stats[k] for k in ("split", "ways", "shots", "queries", "seed")}
            meta.update(
                root=str(root), kind=kind, options=options, fingerprint=stats["fingerprint"]
            )
            save_episodes(out, eps, meta)
            stats["saved"] = str(out)
        if as_json:
            typer.echo(json.dumps(stats, indent=2))
            return
        app_ = stats["class_appearances"]
        lines = [
            f"{stats['split']}: {count} episodes of {ways}-way {shots}-shot {queries}-query "
            f"(seed {seed}), {stats['images_per_episode']} images per episode",
            f"classes: {stats['classes_used']} of {stats['classes_total']} used "
            f"({stats['class_coverage']:.0%}); per class {app_['min']}-{app_['max']} "
            f"episodes (mean {app_['mean']:.1f})",
            f"images: {stats['distinct_images']} of {stats['images_total']} used "
            f"({stats['image_coverage']:.1%})",
        ]
        if out is not None:
            lines.append(f"saved: {out}")
        typer.echo("\n".join(lines))

    @group.command("pack")
    def pack(
        root: Path = typer.Argument(..., help="Dataset folder (or 'synthetic')."),
        split: str = typer.Option("train", "--split", help="Split to pack."),
        out: Path = typer.Option(..., "--out", help="Shard folder to create."),
        max_mib: float = typer.Option(60.0, "--max-mib", help="Size limit of one shard (MiB)."),
        kind: str = typer.Option("auto", "--kind", help=AUTO_HELP),
        force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
        option: list[str] = typer.Option(None, "--option", "-o", help=OPTION_HELP),
        as_json: bool = typer.Option(False, "--json", help="Print the shard index as JSON."),
    ) -> None:
        """Pack a split into tar shards (original image bytes + class) with a sha256 index."""
        from mtl_edge.data.shards import pack_split

        data = open_dataset(kind, root, split, **parse_options(option))
        index = pack_split(data, out, max_mib=max_mib, force=force)
        if as_json:
            typer.echo(json.dumps(index, indent=2))
            return
        sizes = [s["bytes"] for s in index["shards"]]
        typer.echo(
            f"{data.name}: {index['num_samples']} images of {len(index['class_names'])} classes "
            f"in {len(sizes)} shard(s) of at most {max(sizes) / 2**20:.1f} MiB "
            f"({sum(sizes) / 2**20:.1f} MiB in all) -> {out}"
        )
