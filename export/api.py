"""One call from a training checkpoint to a verified model bundle, and the bundle check.

`export_checkpoint` loads a self-describing checkpoint, rebuilds its backbone, folds SS and
BatchNorm, exports ONNX, checks onnxruntime against PyTorch, optionally writes INT8 (TensorRT and
CPU files), FP16 and TensorRT engines, and writes the bundle atomically. The CLI
(`mtl-edge export`) and the demo call it. `check_bundle` re-verifies a bundle on any machine.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge import sysinfo
from mtl_edge.atomicio import sha256_file
from mtl_edge.bundle import Bundle, write_bundle
from mtl_edge.data.registry import first_per_class
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import BundleError, DatasetError, MtlEdgeError, UnavailableError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess

log = logging.getLogger(__name__)

FOLD_TOL = 1e-4
#: Variants `check_bundle` compares with fp32: smallest per-image cosine accepted.
CHECK_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98, "int8-cpu": 0.98}

#: Builds the backbone of a checkpoint: (name, model_args, state_dict) -> nn.Module whose
#: parameters and buffers match the state dict's keys.
ModelFactory = Callable[[str, Mapping[str, Any], Mapping[str, Any]], Any]


@dataclass
class ExportOptions:
    """What `export_checkpoint` writes besides the FP32 backbone.

    Attributes:
        int8: write the "int8" (S8S8, TensorRT) and "int8-cpu" (U8S8, onnxruntime) variants.
        calib: folder of base-class images for calibration (class folders or flat); None uses
            the training split named in the checkpoint's config.
        calib_images: how many calibration images to use.
        fp16: write the "fp16" variant.
        tensorrt: build TensorRT engines of every TensorRT variant on this machine.
        eval_data: labelled split for episode parity and the INT8 accuracy change; None uses
            a small built-in synthetic split.
        parity_episodes, quant_episodes: fixed episodes for the two checks.
        eval_per_class: images per class of `eval_data` used (the first ones), which bounds
            the feature extraction time of the checks.
        seed: seed of the episodes, random inputs and calibration sample.
        head: overrides of the head recipe (steps, lr, init, normalize, weight_decay).
        trt_opt_batch, trt_max_batch: TensorRT optimisation profile.
    """

    int8: bool = False
    calib: Path | None = None
    calib_images: int = 300
    fp16: bool = False
    tensorrt: bool = False
    eval_data: ImageSplit | None = None
    parity_episodes: int = 200
    quant_episodes: int = 600
    eval_per_class: int = 30
    seed: int = 0
    head: dict[str, Any] = field(default_factory=dict)
    trt_opt_batch: int = 8
    trt_max_batch: int = 64


# ---------------------------------------------------------------------------------------------
# Checkpoint reading


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint and check that it describes a backbone (not yet its weights).

    The training stack's reader checks file, format, version and required keys; this adds
    the types export relies on.

    Raises:
        MtlEdgeError: missing file, not a torch file, not an mtl-edge checkpoint, another
            version, or no backbone description.
    """
    from mtl_edge.train.checkpoint import read_checkpoint as read_training_checkpoint

    path = Path(path)
    ckpt = read_training_checkpoint(path)
    for key, kind in (("model", str), ("state_dict", dict), ("preprocess", dict)):
        if not isinstance(ckpt.get(key), kind):
            raise MtlEdgeError(
                f"{path}: checkpoint has no {key!r} ({kind.__name__}); it does not describe a "
                "backbone, export a pre-training or meta-training checkpoint"
            )
    if not isinstance(ckpt.get("model_args", {}), dict):
        raise MtlEdgeError(f"{path}: checkpoint 'model_args' is not a mapping")
    return ckpt


def default_model_factory(
    name: str, model_args: Mapping[str, Any], state_dict: Mapping[str, Any]
) -> Any:
    """The training stack's backbone `name`, converted to SS convs when the state dict holds
    SS parameters (a meta-transfer checkpoint)."""
    from mtl_edge.train.backbones import create_backbone

    model = create_backbone(name, **dict(model_args))
    if any(k.endswith("ss_scale") for k in state_dict):
        from mtl_edge.train.ss import convert_to_ss

        shortcut = bool(model_args.get("ss_shortcut", True))
        model = convert_to_ss(model, shortcut=shortcut)
    return model


