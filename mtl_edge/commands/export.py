"""`mtl-edge export CHECKPOINT --out BUNDLE [...]` and `mtl-edge export check BUNDLE`.

`export` is one command with a variadic argument that dispatches on the word "check": a click
group cannot have both a positional CHECKPOINT and sub-commands (the group would read "check"
as the checkpoint). A checkpoint file that is literally named `check` is passed as `./check`.
Export needs the workstation extras (torch, onnx, onnxscript); `export check` needs only
onnxruntime, so it also runs on a device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mtl_edge.errors import ConfigError, MtlEdgeError

HELP = """Fold SS and BatchNorm, export ONNX (+ INT8 / FP16 / TensorRT), write a model bundle.

\b
  mtl-edge export CHECKPOINT --out BUNDLE [--int8 --calib DIR] [--fp16] [--tensorrt] [--force]
  mtl-edge export check BUNDLE [--json]
"""

#: Options that only the export form takes, by flag, with their "unset" value.
_EXPORT_ONLY = (
    "--out",
    "--int8",
    "--calib",
    "--fp16",
    "--tensorrt",
    "--force",
    "--eval",
    "--head-steps",
    "--head-lr",
    "--head-init",
    "--sign",
    "--card",
)


def _fmt_acc(entry: dict[str, Any], head: str = "mtl") -> str:
    """The paired accuracy change of a variant with `head`, per shot count (percent)."""
    parts = []
    for shots in (1, 5):
        a = (entry.get(f"5way_{shots}shot") or {}).get(head)
        if a:
            parts.append(
                f"{head} {shots}-shot {a['reference']:.2f} -> {a['candidate']:.2f} "
                f"({a['change']:+.2f} +- {a['change_ci95']:.2f} pts, {a['episodes']} episodes)"
            )
    return "; ".join(parts)


def export_summary(bundle: Any, report: dict[str, Any]) -> list[str]:
    """Human-readable lines about a finished export."""
    b = bundle.manifest["backbone"]
    par = report["parity"]
    real = par["real"]
    lines = [
        f"bundle: {bundle.root} (model id {bundle.model_id[:12]})",
        f"backbone: {b['name']} {b['args']}, input {tuple(b['input_shape'])}, "
        f"features {b['feature_dim']}",
        f"fold: max abs {report['fold']['max_abs']:.2e} against the trained network",
        "parity onnxruntime vs torch: "
        + ", ".join(
            f"batch {n}: max abs {v['max_abs']:.2e} cos {v['cosine_min']:.6f}"
            for n, v in par["batches"].items()
        ),
        f"parity on {real['data']} ({real['images']} images): max abs {real['max_abs']:.2e}, "
        f"identical 5-way predictions in {real['episodes']['identical_episodes']}/"
        f"{real['episodes']['episodes']} episodes -> {'PASS' if par['pass'] else 'FAIL'}",
    ]
    for name, q in report.get("quantization", {}).items():
        if not isinstance(q, dict):
            continue
        k = q["onnxruntime_cpu_kernels"]
        lines.append(
            f"{name}: {q['settings']['activations']} activations; convs with QDQ "
            f"{q['qdq']['convs_with_qdq']}/{q['qdq']['convs']}, onnxruntime CPU runs "
            f"{k['quantized']} quantized / {k['float']} float convs; cos "
            f"{q['accuracy']['cosine_min']:.5f}; {_fmt_acc(q['accuracy'])}"
        )
    if "fp16" in report:
        f = report["fp16"]["accuracy"]
        lines.append(f"fp16: cos {f['cosine_min']:.6f}; {_fmt_acc(f)}")
    for e in report.get("engines", []):
        lines.append(f"tensorrt engine: {e['file']} ({e['variant']})")
    lines.append(f"variants: {', '.join(bundle.variants)}")
    return lines


def check_summary(result: dict[str, Any]) -> list[str]:
    """Human-readable lines of `check_bundle`'s result."""
    b, prov, head = result["backbone"], result["provenance"], result["head"]
    lines = [
        f"bundle: {result['bundle']} ({result['files']} files, hashes OK)",
        f"model id: {result['model_id']}",
        f"backbone: {b['name']} {b.get('args', {})}, features {b['feature_dim']}",
        f"preprocess: size {result['preprocess']['size']}, {result['preprocess']['color_mode']}",
        f"head: {head['steps']} steps, lr {head['lr']}, init {head['init']}"
        + (f" (meta init for {head['meta_init_ways']} ways)" if head["meta_init_ways"] else ""),
        f"source: {prov.get('checkpoint')} sha256 {str(prov.get('checkpoint_sha256'))[:12]}, "
        f"stage {prov.get('stage')}, dataset {prov.get('dataset')}, created {prov.get('created')}",
        f"export parity: {'PASS' if result['export_parity_pass'] else 'not recorded or FAIL'}",
        f"check images: {result['images']['count']} {result['images']['kind']}"
        + (f" from {result['images']['split']}" if "split" in result["images"] else ""),
    ]
    for name, r in result["variants"].items():
        lines.append(
            f"{name}: vs fp32 max abs {r['max_abs']:.2e}, cos {r['cosine_min']:.6f} -> "
            f"{'PASS' if r['pass'] else 'FAIL'}"
        )
    for e in result["engines"]:
        lines.append(f"engine: {e.get('file')} ({e.get('variant')}, {e.get('key', '?')})")
    lines.append("check: " + ("PASS" if result["pass"] else "FAIL"))
    return lines


