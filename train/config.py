"""Typed training configs read from TOML recipes, with `--set key.sub=value` overrides.

`load_config(cls, path_or_name, overrides)` works for any tree of dataclasses: every TOML table
maps to a dataclass field whose type is itself a dataclass, every value is checked against the
field's annotation (int, float, bool, str, X | None, tuple[X, ...], list[X], dict[str, Any],
Any). An unknown key or a value of the wrong type raises one `ConfigError` naming the key and
the file. A recipe name without a path ("demo", "omniglot-cpu.toml") resolves to the packaged
recipes (`mtl_edge.recipes`).

`TrainConfig` is the recipe of pre-training and meta-training (tables data, model, pretrain,
meta, hard_tasks, eval, runtime); `config_to_dict` turns any config back into plain TOML/JSON
data.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from mtl_edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# The training recipe


@dataclass
class DataConfig:
    """Where the images come from (`mtl_edge.train.datasets.open_split(kind, root, split)`).

    Attributes:
        kind: dataset layout ("folders", "omniglot", "synthetic", ...).
        root: dataset folder; "" means $MTL_EDGE_DATA (default ../shared/data of the repo) /
            `default_subdir`. Ignored for "synthetic".
        default_subdir: folder under the data root when `root` is empty.
        options: reader options (color_mode, val_alphabets, rotations, size, ...).
        train_split, val_split, test_split: split names.
    """

    kind: str = "synthetic"
    root: str = ""
    default_subdir: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"


@dataclass
class ModelConfig:
    """The backbone (`mtl_edge.train.backbones.create_backbone(backbone, **args)`) and its
    preprocessing (`mtl_edge.preprocess.Preprocess` fields)."""

    backbone: str = "conv4"
    args: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)


@dataclass
class PretrainConfig:
    """Phase 1: a classifier over all base classes.

    Attributes:
        epochs, batch_size: passes over the train split and images per step.
        lr, momentum, nesterov, weight_decay: SGD.
        schedule: "cosine" or "step" (x `gamma` every `step_size` epochs).
        warmup_epochs: linear warm-up of the lr.
        label_smoothing: of the cross-entropy.
        augment: random resized crop, flip, colour jitter (`gpu_data.DeviceAugment`).
        crop_scale: area range of the random resized crop.
        val_episodes, val_ways, val_shots, val_queries: validation episodes on the validation
            classes after every `val_every` epochs (nearest-centroid on the features); the best
            one is best.pt. 0 episodes: the last epoch is best.
        device_data: keep the decoded split on the training device (else on the CPU).
        max_steps_per_epoch: stop an epoch early (0 = the whole split; for quick runs).
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: bool = True
    crop_scale: tuple[float, float] = (0.25, 1.0)
    val_episodes: int = 200
    val_ways: int = 5
    val_shots: int = 1
    val_queries: int = 15
    val_every: int = 1
    device_data: bool = True
    max_steps_per_epoch: int = 0


@dataclass(frozen=True)
class MetaSettingsFields:
    """The learner settings: how the FC base-learner adapts and what the meta-loss is. Their
    names, types and defaults, shared by the [meta] recipe table (`MetaConfig`) and by
    `mtl_edge.train.meta_transfer.MetaSettings`, which checks the values. Defaults follow the
    official PyTorch code (the TF code's setting: inner_steps=20, test_steps=100,
    inner_lr=1e-3, inner_loss="tf", second_order=True).

    Attributes:
        inner_steps: T during meta-training (100).
        test_steps: T at validation / meta-test (100).
        inner_lr: alpha (0.01).
        second_order: differentiate through the inner loop (False: first order, see
            `mtl_edge.train.base_learner`).
        inner_loss: "mean" (default, what the device head minimises), "sum" over the support
            set, or "tf": the TF code's cross-entropy summed over the support set and divided by
            the shots (= ways x the mean). Others run as "mean" with lr x c and weight decay / c
            (`base_learner.mean_loss_scale`), which is the same update.
        inner_weight_decay: coefficient of 0.5 * ||W||^2 in the inner loss (0).
        normalize: L2-normalise features before the FC head (False, as both official codes).
        fc_init: the FC initialisation's starting value: "zeros" (default; symmetric slots and
            what the device falls back to), "normal" (std 0.01) or "kaiming" (the PyTorch code).
        bn_mode: "frozen" (default) or "train"; see `mtl_edge.train.ss`.
        reduction: meta-batch loss "mean" (default) or "sum" over tasks.
    """

    inner_steps: int = 100
    test_steps: int = 100
    inner_lr: float = 0.01
    second_order: bool = False
    inner_loss: str = "mean"
    inner_weight_decay: float = 0.0
    normalize: bool = False
    fc_init: str = "zeros"
    bn_mode: str = "frozen"
    reduction: str = "mean"


