"""The recipe: one typed tree of dataclasses for every stage, read from one TOML file.

A recipe (recipes/*.toml) has the tables data, model, pretrain, meta, hard_tasks, joint, eval,
export, pipeline, head and runtime; every stage reads the tables it needs from the same `Recipe`
(pre-training, meta-transfer, the joint method, meta-test, export, the pipeline and the demo).
`load_recipe(name_or_path, overrides)` reads a TOML path or a packaged recipe by name and
applies `--set key.sub=value` overrides (`mtl_edge.settings`: one parser for every command).
Every table validates itself when it is built, so an unusable value fails as one line naming
the key and the file before any work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mtl_edge.data.registry import KINDS
from mtl_edge.errors import ConfigError, MtlEdgeError
from mtl_edge.preprocess import Preprocess
from mtl_edge.settings import (
    apply_overrides,
    from_dict,
    read_toml,
    require,
    require_at_least,
    require_one_of,
    require_positive,
)
from mtl_edge.train.stage_config import (
    HardTaskConfig,
    JointConfig,
    MetaConfig,
    PretrainConfig,
)

#: Meta-test heads: the feature heads of `mtl_edge.fewshot.heads` and the image head.
EVAL_HEADS = ("mtl", "mtl-paper", "centroid", "centroid-euclidean", "logreg", "finetune")


@dataclass
class DataConfig:
    """Where the images come from (`mtl_edge.data.registry.open_split_spec`).

    Attributes:
        kind: dataset layout ("folders", "omniglot", "synthetic", ...).
        root: dataset folder; "" means `mtl_edge.data.registry.data_root()` / `default_subdir`.
            Ignored for "synthetic".
        default_subdir: folder under the data root when `root` is empty.
        options: reader options (color_mode, val_alphabets, rotations, size, ...).
        train_split, val_split, test_split: split specs ("train", "train[:44]", "val+test").
        per_class: use the first N images of every training class (0: all).
        cache_dir: folder for decoded splits ("": $MTL_EDGE_CACHE/decoded, or memory only).
    """

    kind: str = "synthetic"
    root: str = ""
    default_subdir: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    per_class: int = 0
    cache_dir: str = ""

    def __post_init__(self) -> None:
        require_one_of("data", "kind", self.kind, KINDS)
        require_at_least("data", self, ["per_class"], 0)


@dataclass
class ModelConfig:
    """The backbone (`mtl_edge.train.backbones.create_backbone(backbone, **args)`) and its
    preprocessing (`mtl_edge.preprocess.Preprocess` fields)."""

    backbone: str = "conv4"
    args: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pre = self.input_preprocess
        in_channels = int(self.args.get("in_channels", 3))
        require(
            in_channels == pre.channels,
            f"model.args.in_channels={in_channels} but model.preprocess.color_mode="
            f"{pre.color_mode!r} gives {pre.channels} channel(s); make them agree",
        )

    @property
    def input_preprocess(self) -> Preprocess:
        """The `Preprocess` of the [model] table."""
        try:
            return Preprocess.from_dict(dict(self.preprocess))
        except MtlEdgeError as e:
            raise ConfigError(f"model.preprocess: {e}") from None


@dataclass
class EvalConfig:
    """The meta-test protocol (`mtl-edge train evaluate`, the pipeline's metatest stage):
    `episodes` seeded episodes of `ways` classes per shot count, `queries` per class, every
    head on the same episodes; the fine-tune-everything head ("finetune") on the first
    `ft_episodes` of them (each is a fine-tuning run of the whole backbone: `ft_steps` SGD
    steps at `ft_lr`, `mtl_edge.train.finetune.FinetuneHead`)."""

    ways: int = 5
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    episodes: int = 600
    heads: tuple[str, ...] = ("mtl", "centroid", "logreg")
    seed: int = 0
    ft_episodes: int = 200
    ft_steps: int = 100
    ft_lr: float = 0.01

    def __post_init__(self) -> None:
        require_at_least("eval", self, ["ways"], 2)
        require_at_least("eval", self, ["queries", "episodes", "ft_episodes"], 1)
        require_at_least("eval", self, ["ft_steps"], 0)
        require_positive("eval", self, ["ft_lr"])
        require(
            bool(self.shots) and min(self.shots) >= 1,
            f"eval.shots={list(self.shots)}: use shot counts >= 1",
        )
        unknown = [h for h in self.heads if h not in EVAL_HEADS and h not in ("fc", "ft")]
        require(not unknown, f"eval.heads: {unknown} unknown; use some of {', '.join(EVAL_HEADS)}")


@dataclass
class ExportConfig:
    """What the pipeline's export stage (and the demo) writes besides the FP32 backbone;
    the fields of `mtl_edge.export.api.ExportOptions` a recipe may set."""

    int8: bool = True
    fp16: bool = False
    calib_images: int = 300
    parity_episodes: int = 200
    quant_episodes: int = 600
    eval_per_class: int = 30

    def __post_init__(self) -> None:
        require_at_least("export", self, ["calib_images", "parity_episodes", "quant_episodes"], 1)
        require_at_least("export", self, ["eval_per_class"], 1)


@dataclass
class PipelineConfig:
    """The pipeline's own settings (`mtl_edge.workflows.pipeline`).

    Attributes:
        with_and_without_ht: also meta-test the meta-model trained without HT when the meta
            stage trained both.
        bench_precisions: the bundle variants the bench stage compares (fp32 first).
        bench_episodes: episodes of the bench stage (0: eval.episodes).
        flops_reference: measure a dense matrix rate for the FLOP/s report.
    """

    with_and_without_ht: bool = True
    bench_precisions: tuple[str, ...] = ("fp32", "int8-cpu")
    bench_episodes: int = 0
    flops_reference: bool = True

    def __post_init__(self) -> None:
        require_at_least("pipeline", self, ["bench_episodes"], 0)


@dataclass
class HeadConfig:
    """The head the device fits on enrolled features and meta-test and validation run (the
    checkpoint's deploy head, `mtl_edge.fewshot.fc.HeadRecipe`). Unset keys follow [meta]
    (test_steps, inner_lr, normalize, inner_weight_decay, inner_loss) and init "meta"; e.g. a
    tuned test-time head: init "imprint" (rows = L2-normalised class means) on normalised
    features, which fits any number of classes."""

    steps: int | None = None
    lr: float | None = None
    init: str | None = None
    normalize: bool | None = None
    weight_decay: float | None = None
    loss: str | None = None


@dataclass
class RuntimeConfig:
    """Where and how it runs.

    Attributes:
        seed: seeds torch, numpy and the samplers; threads: torch CPU threads (0: default).
        device: "auto" (CUDA when present), "cpu" or "cuda[:i]".
        amp: autocast "auto" (bf16 where the GPU or CPU has bf16 units, else FP32), "bf16",
            "fp16" (CUDA) or "none" (`mtl_edge.train.precision`).
        channels_last: "auto" (with bf16/fp16 autocast), true or false.
        compile: torch.compile the backbone in pre-training and meta-transfer (off: it did not
            pay on the CPU; the GPU recipe turns it on).
        progress: rich progress bars ("auto" = only on a TTY, "on", "off").
        time_budget: wall time of the whole recipe, e.g. "100m" or "1h30m" ("" = none); stages
            get `pretrain_share` and the rest (`mtl_edge.train.budget`).
        save: "epoch" (best.pt and last.pt after every epoch: a stopped run resumes) or "end"
            (once, when the stage ends: the best epoch is kept in memory until then; for a
            job that cannot resume anyway, such as one GPU lease).
    """

    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | str = "auto"
    compile: bool = False
    threads: int = 0
    progress: str = "auto"
    time_budget: str = ""
    pretrain_share: float = 0.6
    save: str = "epoch"

    def __post_init__(self) -> None:
        require_one_of("runtime", "amp", self.amp, ("auto", "none", "bf16", "fp16"))
        require_one_of("runtime", "progress", self.progress, ("auto", "on", "off"))
        require_one_of("runtime", "save", self.save, ("epoch", "end"))
        require(
            self.channels_last in (True, False, "auto"),
            f"runtime.channels_last={self.channels_last!r}: use auto, true or false",
        )
        require_at_least("runtime", self, ["threads"], 0)
        require(
            0 < self.pretrain_share < 1,
            f"runtime.pretrain_share={self.pretrain_share}: need 0 < share < 1",
        )


@dataclass
class Recipe:
    """A whole recipe: the tables of a recipes/*.toml file."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    hard_tasks: HardTaskConfig = field(default_factory=HardTaskConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def recipes_dir() -> Path:
    """The packaged recipes (`mtl_edge.recipes`, the source tree's recipes/ folder)."""
    return Path(str(resources.files("mtl_edge.recipes")))


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped in mtl_edge.recipes."""
    return sorted(p.name[:-5] for p in recipes_dir().glob("*.toml"))


def recipe_path(path_or_name: str | Path) -> Path:
    """A recipe file: an existing path, else a packaged recipe by name (".toml" optional).

    Raises:
        ConfigError: neither exists.
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    if path.parent == Path(".") and (recipes_dir() / name).is_file():
        return recipes_dir() / name
    raise ConfigError(
        f"recipe {str(path_or_name)!r}: no such file or packaged recipe; pass a TOML path or one "
        f"of: {', '.join(packaged_recipes())}"
    )


def recipe_source(path_or_name: str | Path | None, overrides: Sequence[str] = ()) -> str:
    """How messages and run records name a recipe: its file and the --set overrides."""
    source = str(recipe_path(path_or_name)) if path_or_name is not None else "defaults"
    return source + "".join(f" --set {o}" for o in overrides)


def load_recipe(path_or_name: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """The `Recipe` of a TOML file or packaged recipe (defaults when None), with "key.sub=value"
    overrides applied.

    Raises:
        ConfigError: missing recipe, bad TOML, unknown key, wrong type or unusable value (one
            line naming the key and the file).
    """
    doc = {} if path_or_name is None else read_toml(recipe_path(path_or_name))
    return from_dict(
        Recipe, apply_overrides(doc, overrides), recipe_source(path_or_name, overrides)
    )


def as_recipe(recipe: Recipe | dict[str, Any], source: str = "recipe") -> Recipe:
    """A `Recipe` from itself or from plain recipe tables (e.g. a checkpoint's "config")."""
    return from_dict(Recipe, recipe, source)
