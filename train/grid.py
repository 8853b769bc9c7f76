"""The N-way x K-shot evaluation grid (Eshratifar et al.): every model on the SAME seeded episodes
of unseen classes, each adapting the way its method adapts, mean accuracy with 95% intervals.

Episodes of a setting are `EpisodeSampler.for_split(split, ways, shots, queries, seed)`, the
same list meta-test and `bench accuracy` draw for that setting and seed. Every model runs
through the one evaluation loop (`mtl_edge.fewshot.evaluate.evaluate_episodes`) with its
adaptation (the checkpoint's deploy section, `adapt`; "centroid" when it has none):

- "inner" (Reptile, MAML, joint) and "finetune" (transfer): the image head
  `mtl_edge.train.finetune.FinetuneHead` with a fresh (ways, D) head (`head_init`: "zero", or
  "prototypes" of the support features) and `steps` SGD steps at `lr` on random support batches
  of at most `batch_size` images (BatchNorm on batch statistics, as in training); the query is
  then classified with the running statistics (non-transductive);
- "centroid" (ProtoNet-style, cosine), "mtl" (the SS method's FC base-learner with the
  checkpoint's head recipe) and "logreg": the few-shot core's feature heads on features
  extracted once per model.

Settings the split cannot supply (fewer classes than ways, or fewer images per class than
shots + queries) are listed as skipped with the reason; 35-way needs the 36 val + test classes.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl_edge.atomicio import atomic_write_json
from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.data.registry import data_root, open_split_spec
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.fewshot.evaluate import EvalResult, evaluate_episodes
from mtl_edge.fewshot.heads import HeadFactory, feature_head
from mtl_edge.settings import apply_overrides, from_dict
from mtl_edge.train.checkpoint import LoadedCheckpoint, load_checkpoint
from mtl_edge.train.finetune import FinetuneHead
from mtl_edge.train.gpu_data import DeviceDataset
from mtl_edge.train.metatest import EvalModel, extract_features
from mtl_edge.train.stage_config import TASK_HEAD_INITS

log = logging.getLogger(__name__)

DEFAULT_WAYS = (5, 20, 35)
DEFAULT_SHOTS = (1, 5, 100)
ADAPT_KINDS = ("inner", "finetune", "centroid", "mtl", "logreg")
#: Kinds that adapt a head on features extracted once (the backbone stays fixed).
FEATURE_KINDS = ("centroid", "mtl", "logreg")


@dataclass
class Adapt:
    """How a grid model adapts to a task (a checkpoint's deploy `adapt`, or `--adapt K=V`).

    Attributes:
        kind: one of ADAPT_KINDS.
        steps, lr, batch_size, head_init: the image head's SGD (inner / finetune kinds).
    """

    kind: str = "centroid"
    steps: int = 10
    lr: float = 0.01
    batch_size: int = 128
    head_init: str = "zero"

    def __post_init__(self) -> None:
        if self.kind not in ADAPT_KINDS:
            raise ConfigError(f"adapt kind={self.kind!r}: use one of {', '.join(ADAPT_KINDS)}")
        if self.head_init not in TASK_HEAD_INITS:
            raise ConfigError(
                f"adapt head_init={self.head_init!r}: use one of {', '.join(TASK_HEAD_INITS)}"
            )


@dataclass
class GridModel:
    """One model of the grid: a column title, the model (a loaded checkpoint: backbone,
    preprocessing, head recipe, meta-learned init) and its adaptation."""

    name: str
    model: EvalModel
    adapt: Adapt = field(default_factory=Adapt)


def grid_model(loaded: LoadedCheckpoint, overrides: Sequence[str] = ()) -> GridModel:
    """A grid model from a checkpoint: its deploy `adapt`, with `--adapt KEY=VALUE` overrides.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    doc = apply_overrides(loaded.adapt, overrides, "--adapt", "kind=centroid")
    return GridModel(loaded.name, loaded, from_dict(Adapt, doc, f"{loaded.path} adapt"))


@dataclass
class GridSetting:
    """One cell row: N ways, K shots; `reason` is set when the split cannot supply it."""

    ways: int
    shots: int
    reason: str = ""


def plan_settings(
    split: ImageSplit, ways: Sequence[int], shots: Sequence[int], queries: int
) -> list[GridSetting]:
    """Every (N, K) pair, with the reason it is skipped when the split cannot supply it."""
    out = []
    for n in ways:
        for k in shots:
            try:
                split.require(n, k + queries)
                EpisodeSampler.for_split(split, n, k, queries)
                out.append(GridSetting(n, k))
            except DatasetError as e:
                out.append(GridSetting(n, k, f"{n}-way {k}-shot: {e}"))
    return out


def episodes_for(
    split: ImageSplit, setting: GridSetting, queries: int, count: int, seed: int
) -> list[Episode]:
    """The setting's episodes: episodes 0..count-1 of seed `seed` for (ways, shots, queries)."""
    sampler = EpisodeSampler.for_split(split, setting.ways, setting.shots, queries, seed)
    return sampler.episodes(count)


def _heads(m: GridModel, seed: int) -> dict[str, HeadFactory]:
    """The model's head factory; image heads draw their support batches from seed + i for
    episode i (the factory is called once per episode, in order)."""
    a, loaded = m.adapt, m.model
    if a.kind in FEATURE_KINDS:
        return {m.name: feature_head(a.kind, loaded.head, loaded.meta_init)}
    counter = itertools.count(seed)
    return {
        m.name: lambda: FinetuneHead(
            loaded.backbone, a.steps, a.lr, 0.0, a.batch_size, "train", a.head_init, next(counter)
        )
    }


def evaluate_grid(
    models: Sequence[GridModel],
    split: ImageSplit,
    ways: Sequence[int] = DEFAULT_WAYS,
    shots: Sequence[int] = DEFAULT_SHOTS,
    episodes: int = 20,
    queries: int = 15,
    seed: int = 0,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate every model on every supplied (N, K) of the grid, on the same episodes.
    Networks and images go to `device`; the feature heads run on the CPU.

    Returns:
        {"split", "classes", "seed", "episodes", "queries", "models", "results": [{"ways",
        "shots", "model", "mean", "ci95", "episodes", "accuracies"}], "differences": [...],
        "skipped": [{"ways", "shots", "reason"}]}.

    Raises:
        DatasetError: no setting of the grid can be supplied by the split.
        ConfigError: no models, or episodes < 1.
    """
    if not models:
        raise ConfigError("grid: give at least one checkpoint")
    if episodes < 1:
        raise ConfigError(f"grid episodes={episodes}: must be >= 1")
    settings = plan_settings(split, ways, shots, queries)
    runnable = [s for s in settings if not s.reason]
    if not runnable:
        raise DatasetError(
            f"grid: {split.name} supplies none of the settings ({settings[0].reason})"
        )
    results = []
    datasets: dict[str, DeviceDataset] = {}  # models with one preprocessing share one decode
    for m in models:
        key = json.dumps(m.model.preprocess.to_dict(), sort_keys=True)
        if key not in datasets:
            datasets[key] = DeviceDataset.from_split(
                split, m.model.preprocess, device, cache_dir=cache_dir
            )
        data = datasets[key]
        backbone = m.model.backbone.to(device)
        inputs: Any = data.eval_batch
        if m.adapt.kind in FEATURE_KINDS:
            inputs = extract_features(
                backbone, data.eval_batch, len(split), 500, device, split.name
            )
        for s in runnable:
            res = evaluate_episodes(
                inputs,
                split.labels,
                episodes_for(split, s, queries, episodes, seed),
                _heads(m, seed),
            )[m.name]
            log.info("%s %d-way %d-shot: %.2f +- %.2f", m.name, s.ways, s.shots, res.mean, res.ci95)
            results.append({"ways": s.ways, "shots": s.shots, "model": m.name} | res.to_dict(True))
    return {
        "split": split.name,
        "classes": split.num_classes,
        "seed": seed,
        "episodes": episodes,
        "queries": queries,
        "models": [{"name": m.name, "adapt": asdict(m.adapt)} for m in models],
        "results": results,
        "differences": paired_differences(results, models[-1].name),
        "skipped": [
            {"ways": s.ways, "shots": s.shots, "reason": s.reason} for s in settings if s.reason
        ],
    }


def paired_differences(results: list[dict[str, Any]], subject: str) -> list[dict[str, Any]]:
    """`subject` minus every other model, per setting, over the same episodes.

    Pairing removes the episode-to-episode variance both models share, so these intervals are
    much narrower than those of the accuracies themselves.

    Returns:
        [{"ways", "shots", "model": subject, "versus", "mean", "ci95"}] (accuracy points).
    """
    by_setting: dict[tuple[int, int], dict[str, list[float]]] = {}
    for r in results:
        by_setting.setdefault((r["ways"], r["shots"]), {})[r["model"]] = r["accuracies"]
    out = []
    for (ways, shots), accs in by_setting.items():
        if subject not in accs:
            continue
        mine = EvalResult.from_accuracies(accs[subject])
        for other, reference in accs.items():
            if other != subject:
                mean, ci = mine.minus(EvalResult.from_accuracies(reference))
                out.append(
                    {"ways": ways, "shots": shots, "model": subject, "versus": other}
                    | {"mean": mean, "ci95": ci}
                )
    return out


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per setting, one column per model, "mean +- ci95" (%)."""
    names = [m["name"] for m in report["models"]]
    width = max([14] + [len(n) + 2 for n in names])
    lines = ["setting".ljust(16) + "".join(n.rjust(width) for n in names)]
    lines += _rows(report["results"], "model", names, width, "{mean:.1f} +- {ci95:.1f}")
    differences = report.get("differences") or []
    if differences:
        versus = list(dict.fromkeys(d["versus"] for d in differences))
        lines.append(f"paired difference, {differences[0]['model']} minus (same episodes):")
        lines.append("".ljust(16) + "".join(v.rjust(width) for v in versus))
        lines += _rows(differences, "versus", versus, width, "{mean:+.1f} +- {ci95:.1f}")
    lines += [f"skipped {s['reason']}" for s in report["skipped"]]
    lines.append(
        f"{report['split']} ({report['classes']} classes), seed {report['seed']}, "
        f"{report['episodes']} episodes x {report['queries']} queries per class"
    )
    return "\n".join(lines)


def _rows(
    entries: list[dict[str, Any]], column: str, columns: list[str], width: int, fmt: str
) -> list[str]:
    cells: dict[tuple[int, int], dict[str, str]] = {}
    for r in entries:
        cells.setdefault((r["ways"], r["shots"]), {})[r[column]] = fmt.format(**r)
    return [
        f"{n}-way {k}-shot".ljust(16) + "".join(row.get(c, "-").rjust(width) for c in columns)
        for (n, k), row in cells.items()
    ]


def run_grid(
    checkpoints: Sequence[str | Path],
    dataset: str,
    root: str | Path | None,
    split: str,
    ways: Sequence[int] = DEFAULT_WAYS,
    shots: Sequence[int] = DEFAULT_SHOTS,
    episodes: int = 20,
    queries: int = 15,
    seed: int = 0,
    adapt: Sequence[str] = (),
    device: torch.device | str = "cpu",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """`mtl-edge train evaluate --grid`: load the checkpoints (`--adapt KEY=VALUE` overrides
    every model's adaptation), open the split spec ("test", "val+test", "test+train[44:]";
    the data root defaults to `data_root()/miniimagenet`), evaluate, and write the JSON report
    to `out` (default: grid-<split>-seed<seed>.json beside the first checkpoint).

    Returns:
        the report (see `evaluate_grid`).
    """
    models = [grid_model(load_checkpoint(p), adapt) for p in checkpoints]
    base = None if dataset == "synthetic" else Path(root) if root else data_root() / "miniimagenet"
    report = evaluate_grid(
        models, open_split_spec(dataset, base, split), ways, shots, episodes, queries, seed, device
    )
    target = Path(out) if out else Path(checkpoints[0]).parent / f"grid-{split}-seed{seed}.json"
    atomic_write_json(target, report)
    return report