@dataclass(frozen=True)
class MetaConfig(MetaSettingsFields):
    """Phase 2: SS meta-transfer with the FC base-learner.

    Besides the learner settings of `MetaSettingsFields` (inner_steps .. reduction, checked as
    `mtl_edge.train.meta_transfer.MetaSettings` when a run starts):

    Attributes:
        pretrained: the phase-1 checkpoint (the pipeline passes it directly).
        ways, shots, queries: the meta-training tasks.
        iterations: meta-batches in all; `epoch_length` meta-batches make an epoch (validation,
            checkpoint, lr decay counted in epochs).
        meta_batch: tasks per meta-batch.
        ss_lr, fc_lr: Adam learning rates of SS (Phi_S) and of the FC initialisation.
        lr_step, lr_gamma: multiply both by `lr_gamma` every `lr_step` epochs.
        ss_shortcut: scale-and-shift the 1x1 shortcut convs too.
        hard_tasks: add the hard-task meta-batch (table [hard_tasks]).
        also_without_ht: train a second meta-model without HT (saved as without_ht/best.pt).
        augment: augment the meta-training task images.
        val_episodes, val_shots: validation tasks on the validation classes after each epoch.
    """

    pretrained: str = ""
    ways: int = 5
    shots: int = 1
    queries: int = 15
    iterations: int = 10000
    epoch_length: int = 100
    meta_batch: int = 1
    ss_lr: float = 1e-4
    fc_lr: float = 1e-3
    lr_step: int = 10
    lr_gamma: float = 0.5
    ss_shortcut: bool = True
    hard_tasks: bool = True
    also_without_ht: bool = False
    augment: bool = False
    val_episodes: int = 100
    val_shots: int = 0


@dataclass
class HardTasksConfig:
    """`mtl_edge.train.hard_tasks.HardTaskConfig`: K' hard tasks after every
    `every_n_batches` meta-batches from epoch `start_epoch`, on fresh images or not."""

    count: int = 2
    start_epoch: int = 0
    every_n_batches: int = 1
    fresh_images: bool = True


@dataclass
class EvalConfig:
    """Defaults of `mtl-edge train evaluate` (meta-test)."""

    ways: int = 5
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    episodes: int = 600
    heads: tuple[str, ...] = ("mtl", "centroid", "logreg")
    seed: int = 0


@dataclass
class RuntimeConfig:
    """Where and how it runs.

    Attributes:
        seed: seeds torch, numpy and the samplers.
        device: "auto" (CUDA when present), "cpu" or "cuda[:i]".
        amp: "none", "bf16" or "fp16" autocast (CUDA only; ignored on the CPU).
        channels_last: channels-last memory format (CUDA only).
        threads: torch CPU threads (0 = torch's default).
        progress: rich progress bars ("auto" = only on a TTY, "on", "off").
    """

    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    threads: int = 0
    progress: str = "auto"


@dataclass
class TrainConfig:
    """A training recipe: the tables of a recipes/*.toml file."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    hard_tasks: HardTasksConfig = field(default_factory=HardTasksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# ---------------------------------------------------------------------------------------------
# Generic loading


def recipe_path(path_or_name: str | Path) -> Path:
    """A recipe file: an existing path, else a packaged recipe by name (".toml" optional).

    Raises:
        ConfigError: neither exists.
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    if path.parent == Path("."):
        packaged = recipes_dir() / name
        if packaged.is_file():
            return packaged
    raise ConfigError(
        f"recipe {str(path_or_name)!r}: no such file or packaged recipe; pass a TOML path or one "
        f"of: {', '.join(packaged_recipes())}"
    )


