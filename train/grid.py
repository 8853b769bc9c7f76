"""The N-way x K-shot evaluation grid (Eshratifar et al.): every model on the SAME seeded episodes
of unseen classes, each adapting the way its method adapts, mean accuracy with 95% intervals.

Adaptation kinds (the checkpoint's `adapt` entry; "centroid" for a checkpoint without one):

- "inner" (Reptile, MAML, joint) and "finetune" (transfer): a copy of the whole network with a
  fresh (ways, D) head (`head_init`: "zero", or "prototypes" of the support features) takes
  `steps` SGD steps at `lr` on random support batches of at most `batch_size` images
  (BatchNorm on batch statistics, as in training); the query is then classified with the
  running statistics (non-transductive).
- "centroid" (ProtoNet-style): features of the whole split are extracted once per model, the
  query is assigned to the nearest class mean (cosine).
- "mtl" (the SS method's FC base-learner, default for a meta-transfer checkpoint) and "logreg":
  the training stack's feature heads (`metatest.head_factories`) on features extracted once.

Settings the split cannot supply (fewer classes than ways, or fewer images per class than
shots + queries) are listed as skipped with the reason; 35-way needs the 36 val + test classes.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.atomicio import atomic_write_bytes
from mtl_edge.data.decode import decoded_images
from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.data.registry import data_root, open_split_spec
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, DatasetError, MtlEdgeError
from mtl_edge.preprocess import Preprocess
from mtl_edge.stats import paired_difference
from mtl_edge.train.joint import HEAD_INITS, feature_dim, initial_head
from mtl_edge.train.joint_train import ImageBank
from mtl_edge.train.metatest import confidence_interval

log = logging.getLogger(__name__)

DEFAULT_WAYS = (5, 20, 35)
DEFAULT_SHOTS = (1, 5, 100)
ADAPT_KINDS = ("inner", "finetune", "centroid", "mtl", "logreg")
#: Kinds that adapt a head on features extracted once (the backbone stays fixed).
FEATURE_KINDS = ("centroid", "mtl", "logreg")
#: `--adapt KEY=VALUE` keys and their types.
ADAPT_KEYS: dict[str, type] = {
    "kind": str,
    "steps": int,
    "lr": float,
    "batch_size": int,
    "head_init": str,
}


@dataclass
class GridModel:
    """One model of the grid.

    Attributes:
        name: the column title.
        backbone: a network with `forward_features` and `feature_dim`.
        preprocess: how its input images are made (size, mean, std).
        adapt: {"kind": one of ADAPT_KINDS, "steps": int, "lr": float, "batch_size": int,
            "head_init": "zero" | "prototypes"}.
    """

    name: str
    backbone: nn.Module
    preprocess: Preprocess
    adapt: dict[str, Any] = field(default_factory=lambda: {"kind": "centroid"})

    def __post_init__(self) -> None:
        kind = self.adapt.get("kind")
        if kind not in ADAPT_KINDS:
            raise ConfigError(f"model {self.name}: adapt kind {kind!r}; use {ADAPT_KINDS}")
        head_init = self.adapt.get("head_init", "zero")
        if head_init not in HEAD_INITS:
            raise ConfigError(f"model {self.name}: adapt head_init {head_init!r}; use {HEAD_INITS}")


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
    """The setting's episodes: a pure function of (seed, ways, shots, index)."""
    sampler = EpisodeSampler.for_split(
        split,
        setting.ways,
        setting.shots,
        queries,
        seed=seed * 1_000_003 + setting.ways * 1000 + setting.shots,
    )
    return sampler.episodes(count)


@torch.no_grad()
def extract_all(backbone: nn.Module, bank: ImageBank, batch: int = 500) -> torch.Tensor:
    """Eval-mode features of every image of the bank, shape (N, D), on the CPU."""
    backbone.eval()
    parts = [
        backbone(bank(np.arange(i, min(i + batch, len(bank))))).cpu()
        for i in range(0, len(bank), batch)
    ]
    return torch.cat(parts)


def centroid_accuracy(features: torch.Tensor, ep: Episode) -> float:
    """Cosine nearest-centroid accuracy (%) of one episode given features of shape (N, D)."""
    s = F.normalize(features[torch.as_tensor(ep.support)], dim=1)
    q = F.normalize(features[torch.as_tensor(ep.query)], dim=1)
    centroids = F.normalize(s.view(ep.ways, ep.shots, -1).mean(1), dim=1)
    pred = (q @ centroids.T).argmax(1)
    return float((pred == torch.as_tensor(ep.query_labels())).float().mean() * 100)


def head_accuracy(model: nn.Module, kind: str, features: torch.Tensor, ep: Episode) -> float:
    """Accuracy (%) of the training stack's feature head `kind` ("mtl": the FC base-learner,
    "logreg") fitted on the support features; features of shape (N, D)."""
    from mtl_edge.train.metatest import head_factories

    head = head_factories(model, [kind])[kind]()
    head.fit(features[torch.as_tensor(ep.support)], torch.as_tensor(ep.support_labels()))
    pred = head.predict(features[torch.as_tensor(ep.query)]).argmax(1)
    return float((pred == torch.as_tensor(ep.query_labels())).float().mean() * 100)


