"""`mtl-edge bench latency|accuracy|enroll|openset|train|serve|compare`: JSON + Markdown.

Heavy imports (torch, onnxruntime, matplotlib) happen inside the commands, so `mtl-edge bench
--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import typer

from mtl_edge.bundles import resolve_bundle
from mtl_edge.commands.enroll import BUNDLE_OPT
from mtl_edge.settings import parse_options

# The options of every report-writing command.
OUT_OPT = typer.Option(None, "--out", help="Report folder.")
JSON_OPT = typer.Option(False, "--json", help="Print the JSON report.")


def _default_out(kind: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "bench" / f"{stamp}-{kind}"


def _config_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = dataclasses.asdict(v)  # type: ignore[arg-type]
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _report(kind: str, cfg: Any, results: Any, out: Path | None, as_json: bool) -> None:
    """Make the `kind` report of `cfg` and `results`, write its JSON, Markdown and plots into
    `out` (default: a new time-stamped folder under runs/bench) and print it."""
    from mtl_edge.bench import report

    doc = report.make_report(kind, _config_dict(cfg), results)
    paths = report.write_outputs(doc, out or _default_out(kind), kind)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(report.to_markdown(doc))
        typer.echo("written: " + ", ".join(str(p) for p in paths))


def _timing(
    min_time: float, min_runs: int, warmup: float, warmup_runs: int, max_runs: int = 100_000
) -> Any:
    from mtl_edge.bench.timing import TimingBudget

    return TimingBudget(
        warmup_s=warmup,
        warmup_runs=warmup_runs,
        min_time_s=min_time,
        min_runs=min_runs,
        max_runs=max(max_runs, min_runs),
    )


def register(app: typer.Typer, name: str) -> None:
    group = typer.Typer(
        name=name, help="Latency, accuracy and enrollment benchmarks.", no_args_is_help=True
    )
    app.add_typer(group, name=name)

    @group.command("latency", help="Latency and throughput per backend, precision and batch.")
    def latency(
        bundle: Path | None = typer.Option(None, "--bundle", help="Model bundle folder."),
        checkpoint: Path | None = typer.Option(
            None, "--checkpoint", help="Checkpoint for the PyTorch eager FP32 reference."
        ),
        backbone: str | None = typer.Option(
            None, "--backbone", help="Registry backbone for --random (e.g. resnet12-wide)."
        ),
        random: bool = typer.Option(
            False, "--random", help="Random weights: build, export and time --backbone."
        ),
        backbone_args: list[str] = typer.Option(
            [], "--backbone-arg", help="Option of --backbone, KEY=VALUE, e.g. width=8 (repeatable)."
        ),
        image_size: int = typer.Option(84, "--image-size", help="Input size for --random."),
        backends: str = typer.Option("torch,onnxruntime", "--backends"),
        precisions: str = typer.Option("fp32,int8-cpu", "--precisions"),
        batch_sizes: str = typer.Option("1,5,25,75,128", "--batch-sizes"),
        threads: int | None = typer.Option(None, "--threads", help="Intra-op threads."),
        min_time: float = typer.Option(3.0, "--min-time", help="Seconds of timing per setting."),
        min_runs: int = typer.Option(100, "--min-runs", help="Timed runs per setting."),
        max_runs: int = typer.Option(
            100_000, "--max-runs", help="Stop a setting here even before --min-time."
        ),
        warmup: float = typer.Option(0.2, "--warmup", help="Warm-up seconds per setting."),
        warmup_runs: int = typer.Option(10, "--warmup-runs"),
        rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds per batch size."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --random weights."),
        calib: Path | None = typer.Option(
            None, "--calib", help="Calibration images for the --random int8 export."
        ),
        no_peak: bool = typer.Option(False, "--no-peak", help="Skip the peak matmul."),
        settings: str = typer.Option(
            "", "--settings", help="backend:precision[:compute+copies],... instead of the matrix."
        ),
        gpu_modes: str = typer.Option("compute", "--gpu-modes", help="compute,copies (GPU)."),
        order: str = typer.Option("batch", "--order", help="batch (round-robin) or setting."),
        deadline: float | None = typer.Option(
            None, "--deadline", help="Seconds after which no new measurement starts."
        ),
        parity_episodes: int = typer.Option(
            0, "--parity-episodes", help="GPU vs CPU features on N episodes (GPU settings)."
        ),
        pipeline_images: int = typer.Option(
            0, "--pipeline-images", help="JPEGs for the decode / GPU overlap check."
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Run the GPU settings' code on the CPU (checks a plan)."
        ),
        out: Path | None = OUT_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.bench import latency as lat

        cfg = lat.LatencyConfig(
            bundle=bundle,
            checkpoint=checkpoint,
            backbone=backbone,
            random=random,
            seed=seed,
            backends=lat.parse_list(backends, "--backends"),
            precisions=lat.parse_list(precisions, "--precisions"),
            batch_sizes=lat.parse_ints(batch_sizes, "--batch-sizes"),
            threads=threads,
            budget=_timing(min_time, min_runs, warmup, warmup_runs, max_runs),
            rounds=rounds,
            calib=calib,
            measure_peak=not no_peak,
            backbone_args=parse_options(backbone_args, "--backbone-arg", "width=8"),
            image_size=image_size,
            settings=lat.parse_list(settings, "--settings") if settings else (),
            gpu_modes=lat.parse_list(gpu_modes, "--gpu-modes"),
            order=order,
            deadline_s=deadline,
            parity_episodes=parity_episodes,
            pipeline_images=pipeline_images,
            dry_run=dry_run,
        )
        lat.settings_of(cfg)  # bad names fail before any work
        out = out or _default_out("latency")
        workdir = out / "random-model" if random else None
        _report("latency", cfg, lat.run_latency(cfg, workdir), out, as_json)

    @group.command("accuracy", help="Few-shot accuracy per backend/precision, paired vs FP32.")
    def accuracy(
        bundle: Path | None = BUNDLE_OPT,
        data: Path = typer.Option(..., "--data", help="Dataset root."),
        dataset: str = typer.Option("folders", "--dataset", help="Layout: folders."),
        split: str = typer.Option("test", "--split", help="Split sub-folder ('' for none)."),
        ways: str = typer.Option("5", "--ways"),
        shots: str = typer.Option("1,5", "--shots"),
        queries: int = typer.Option(15, "--queries"),
        episodes: int = typer.Option(2000, "--episodes"),
        backends: str = typer.Option("onnxruntime", "--backends"),
        precisions: str = typer.Option("fp32,int8-cpu", "--precisions"),
        head: str = typer.Option(
            "mtl", "--head", help="mtl (the bundle's head recipe), centroid or logreg."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the episode list."),
        threads: int | None = typer.Option(None, "--threads"),
        cache: Path | None = typer.Option(None, "--cache", help="Folder for feature .npy."),
        out: Path | None = OUT_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.bench import accuracy as acc
        from mtl_edge.bench.latency import parse_ints, parse_list

        cfg = acc.AccuracyConfig(
            bundle=resolve_bundle(bundle),
            data=data,
            dataset=dataset,
            split=split or None,
            ways=parse_ints(ways, "--ways"),
            shots=parse_ints(shots, "--shots"),
            queries=queries,
            episodes=episodes,
            backends=parse_list(backends, "--backends"),
            precisions=parse_list(precisions, "--precisions"),
            head=head,
            seed=seed,
            threads=threads,
            cache=cache,
        )
        _report("accuracy", cfg, acc.run_accuracy(cfg), out, as_json)

    @group.command("enroll", help="Enrollment stage times and one-image predict latency.")
    def enroll(
        bundle: Path | None = BUNDLE_OPT,
        images: Path = typer.Option(..., "--images", help="Folder of class folders."),
        classes: int = typer.Option(5, "--classes"),
        shots: int = typer.Option(5, "--shots"),
        backend: str = typer.Option("auto", "--backend"),
        precision: str = typer.Option("fp32", "--precision"),
        threads: int | None = typer.Option(None, "--threads"),
        min_time: float = typer.Option(1.0, "--min-time", help="Seconds timing predict."),
        min_runs: int = typer.Option(20, "--min-runs"),
        out: Path | None = OUT_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.bench import enroll_bench

        cfg = enroll_bench.EnrollConfig(
            bundle=resolve_bundle(bundle),
            images=images,
            classes=classes,
            shots=shots,
            backend=backend,
            precision=precision,
            threads=threads,
            budget=_timing(min_time, min_runs, 0.1, 3),
        )
        _report("enroll", cfg, enroll_bench.run_enroll(cfg), out, as_json)

    @group.command("openset", help="Open-set rejection: AUROC, known accepted, unknown rejected.")
    def openset(
        bundle: Path | None = BUNDLE_OPT,
        data: Path | None = typer.Option(
            None, "--data", help="Class folders (default: <data root>/miniimagenet)."
        ),
        split: str = typer.Option("test", "--split", help="Split sub-folder ('' for none)."),
        episodes: int = typer.Option(200, "--episodes"),
        seed: int = typer.Option(0, "--seed", help="Seed of the episode list."),
        enrolled: int = typer.Option(5, "--enrolled", help="Classes enrolled per episode."),
        unknown: int = typer.Option(5, "--unknown", help="Unenrolled classes per episode."),
        shots: int = typer.Option(5, "--shots", help="Photos enrolled per class."),
        queries: int = typer.Option(15, "--queries", help="Query photos per class."),
        backend: str = typer.Option("onnxruntime", "--backend"),
        precisions: str = typer.Option("fp32", "--precisions", help="fp32, int8-cpu or both."),
        threads: int | None = typer.Option(None, "--threads"),
        cache: Path | None = typer.Option(None, "--cache", help="Folder for feature .npy."),
        out: Path | None = OUT_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.bench import openset as ops
        from mtl_edge.bench.latency import parse_list
        from mtl_edge.commands.enroll import progress_bar
        from mtl_edge.data.registry import data_root

        cfg = ops.OpenSetConfig(
            bundle=resolve_bundle(bundle), data=data or data_root() / "miniimagenet",
            split=split or None,
            episodes=episodes, seed=seed, enrolled=enrolled, unknown=unknown, shots=shots,
            queries=queries, backend=backend, precisions=parse_list(precisions, "--precisions"),
            threads=threads, cache=cache,
        )  # fmt: skip
        with progress_bar("extracting features") as progress:
            results = ops.run_openset(cfg, progress)
        _report("openset", cfg, results, out, as_json)

    @group.command("serve", help="Loopback load on `mtl-edge serve`, batching off and on.")
    def serve(
        bundle: Path | None = BUNDLE_OPT,
        images: Path | None = typer.Option(None, "--images", help="Class folders of photos."),
        backend: str = typer.Option("onnxruntime-cpu", "--backend"),
        precision: str = typer.Option("int8", "--precision"),
        threads: int | None = typer.Option(None, "--threads"),
        clients: int = typer.Option(16, "--clients", help="Concurrent predict clients."),
        duration: float = typer.Option(30.0, "--duration", help="Seconds of load per mode."),
        warmup: float = typer.Option(3.0, "--warmup", help="Seconds of unrecorded load."),
        enroll_interval: float = typer.Option(2.0, "--enroll-interval", help="0: no enrolls."),
        seed_classes: int = typer.Option(4, "--seed-classes", help="Classes enrolled first."),
        shots: int = typer.Option(5, "--shots", help="Photos per seed class."),
        max_batch: int = typer.Option(16, "--max-batch"),
        max_delay_ms: float = typer.Option(2.0, "--max-delay-ms"),
        modes: str = typer.Option("off,on", "--modes", help="Batching modes to run."),
        rounds: int = typer.Option(1, "--rounds", help="Runs per mode, in A B B A order."),
        seed: int = typer.Option(0, "--seed"),
        out: Path | None = OUT_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.bench import serve_bench as sb
        from mtl_edge.bench import serve_report as sr

        cfg = sb.ServeBenchConfig(
            resolve_bundle(bundle), images, backend, precision, threads, clients, duration,
            warmup,
            enroll_interval, seed_classes=seed_classes, shots=shots, max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            modes=tuple(m.strip() for m in modes.split(",") if m.strip()), rounds=rounds,
            seed=seed,
        )  # fmt: skip
        import tempfile

        out = out or _default_out("serve")
        # The servers' galleries are scratch: only the report goes to `out`.
        with tempfile.TemporaryDirectory(prefix="mtl-edge-bench-serve-") as work:
            report = sr.make_report(cfg, sb.run_serve_bench(cfg, Path(work)))
        paths = sr.write_outputs(report, out)
        typer.echo(json.dumps(report, indent=2) if as_json else sr.to_markdown(report))
        if not as_json:
            typer.echo("written: " + ", ".join(str(p) for p in paths))

    @group.command("joint", help="Joint method: per-task loop vs batched meta-iteration.")
    def joint(
        settings: str = typer.Option("cpu-repro-32,small-16", "--settings", help="NAME[:k=v]"),
        engines: str = typer.Option("loop,batched,cuda-graphs", "--engines"),
        rounds: int = typer.Option(3, "--rounds"),
        warmup: int = typer.Option(1, "--warmup"),
        check: int = typer.Option(3, "--check", help="Steps of the equality check."),
        threads: int = typer.Option(0, "--threads"),
        device: str = typer.Option("auto", "--device"),
        out: Path | None = OUT_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.bench import joint_speed as js
        from mtl_edge.bench.latency import parse_list

        cfg = js.JointSpeedConfig(
            parse_list(settings, "--settings"), parse_list(engines, "--engines"), rounds,
            warmup, check, threads, device,
        )  # fmt: skip
        report = js.make_report(cfg, js.run_joint_speed(cfg, lambda m: typer.echo(m, err=True)))
        paths = js.write_outputs(report, out or _default_out(js.KIND))
        typer.echo(json.dumps(report, indent=2) if as_json else js.to_markdown(report))
        typer.echo("written: " + ", ".join(str(p) for p in paths), err=as_json)

    @group.command("train", help="Training img/s: FP32 eager vs bf16 vs bf16 + channels-last.")
    def train(
        backbone: str = typer.Option("resnet12", "--backbone", help="Registry backbone."),
        backbone_args: list[str] = typer.Option(
            [], "--backbone-arg", help="Option of --backbone, KEY=VALUE, e.g. width=8 (repeatable)."
        ),
        image_size: int = typer.Option(84, "--image-size"),
        batch: int = typer.Option(64, "--batch", help="Images per pre-training step."),
        step: str = typer.Option("pretrain", "--step", help="pretrain or meta."),
        shots: int = typer.Option(1, "--shots", help="Shots of the --step meta task."),
        meta_batch: int = typer.Option(1, "--meta-batch", help="Tasks per --step meta step."),
        inner_steps: int = typer.Option(20, "--inner-steps", help="FC steps of --step meta."),
        modes: str = typer.Option(
            "fp32,bf16,bf16+cl",
            "--modes",
            help="Add bf16+cl+compile; with --step meta, fp32+loop or bf16+cl+loop (the "
            "per-task autograd inner loop).",
        ),
        rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds."),
        steps: int = typer.Option(3, "--steps", help="Timed steps per mode and round."),
        threads: int | None = typer.Option(None, "--threads"),
        out: Path | None = OUT_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from mtl_edge.bench import train_speed as ts
        from mtl_edge.bench.latency import parse_list

        cfg = ts.TrainSpeedConfig(
            backbone=backbone,
            backbone_args=parse_options(backbone_args, "--backbone-arg", "width=8"),
            image_size=image_size,
            batch=batch,
            step=step,
            shots=shots,
            meta_batch=meta_batch,
            inner_steps=inner_steps,
            modes=parse_list(modes, "--modes"),
            rounds=rounds,
            steps_per_round=steps,
            threads=threads,
        )
        _report("train", cfg, ts.run_train_speed(cfg), out, as_json)

    @group.command("compare", help="Two reports of one kind side by side (ratio B / A).")
    def compare(
        a: Path = typer.Argument(..., help="Report A (JSON)."),
        b: Path = typer.Argument(..., help="Report B (JSON)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        from mtl_edge.bench import compare as cmp
        from mtl_edge.bench.report import load_report

        result = cmp.compare(load_report(a), load_report(b))
        typer.echo(
            json.dumps(result, indent=2)
            if as_json
            else cmp.compare_markdown(result, a.name, b.name)
        )