def recipes_dir() -> Path:
    """The packaged recipes: mtl_edge.recipes when installed, else the source tree's recipes/."""
    try:
        return Path(str(resources.files("mtl_edge.recipes")))
    except ModuleNotFoundError:  # an editable install that predates the recipes package
        return Path(__file__).resolve().parent.parent / "recipes"


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped in mtl_edge.recipes."""
    return sorted(p.name[:-5] for p in recipes_dir().glob("*.toml"))


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML file. Raises ConfigError on bad TOML or an unreadable file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """ "a.b=value" -> (["a", "b"], value); the value is TOML ("1e-3", "true", "[1, 5]",
    "'x'") or, when it does not parse as TOML, the plain string."""
    key, sep, text = item.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    if not sep or not all(keys):
        raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set pretrain.epochs=2")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return keys, value


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`doc` with every "a.b=value" set (tables created as needed); `doc` is not changed."""
    out = _deep_copy(doc)
    for item in overrides:
        keys, value = parse_override(item)
        table = out
        for k in keys[:-1]:
            nxt = table.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is a value, not a table")
            table = nxt
        table[keys[-1]] = value
    return out


def _deep_copy(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in doc.items()}


def load_config(
    cls: type[T], path_or_name: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """An instance of dataclass `cls` from a TOML recipe (or the defaults when None) and
    "key.sub=value" overrides.

    Raises:
        ConfigError: missing recipe, bad TOML, unknown key, wrong type (naming key and file).
    """
    if path_or_name is None:
        path, doc = None, {}
    else:
        path = recipe_path(path_or_name)
        doc = read_toml(path)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " with --set " + " ".join(overrides)
    return from_dict(cls, apply_overrides(doc, overrides), source)


def from_dict(cls: type[T], doc: Mapping[str, Any], source: str = "config") -> T:
    """An instance of dataclass `cls` from nested plain data (TOML tables), checked.

    Raises:
        ConfigError: unknown key or wrong type, naming the dotted key and `source`.
    """
    if isinstance(doc, cls):
        return doc
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a table for {cls.__name__}")
    return _build(cls, doc, "", source)


def _build(cls: type[T], doc: Mapping[str, Any], prefix: str, source: str) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(doc) - set(known))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]} in {where}; known: {', '.join(known)}"
        )
    values = {name: _convert(hints[name], doc[name], prefix + name, source) for name in doc}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """`value` checked against annotation `tp` (ints widen to float, lists to tuples)."""

    def wrong() -> ConfigError:
        return ConfigError(
            f"{source}: {key} = {value!r} has the wrong type; expected {_type_name(tp)}"
        )

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong()
        return _build(tp, value, key + ".", source)  # type: ignore[arg-type]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, source)
            except ConfigError:
                continue
        raise wrong()
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise wrong()
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        elif origin is tuple:
            if len(args) != len(value):
                raise wrong()
            items = [
                _convert(a, v, f"{key}[{i}]", source)
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        return _deep_copy(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise ConfigError(f"{source}: {key}: unsupported config type {_type_name(tp)}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain nested data (tuples become lists), TOML/JSON-able
    (None values are left out, TOML has no null)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {
                f.name: plain(getattr(v, f.name))
                for f in dataclasses.fields(v)
                if getattr(v, f.name) is not None
            }
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items() if x is not None}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(config)


def to_toml(doc: Mapping[str, Any]) -> str:
    """Plain nested data as TOML text (tables for mappings; values as TOML literals)."""
    lines: list[str] = []

    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(literal(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{ " + ", ".join(f"{_key(k)} = {literal(x)}" for k, x in v.items()) + " }"
        raise ConfigError(f"cannot write {v!r} as TOML")

    # top-level mappings are [tables]; mappings inside them are inline tables
    for k, v in doc.items():
        if not isinstance(v, Mapping):
            lines.append(f"{_key(k)} = {literal(v)}")
    for k, v in doc.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{_key(k)}]"] + [f"{_key(a)} = {literal(x)}" for a, x in v.items()]
    return "\n".join(lines).strip() + "\n"


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else f'"{k}"'