def finetune_accuracy(
    backbone: nn.Module, bank: ImageBank, ep: Episode, adapt: dict[str, Any], seed: int
) -> float:
    """Accuracy (%) after SGD on the support set of a copy of the network (on the bank's
    device) with a fresh head."""
    model = copy.deepcopy(backbone)
    model.train()
    steps, lr = int(adapt.get("steps", 10)), float(adapt.get("lr", 0.01))
    batch = int(adapt.get("batch_size", 128))
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    x_all, y_all = ep.support, torch.as_tensor(ep.support_labels(), device=device)
    y_query = torch.as_tensor(ep.query_labels(), device=device)

    def support_features() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(bank(x_all[i : i + 500])) for i in range(0, len(x_all), 500)])

    kind = str(adapt.get("head_init", "zero"))
    w, b = initial_head(kind, support_features, y_all, ep.ways, feature_dim(model), params[0])
    head = (w.detach().requires_grad_(True), b.detach().requires_grad_(True))
    opt = torch.optim.SGD(params + list(head), lr=lr)
    gen = np.random.default_rng(seed)
    for _ in range(steps):
        pick = gen.permutation(len(x_all))[:batch]
        logits = F.linear(model(bank(x_all[pick])), head[0], head[1])
        loss = F.cross_entropy(logits, y_all[torch.as_tensor(pick, device=device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ep.query), 500):
            q = ep.query[i : i + 500]
            pred = F.linear(model(bank(q)), head[0], head[1]).argmax(1)
            correct += int((pred == y_query[i : i + 500]).sum())
    return 100.0 * correct / len(ep.query)


def evaluate_grid(
    models: Sequence[GridModel],
    split: ImageSplit,
    ways: Sequence[int] = DEFAULT_WAYS,
    shots: Sequence[int] = DEFAULT_SHOTS,
    episodes: int = 20,
    queries: int = 15,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Evaluate every model on every supplied (N, K) of the grid, on the same episodes.
    Networks and images go to `device`; the feature heads run on the CPU.

    Returns:
        {"split", "seed", "episodes", "queries", "models", "results": [{"ways", "shots",
        "model", "mean", "ci95", "episodes"}], "skipped": [{"ways", "shots", "reason"}]}.

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
    banks: dict[tuple[int, str, tuple[float, ...], tuple[float, ...]], ImageBank] = {}
    results = []
    for m in models:
        pp = m.preprocess
        key = (pp.size, pp.color_mode, tuple(pp.mean), tuple(pp.std))
        if key not in banks:
            banks[key] = ImageBank(decoded_images(split, pp.size, cache_dir), pp, device)
        bank = banks[key]
        m.backbone.to(device)
        kind = m.adapt["kind"]
        features = extract_all(m.backbone, bank) if kind in FEATURE_KINDS else None
        for s in runnable:
            accs = []
            for i, ep in enumerate(episodes_for(split, s, queries, episodes, seed)):
                if kind == "centroid" and features is not None:
                    accs.append(centroid_accuracy(features, ep))
                elif features is not None:
                    accs.append(head_accuracy(m.backbone, kind, features, ep))
                else:
                    accs.append(finetune_accuracy(m.backbone, bank, ep, m.adapt, seed + i))
            mean, ci = confidence_interval(accs)
            log.info("%s %d-way %d-shot: %.2f +- %.2f", m.name, s.ways, s.shots, mean, ci)
            results.append(
                {
                    "ways": s.ways,
                    "shots": s.shots,
                    "model": m.name,
                    "mean": mean,
                    "ci95": ci,
                    "episodes": len(accs),
                    "accuracies": [round(a, 4) for a in accs],
                }
            )
    return {
        "split": split.name,
        "classes": split.num_classes,
        "seed": seed,
        "episodes": episodes,
        "queries": queries,
        "models": [{"name": m.name, "adapt": m.adapt} for m in models],
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
        for other, reference in accs.items():
            if other != subject and subject in accs:
                mean, ci = paired_difference(reference, accs[subject])
                out.append(
                    {
                        "ways": ways,
                        "shots": shots,
                        "model": subject,
                        "versus": other,
                        "mean": mean,
                        "ci95": ci,
                    }
                )
    return out


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per setting, one column per model, "mean +- ci95" (%)."""
    names = [m["name"] for m in report["models"]]
    cells: dict[tuple[int, int], dict[str, str]] = {}
    for r in report["results"]:
        cells.setdefault((r["ways"], r["shots"]), {})[r["model"]] = (
            f"{r['mean']:.1f} +- {r['ci95']:.1f}"
        )
    width = max([14] + [len(n) + 2 for n in names])
    lines = ["setting".ljust(16) + "".join(n.rjust(width) for n in names)]
    for (n, k), row in cells.items():
        lines.append(
            f"{n}-way {k}-shot".ljust(16) + "".join(row.get(x, "-").rjust(width) for x in names)
        )
    differences = report.get("differences") or []
    if differences:
        versus = list(dict.fromkeys(d["versus"] for d in differences))
        subject = differences[0]["model"]
        lines.append(f"paired difference, {subject} minus (same episodes):")
        pairs: dict[tuple[int, int], dict[str, str]] = {}
        for d in differences:
            pairs.setdefault((d["ways"], d["shots"]), {})[d["versus"]] = (
                f"{d['mean']:+.1f} +- {d['ci95']:.1f}"
            )
        lines.append("".ljust(16) + "".join(v.rjust(width) for v in versus))
        for (n, k), row in pairs.items():
            lines.append(
                f"{n}-way {k}-shot".ljust(16)
                + "".join(row.get(v, "-").rjust(width) for v in versus)
            )
    for s in report["skipped"]:
        lines.append(f"skipped {s['reason']}")
    lines.append(
        f"{report['split']} ({report['classes']} classes), seed {report['seed']}, "
        f"{report['episodes']} episodes x {report['queries']} queries per class"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Checkpoints and splits


def load_grid_model(path: str | Path) -> GridModel:
    """A grid model from a self-describing checkpoint: its `adapt` entry, else the FC
    base-learner ("mtl") for a meta-transfer (SS) checkpoint and "centroid" for any other.

    Raises:
        MtlEdgeError: unreadable or not a backbone checkpoint.
    """
    from mtl_edge.train.backbones import create_backbone

    path = Path(path)
    if not path.is_file():
        raise MtlEdgeError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of every kind
        raise MtlEdgeError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise MtlEdgeError(f"{path}: not an mtl-edge checkpoint; pass a file from `mtl-edge train`")
    model = create_backbone(ckpt["model"], **dict(ckpt.get("model_args", {})))
    ss = any(k.endswith("ss_scale") for k in ckpt["state_dict"])
    if ss:
        from mtl_edge.train.ss import convert_to_ss

        model = convert_to_ss(
            model, shortcut=bool(ckpt.get("model_args", {}).get("ss_shortcut", True))
        )
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise MtlEdgeError(
            f"{path}: weights do not fit {ckpt['model']!r} ({str(e)[:100]})"
        ) from None
    name = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
    adapt = dict(ckpt.get("adapt") or {"kind": "mtl" if ss else "centroid"})
    return GridModel(name, model.eval(), Preprocess.from_dict(ckpt["preprocess"]), adapt)


def open_eval_split(dataset: str, root: str | Path | None, split: str) -> ImageSplit:
    """ "test", "val", "val+test" (the paper's 36 unseen classes) or any `open_split_spec`
    (e.g. "test+train[44:]" when training used "train[:44]").

    Raises:
        DatasetError: a malformed spec, or a missing split folder.
    """
    base = None if dataset == "synthetic" else Path(root) if root else data_root() / "miniimagenet"
    return open_split_spec(dataset, base, split)


def parse_adapt_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["kind=centroid", "steps=20"]` -> {"kind": "centroid", "steps": 20}.

    Raises:
        ConfigError: not KEY=VALUE, an unknown key, or a value of the wrong type.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ADAPT_KEYS:
            raise ConfigError(
                f"--adapt {item!r}: use KEY=VALUE with KEY one of {', '.join(ADAPT_KEYS)}"
            )
        try:
            out[key] = ADAPT_KEYS[key](value)
        except ValueError:
            raise ConfigError(
                f"--adapt {item!r}: {key} takes a {ADAPT_KEYS[key].__name__}"
            ) from None
    return out


def evaluate_grid_cli(
    checkpoint: str | Path | Sequence[str | Path],
    data_root: str | Path | None,
    dataset: str,
    split: str,
    ways: Sequence[int] | None,
    shots: Sequence[int] | None,
    episodes: int,
    seed: int,
    as_json: bool,
    out: str | Path | None = None,
    queries: int = 15,
    adapt: Sequence[str] = (),
    device: str = "auto",
) -> dict[str, Any]:
    """`mtl-edge train evaluate --grid`: print the table (or JSON) and write the JSON report to
    `out` (default: grid-<split>-seed<seed>.json beside the first checkpoint). `adapt` items
    (KEY=VALUE) override every model's adaptation, e.g. "kind=centroid" or "steps=20".
    `device`: "auto" (CUDA when present), "cpu" or "cuda[:i]"."""
    from mtl_edge.train.torchdata import parse_device

    dev = parse_device(device, "--device")
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    overrides = parse_adapt_overrides(adapt)
    models = [load_grid_model(p) for p in paths]
    models = [GridModel(m.name, m.backbone, m.preprocess, {**m.adapt, **overrides}) for m in models]
    eval_split = open_eval_split(dataset, data_root, split)
    report = evaluate_grid(
        models,
        eval_split,
        ways or DEFAULT_WAYS,
        shots or DEFAULT_SHOTS,
        episodes,
        queries,
        seed,
        device=dev,
    )
    target = Path(out) if out else Path(paths[0]).parent / f"grid-{split}-seed{seed}.json"
    atomic_write_bytes(target, (json.dumps(report, indent=2) + "\n").encode())
    print(json.dumps(report, indent=2) if as_json else format_table(report))
    return report