def _head_overrides(steps: int | None, lr: float | None, init: str | None) -> dict[str, Any]:
    head: dict[str, Any] = {}
    if steps is not None:
        head["steps"] = steps
    if lr is not None:
        head["lr"] = lr
    if init is not None:
        head["init"] = init
    return head


def read_card(path: Path) -> dict[str, Any]:
    """The --card file: one JSON object (the model card the manifest carries)."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the model card ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"{path}: the model card is not valid JSON ({e})") from None
    if not isinstance(card, dict):
        raise ConfigError(f"{path}: the model card must be a JSON object {{...}}")
    return card


def register(app: typer.Typer, name: str) -> None:
    @app.command(name=name, help=HELP, no_args_is_help=True)
    def export(
        ctx: typer.Context,
        args: list[str] = typer.Argument(
            ..., metavar="CHECKPOINT | check BUNDLE", help="A checkpoint, or: check BUNDLE."
        ),
        out: Path | None = typer.Option(None, "--out", "-o", help="Bundle folder to write."),
        int8: bool = typer.Option(False, "--int8", help="Also write INT8 variants."),
        calib: Path | None = typer.Option(
            None, "--calib", help="Calibration images (class folders or flat) for --int8."
        ),
        int8_variants: str = typer.Option(
            "int8,int8-cpu",
            "--int8-variants",
            help="With --int8: int8 (S8S8, TensorRT), int8-cpu (U8S8, onnxruntime) or both.",
        ),
        calib_images: int = typer.Option(
            300, "--calib-images", min=1, help="Calibration images to use (spread over classes)."
        ),
        fp16: bool = typer.Option(False, "--fp16", help="Also write an FP16 variant (GPUs)."),
        tensorrt: bool = typer.Option(
            False, "--tensorrt", help="Build TensorRT engines on this machine (needs a GPU)."
        ),
        force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
        eval_dir: Path | None = typer.Option(
            None, "--eval", help="Class folders for the episode checks (default: synthetic)."
        ),
        eval_per_class: int = typer.Option(
            30, "--eval-per-class", min=1, help="Images per --eval class used by the checks."
        ),
        parity_episodes: int = typer.Option(
            200, "--parity-episodes", min=1, help="Episodes of the ONNX vs PyTorch check."
        ),
        quant_episodes: int = typer.Option(
            600, "--quant-episodes", min=1, help="Episodes of the paired INT8/FP16 vs FP32 check."
        ),
        card: Path | None = typer.Option(
            None, "--card", help='Model card JSON written into the manifest ("card").'
        ),
        head_steps: int | None = typer.Option(None, "--head-steps", help="Head recipe steps."),
        head_lr: float | None = typer.Option(None, "--head-lr", help="Head recipe lr."),
        head_init: str | None = typer.Option(
            None, "--head-init", help="Head init: zeros, meta or imprint."
        ),
        opt_batch: int = typer.Option(8, "--opt-batch", help="TensorRT profile optimum batch."),
        max_batch: int = typer.Option(64, "--max-batch", help="TensorRT profile max batch."),
        seed: int = typer.Option(0, "--seed", help="Seed of episodes and calibration sample."),
        sign: Path | None = typer.Option(
            None, "--sign", metavar="KEY", help="Sign the bundle with this Ed25519 private key."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
        check_data: Path | None = typer.Option(
            None,
            "--check-data",
            help="check: real images from this class-folder split "
            "(<dir>/<class>/<image>; default: synthetic ones).",
        ),  # fmt: skip
    ) -> None:
        if args[0] == "check":
            given = [
                p.opts[0]
                for p in ctx.command.params
                if p.opts
                and p.opts[0] in _EXPORT_ONLY
                and ctx.params.get(p.name) not in (None, False)
            ]
            if given:
                raise ConfigError(
                    f"{given[0]} is an option of `mtl-edge export CHECKPOINT`, not of "
                    "`mtl-edge export check BUNDLE`"
                )
            if len(args) != 2:
                raise ConfigError("usage: mtl-edge export check BUNDLE [--json]")
            _run_check(Path(args[1]), seed, as_json, check_data)
            return
        if check_data is not None:
            raise ConfigError("--check-data is an option of `mtl-edge export check BUNDLE`")
        if len(args) != 1:
            raise ConfigError(
                f"expected one CHECKPOINT, got {len(args)} arguments ({' '.join(args)}); "
                "usage: mtl-edge export CHECKPOINT --out BUNDLE"
            )
        if out is None:
            raise ConfigError("--out BUNDLE is required: the folder to write the bundle to")
        if calib is not None and not int8:
            raise ConfigError("--calib is only used with --int8; add --int8 or drop --calib")
        if sign is not None:  # fail before the long export: a bad key, or no cryptography
            from mtl_edge.signing import load_private_key, sign_bundle

            load_private_key(sign)
        from mtl_edge.export import api
        from mtl_edge.train.checkpoint import load_checkpoint

        eval_data = None
        if eval_dir is not None:
            from mtl_edge.data.folders import read_class_folders

            mode = load_checkpoint(Path(args[0])).preprocess.color_mode
            eval_data = read_class_folders(eval_dir, None, color_mode=mode)
        bundle, report = api.export_checkpoint(
            args[0],
            out,
            int8=int8,
            calib=calib,
            fp16=fp16,
            tensorrt=tensorrt,
            force=force,
            eval_data=eval_data,
            seed=seed,
            head=_head_overrides(head_steps, head_lr, head_init),
            calib_images=calib_images,
            eval_per_class=eval_per_class,
            int8_variants=tuple(v.strip() for v in int8_variants.split(",") if v.strip()),
            parity_episodes=parity_episodes,
            quant_episodes=quant_episodes,
            card=None if card is None else read_card(card),
            trt_opt_batch=opt_batch,
            trt_max_batch=max_batch,
        )
        if sign is not None:
            report["signature"] = {"key_id": sign_bundle(bundle.root, sign)["key_id"]}
        if as_json:
            doc = {"bundle": str(bundle.root), "model_id": bundle.model_id, "report": report}
            typer.echo(json.dumps(doc, indent=2))
        else:
            typer.echo("\n".join(export_summary(bundle, report)))
            if sign is not None:
                typer.echo(f"signed: key {report['signature']['key_id']} (signature.json)")


def _run_check(path: Path, seed: int, as_json: bool, data: Path | None) -> None:
    from mtl_edge.export.check import check_bundle  # torch-free: onnxruntime and numpy only

    result = check_bundle(path, seed=seed, data=data)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo("\n".join(check_summary(result)))
    if not result["pass"]:
        raise MtlEdgeError(f"{path}: a variant disagrees with fp32 beyond its tolerance")