def _short(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def build_backbone(path: Path, ckpt: dict[str, Any], factory: ModelFactory | None) -> Any:
    """The checkpoint's network with its weights loaded, in eval mode.

    Raises:
        MtlEdgeError: unknown backbone, missing or extra keys, wrong shapes, non-finite values.
    """
    import torch

    state = ckpt["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise MtlEdgeError(f"{path}: state_dict entries that are not tensors: {_short(bad)}")
    nonfinite = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if nonfinite:
        raise MtlEdgeError(
            f"{path}: non-finite weights (NaN or inf) in {_short(nonfinite)}; the training run "
            "diverged, export an earlier checkpoint"
        )
    try:
        model = (factory or default_model_factory)(ckpt["model"], ckpt.get("model_args", {}), state)
    except MtlEdgeError as e:
        raise MtlEdgeError(f"{path}: {e}") from None
    except ImportError as e:
        raise UnavailableError(
            f"{path}: cannot build backbone {ckpt['model']!r}: the training stack is missing "
            f"({e}); pip install 'mtl-edge[train]'"
        ) from None
    except (KeyError, ValueError, TypeError) as e:
        raise MtlEdgeError(
            f"{path}: cannot build backbone {ckpt['model']!r} with {ckpt.get('model_args')} "
            f"({type(e).__name__}: {e}); is this a backbone checkpoint?"
        ) from None
    if not hasattr(model, "forward_features"):
        raise MtlEdgeError(f"{path}: model {ckpt['model']!r} is not a backbone (no features)")
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        parts = ([f"missing keys {_short(missing)}"] if missing else []) + (
            [f"unexpected keys {_short(extra)}"] if extra else []
        )
        raise MtlEdgeError(
            f"{path}: state_dict does not match backbone {ckpt['model']!r} ({'; '.join(parts)}); "
            "the checkpoint was written for another model or is damaged"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "")
        raise MtlEdgeError(
            f"{path}: weights do not fit backbone {ckpt['model']!r} "
            f"({detail or 'shape mismatch'}); check model_args"
        ) from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Data for the checks


def synthetic_eval_split(preprocess: Preprocess, seed: int = 0) -> ImageSplit:
    """10 classes x 20 images of the built-in synthetic data, drawn at the backbone's input
    size and colour mode (enough for 5-way 5-shot episodes with 15 queries)."""
    from mtl_edge.data.synthetic import make_synthetic_split

    size = max(8, preprocess.resize or preprocess.size)
    return make_synthetic_split(
        10, 20, size, seed, preprocess.color_mode, name="synthetic/export-check"
    )


def _find(doc: Any, *names: str) -> Any:
    """First value under any of `names` in a nested dict (depth-first), or None."""
    if isinstance(doc, Mapping):
        for name in names:
            value = doc.get(name)
            empty = value is None or (isinstance(value, str | Mapping) and not value)
            if not empty:
                return value
        for value in doc.values():
            found = _find(value, *names)
            if found is not None:
                return found
    return None


def config_train_split(ckpt: dict[str, Any], color_mode: str) -> ImageSplit | None:
    """The training split named in the checkpoint config (`{"data": {"kind", "root",
    "options": {...}}}` as in the recipes; reader options may also sit beside "kind"), or None
    when the config names none or it is not on this machine."""
    data = _find(ckpt.get("config") or {}, "data", "dataset")
    if not isinstance(data, Mapping) or "kind" not in data:
        return None
    try:
        from mtl_edge.data.registry import open_split, reader_options

        kind = str(data["kind"])
        allowed = set(reader_options(kind))
        nested = data.get("options") if isinstance(data.get("options"), Mapping) else {}
        merged = {**dict(nested), **{k: v for k, v in data.items() if k != "options"}}
        options = {k: v for k, v in merged.items() if k in allowed}
        if "color_mode" in allowed:
            options.setdefault("color_mode", color_mode)
        return open_split(kind, data.get("root"), str(data.get("train_split", "train")), **options)
    except (MtlEdgeError, OSError, ImportError) as e:
        log.warning("cannot open the checkpoint's training split for calibration: %s", e)
        return None


# ---------------------------------------------------------------------------------------------
# Export


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    return buf.getvalue()


def _meta_head_recipe(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The head recipe meta-test used, as a mean-loss recipe for the device head: from the
    checkpoint's `meta` (the learner's settings + ways, written by meta-training), else the
    config's `meta` table (test_steps, inner_lr, inner_weight_decay, normalize, inner_loss).

    inner_loss "tf" (the TF code: summed CE / shots = ways x mean) becomes lr x ways and weight
    decay / ways with the meta-training ways; "sum" depends on the support size, so its lr is
    left at the default with a warning.
    """
    meta = ckpt.get("meta")
    if not isinstance(meta, Mapping):
        config = ckpt.get("config")
        meta = config.get("meta") if isinstance(config, Mapping) else None
    if not isinstance(meta, Mapping):
        return {}
    recipe = {
        head: meta[key]
        for key, head in (("test_steps", "steps"), ("normalize", "normalize"))
        if key in meta
    }
    loss = meta.get("inner_loss", "mean")
    if loss == "sum":
        log.warning(
            "meta.inner_loss='sum': its mean-loss lr depends on the support size; the bundle "
            "keeps the default head lr (set --head-lr)"
        )
        return recipe
    scale = float(meta.get("ways", 5)) if loss == "tf" else 1.0
    if "inner_lr" in meta:
        recipe["lr"] = float(meta["inner_lr"]) * scale
    if "inner_weight_decay" in meta:
        recipe["weight_decay"] = float(meta["inner_weight_decay"]) / scale
    return recipe


def _head_section(
    path: Path, ckpt: dict[str, Any], overrides: Mapping[str, Any], files: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's head recipe; stores the meta-learned FC init as .npy files when present."""
    recipe = _meta_head_recipe(ckpt)
    found = _find(ckpt.get("config") or {}, "head")
    if isinstance(found, Mapping):
        recipe.update({k: v for k, v in found.items() if k in HeadRecipe.__dataclass_fields__})
    fc = ckpt.get("fc_init")
    meta = None
    if fc is not None:
        try:
            weight = fc["weight"].detach().cpu().numpy().astype(np.float32)
            bias = fc["bias"].detach().cpu().numpy().astype(np.float32)
        except (KeyError, TypeError, AttributeError):
            raise MtlEdgeError(
                f"{path}: fc_init must hold tensors 'weight' (ways, D) and 'bias' (ways,)"
            ) from None
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise MtlEdgeError(
                f"{path}: fc_init weight {weight.shape} / bias {bias.shape}: need (ways, D) and "
                "(ways,)"
            )
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise MtlEdgeError(f"{path}: fc_init holds NaN or inf; export an earlier checkpoint")
        files["head_init_weight.npy"] = _npy_bytes(weight)
        files["head_init_bias.npy"] = _npy_bytes(bias)
        meta = {
            "weight": "head_init_weight.npy",
            "bias": "head_init_bias.npy",
            "ways": int(weight.shape[0]),
        }
        recipe.setdefault("init", "meta")
    recipe.update(overrides)
    if recipe.get("init") == "meta" and meta is None:
        raise MtlEdgeError(
            f"{path}: head init 'meta' needs a meta-training checkpoint (it has no fc_init)"
        )
    head = HeadRecipe(**recipe).to_dict()
    head["meta_init"] = meta
    return head


def _provenance(path: Path, ckpt: dict[str, Any], seed: int) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    config, metrics = ckpt.get("config") or {}, ckpt.get("metrics") or {}
    data = _find(config, "data", "dataset")
    dataset = data.get("kind") if isinstance(data, Mapping) else data
    return {
        "checkpoint": path.name,
        "checkpoint_sha256": sha256_file(path),
        "stage": ckpt.get("stage"),
        "dataset": None if dataset is None else str(dataset),
        "split_fingerprint": _find(
            {"m": metrics, "c": config}, "split_fingerprint", "train_fingerprint", "fingerprint"
        ),
        "training_seed": _find(config, "seed"),
        "export_seed": seed,
        "commit": ckpt.get("commit") or _find(config, "commit"),
        "export_commit": sysinfo.git_commit(),
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def _json_safe(obj: Any) -> Any:
    """Checkpoint metrics as plain JSON (tensors and numpy scalars become numbers)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def require_workstation() -> None:
    """Raise UnavailableError (exit 2) unless torch, onnx and onnxscript are importable."""
    import importlib

    for module in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UnavailableError(
                f"`mtl-edge export` needs {module} ({e}); pip install 'mtl-edge[train,cpu]' on "
                "the workstation (`mtl-edge export check` works without it)"
            ) from None


def _check_preflight(out: Path, force: bool, opts: ExportOptions) -> None:
    require_workstation()
    if out.exists() and not force:
        raise MtlEdgeError(f"{out}: already exists; choose another --out or pass --force")
    if opts.tensorrt:
        from mtl_edge.backends.tensorrt_runtime import import_tensorrt
        from mtl_edge.backends.trt_build import this_gpu

        import_tensorrt()
        this_gpu()
    if opts.calib is not None and not Path(opts.calib).is_dir():
        raise DatasetError(f"--calib {opts.calib}: no such folder; give a folder of images")


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    int8: bool = False,
    calib: str | Path | None = None,
    fp16: bool = False,
    tensorrt: bool = False,
    force: bool = False,
    eval_data: ImageSplit | None = None,
    seed: int = 0,
    head: Mapping[str, Any] | None = None,
    model_factory: ModelFactory | None = None,
    **more: Any,
) -> tuple[Bundle, dict[str, Any]]:
    """Export a training checkpoint to a model bundle.

    Args:
        checkpoint: a file written by the training stack (`mtl-edge.checkpoint`, version 1).
        out: the bundle folder to create; refused if it exists unless `force`.
        int8, calib, fp16, tensorrt, eval_data, seed, head: see `ExportOptions`.
        force: replace an existing `out` (atomically, only once the new bundle is complete).
        model_factory: builds the network from (name, model_args, state_dict); None uses the
            training stack's backbone registry.
        **more: further `ExportOptions` fields (calib_images, parity_episodes, quant_episodes,
            trt_opt_batch, trt_max_batch).

    Returns:
        (the written and verified bundle, the export report: fold, parity, quantization, fp16,
        engines).

    Raises:
        MtlEdgeError: bad checkpoint, existing output, failed parity; UnavailableError when
            --tensorrt is asked where TensorRT or a GPU is missing.
    """
    unknown = sorted(set(more) - set(ExportOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"export_checkpoint: unknown options {unknown}")
    opts = ExportOptions(
        int8=int8,
        calib=None if calib is None else Path(calib),
        fp16=fp16,
        tensorrt=tensorrt,
        eval_data=eval_data,
        seed=seed,
        head=dict(head or {}),
        **more,
    )
    return _export(Path(checkpoint), Path(out), opts, force, model_factory)


def _export(
    path: Path, out: Path, opts: ExportOptions, force: bool, model_factory: ModelFactory | None
) -> tuple[Bundle, dict[str, Any]]:
    _check_preflight(out, force, opts)
    from mtl_edge.export import fold, onnx_export, parity

    ckpt = read_checkpoint(path)
    try:
        preprocess = Preprocess.from_dict(dict(ckpt["preprocess"]))
    except MtlEdgeError as e:
        raise MtlEdgeError(f"{path}: bad preprocess section ({e})") from None
    model = build_backbone(path, ckpt, model_factory)
    files: dict[str, Path | bytes] = {}
    head = _head_section(path, ckpt, opts.head, files)
    calib_split = None
    if opts.int8:
        calib_split = (
            quantize_calibration_split(opts.calib, preprocess)
            if opts.calib is not None
            else config_train_split(ckpt, preprocess.color_mode)
        )
        if calib_split is None:
            raise MtlEdgeError(
                f"{path}: --int8 needs calibration images: pass --calib DIR (base-class images)"
            )

    import torch

    report: dict[str, Any] = {}
    folded = fold.fold_model(model)
    gen = torch.Generator().manual_seed(opts.seed)
    x = torch.randn(5, *preprocess.input_shape, generator=gen)
    err = fold.fold_error(model, folded, x)
    report["fold"] = {"max_abs": err}
    with torch.no_grad():
        scale = 1.0 + float(model.forward_features(x).abs().max())
    if not err <= FOLD_TOL * scale:
        raise MtlEdgeError(
            f"{path}: folded network differs from the trained one by {err:.3g}; this is a bug, "
            "please report it with the checkpoint"
        )
    eval_split = (
        synthetic_eval_split(preprocess, opts.seed)
        if opts.eval_data is None
        else first_per_class(opts.eval_data, opts.eval_per_class)
    )
    variants: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mtl-edge-export.") as tmp:
        fp32 = onnx_export.export_onnx(folded, preprocess.input_shape, Path(tmp) / "backbone.onnx")
        files["backbone.onnx"] = fp32
        variants["fp32"] = {"file": "backbone.onnx", "precision": "fp32"}
        session = parity.ort_session(fp32)
        rep = parity.tensor_parity(
            folded, fp32, preprocess.input_shape, seed=opts.seed, session=session
        )
        log.info(
            "parity: onnxruntime vs torch on %d images of %s", len(eval_split), eval_split.name
        )
        images = parity.split_images(eval_split, preprocess)
        rep["real"] = parity.features_parity(
            folded, session, eval_split, images, opts.parity_episodes, opts.seed
        )
        rep["pass"] = bool(rep["pass"] and rep["real"]["episodes"]["pass"])
        report["parity"] = rep
        if not rep["pass"]:
            raise MtlEdgeError(
                f"{path}: onnxruntime disagrees with PyTorch (max abs {rep['max_abs']:.3g}, "
                f"cosine {rep['cosine_min']:.6f}, identical episodes "
                f"{rep['real']['episodes']['identical_episodes']}/{opts.parity_episodes}); "
                "the bundle was not written"
            )
        fp32_feats = parity.ort_features(session, images)
        if opts.int8:
            assert calib_split is not None
            report["quantization"] = _int8_variants(
                fp32,
                Path(tmp),
                calib_split,
                preprocess,
                eval_split,
                images,
                fp32_feats,
                opts,
                files,
                variants,
            )
        if opts.fp16:
            report["fp16"] = _fp16_variant(
                fp32, Path(tmp), eval_split, images, fp32_feats, opts, files, variants
            )
        manifest = {
            "backbone": {
                "name": ckpt["model"],
                "args": _json_safe(ckpt.get("model_args", {})),
                "feature_dim": int(fp32_feats.shape[1]),
                "input_name": onnx_export.INPUT_NAME,
                "output_name": onnx_export.OUTPUT_NAME,
                "input_shape": list(preprocess.input_shape),
                "opset": onnx_export.OPSET,
            },
            "preprocess": preprocess.to_dict(),
            "head": head,
            "variants": variants,
            "provenance": _json_safe(_provenance(path, ckpt, opts.seed)),
            "metrics": _json_safe(ckpt.get("metrics") or {}),
            "parity": report["parity"],
            "quantization": report.get("quantization", {}),
        }
        bundle = write_bundle(out, manifest, files, force=force)
    if opts.tensorrt:
        report["engines"] = build_engines(bundle, opts)
    return bundle, report


def quantize_calibration_split(folder: Path, preprocess: Preprocess) -> ImageSplit:
    from mtl_edge.export.quantize import calibration_split

    return calibration_split(folder, preprocess.color_mode)


def _int8_variants(
    fp32: Path,
    tmp: Path,
    calib_split: ImageSplit,
    preprocess: Preprocess,
    eval_split: ImageSplit,
    images: np.ndarray,
    fp32_feats: np.ndarray,
    opts: ExportOptions,
    files: dict[str, Path | bytes],
    variants: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    from mtl_edge.export import parity, quantize

    calib = quantize.sample_calibration(calib_split, preprocess, opts.calib_images, opts.seed)
    out: dict[str, Any] = {"calibration_data": calib_split.name}
    for name in quantize.VARIANTS:
        file = f"backbone.{name}.onnx"
        target = tmp / file
        log.info("quantizing %s on %d calibration images", name, len(calib))
        settings = quantize.quantize_variant(fp32, target, calib, name)
        feats = parity.ort_features(parity.ort_session(target), images)
        entry = {
            "settings": settings,
            "qdq": quantize.qdq_conv_count(target),
            "onnxruntime_cpu_kernels": quantize.runtime_conv_kernels(target),
            "accuracy": quantize.accuracy_change(
                fp32_feats, feats, eval_split, opts.quant_episodes, opts.seed
            ),
        }
        quantize.require_quantized(entry, name, target)
        out[name] = entry
        files[file] = target
        variants[name] = {
            "file": file,
            "precision": "int8",
            "activations": settings["activations"],
            "target": "tensorrt" if name == "int8" else "onnxruntime-cpu",
        }
    return out


def _fp16_variant(
    fp32: Path,
    tmp: Path,
    eval_split: ImageSplit,
    images: np.ndarray,
    fp32_feats: np.ndarray,
    opts: ExportOptions,
    files: dict[str, Path | bytes],
    variants: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    from mtl_edge.export import fp16, parity, quantize

    target = tmp / "backbone.fp16.onnx"
    log.info("converting to fp16")
    settings = fp16.convert_fp16(fp32, target)
    feats = parity.ort_features(parity.ort_session(target), images)
    files["backbone.fp16.onnx"] = target
    report = {
        "settings": settings,
        "accuracy": quantize.accuracy_change(
            fp32_feats, feats, eval_split, opts.quant_episodes, opts.seed
        ),
    }
    variants["fp16"] = {
        "file": "backbone.fp16.onnx",
        "precision": "fp16",
        "target": "gpu",
        "check": report,
    }
    return report


def build_engines(bundle: Bundle, opts: ExportOptions) -> list[dict[str, Any]]:
    """TensorRT engines of every TensorRT variant in `bundle`, built on this machine."""
    from mtl_edge.backends import trt_build

    profile = trt_build.Profile(1, opts.trt_opt_batch, opts.trt_max_batch)
    built = []
    for variant in trt_build.TRT_VARIANTS:
        if variant in bundle.variants:
            engine = trt_build.build_engine(bundle, variant, profile, force=True)
            built.append({"variant": variant, "file": str(engine.relative_to(bundle.root))})
    return built


# ---------------------------------------------------------------------------------------------
# Check


def check_bundle(path: str | Path, seed: int = 0) -> dict[str, Any]:
    """Verify a bundle's hashes and compare every variant with fp32 on synthetic images.

    Returns:
        {"bundle", "model_id", "backbone", "variants": {name: {"max_abs", "cosine_min",
        "pass"}}, "engines", "pass"}.

    Raises:
        BundleError: missing, incomplete or tampered bundle.
    """
    from mtl_edge.export import parity

    bundle = Bundle.load(path)
    preprocess = bundle.preprocess
    split = synthetic_eval_split(preprocess, seed)
    images = parity.split_images(split.take(np.arange(0, len(split), 10)), preprocess)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((3, *preprocess.input_shape)).astype(np.float32)
    inputs = np.concatenate([images, noise])
    results: dict[str, Any] = {}
    reference = None
    for name in ["fp32", *[v for v in bundle.variants if v != "fp32"]]:
        try:
            session = parity.ort_session(bundle.variant_path(name))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise BundleError(
                f"{bundle.variant_path(name)}: onnxruntime cannot load it ({first}); export the "
                "bundle again"
            ) from None
        try:
            feats = parity.ort_features(session, inputs, batch_size=7)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise BundleError(
                f"{bundle.variant_path(name)}: onnxruntime fails on inputs of shape "
                f"(7, {', '.join(map(str, preprocess.input_shape))}) ({first}); the graph does "
                "not match the manifest, export the bundle again"
            ) from None
        if feats.shape != (len(inputs), bundle.feature_dim):
            raise BundleError(
                f"{bundle.variant_path(name)}: gives features of shape {feats.shape[1:]}, "
                f"manifest says ({bundle.feature_dim},)"
            )
        if reference is None:
            reference = feats
        # Quantized variants are compared on real images only: noise is outside calibration.
        rows = slice(None) if name in ("fp32", "fp16") else slice(0, len(images))
        cmp = parity.compare_features(reference[rows], feats[rows])
        cmp["pass"] = cmp["cosine_min"] >= CHECK_COSINE.get(name, 0.98)
        results[name] = cmp
    return {
        "bundle": str(bundle.root),
        "model_id": bundle.model_id,
        "backbone": bundle.manifest["backbone"],
        "preprocess": bundle.manifest["preprocess"],
        "head": {k: v for k, v in bundle.manifest["head"].items() if k != "meta_init"}
        | {"meta_init_ways": (bundle.manifest["head"].get("meta_init") or {}).get("ways")},
        "provenance": bundle.manifest.get("provenance", {}),
        "export_parity_pass": bundle.manifest.get("parity", {}).get("pass"),
        "files": len(bundle.manifest["files"]),
        "variants": results,
        "engines": bundle.manifest.get("engines", []),
        "pass": all(r["pass"] for r in results.values()),
    }
