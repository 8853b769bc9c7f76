"""Meta-test: several heads on the same frozen features and the same seeded episodes.

Features of the whole split are extracted once (the backbone is frozen at meta-test), then every
feature head (`mtl_edge.train.heads`) runs on the same episode list, so head differences are
paired. Episodes come from `mtl_edge.data.episodes.EpisodeSampler` (episode i is a pure function
of (seed, i)); the default protocol is 2000 episodes with 15 queries per class. Accuracies are
reported in percent with a 95% interval 1.96 * std / sqrt(n), std with ddof=0 as in the official
code (with n = 2000 the difference to ddof=1 is 0.025% of the interval).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, DatasetError, UnavailableError
from mtl_edge.preprocess import Preprocess, preprocess_image
from mtl_edge.train.heads import (
    HeadFactory,
    LogisticRegressionHead,
    MTLHead,
    NearestCentroidHead,
    finetune_everything,
)

log = logging.getLogger(__name__)

#: Heads `meta_test` knows by name; "finetune" (fine-tune everything, alias "ft") needs images
#: and is slow.
HEAD_NAMES = ("mtl", "centroid", "centroid-euclidean", "logreg", "finetune")
_ALIASES = {"ft": "finetune"}


def confidence_interval(accuracies: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the 95% interval) = (mean, 1.96 * std / sqrt(n)), std with ddof=0.

    Raises:
        ValueError: no accuracies.
    """
    a = np.asarray(accuracies, dtype=np.float64)
    if a.size == 0:
        raise ValueError("confidence_interval of no accuracies")
    return float(a.mean()), float(1.96 * a.std() / np.sqrt(a.size))


@dataclass
class EvalResult:
    """Accuracy of one head over an episode list, in percent.

    Attributes:
        mean: mean accuracy; ci95: half-width of the 95% interval; accuracies: per episode.
    """

    mean: float
    ci95: float
    accuracies: list[float]

    @classmethod
    def from_accuracies(cls, accuracies: Sequence[float]) -> EvalResult:
        mean, half = confidence_interval(accuracies)
        return cls(mean, half, [float(a) for a in accuracies])

    def to_dict(self, with_accuracies: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_accuracies:
            d.pop("accuracies")
        d["episodes"] = len(self.accuracies)
        return d


def _progress() -> Progress:
    return Progress(disable=not sys.stderr.isatty(), transient=True)


def feature_module(model: nn.Module) -> nn.Module:
    """The backbone of `model` (a backbone, or a learner's `encoder`)."""
    inner = getattr(model, "encoder", model)
    if not hasattr(inner, "forward_features"):
        raise ConfigError(f"{type(model).__name__} has no forward_features; pass a backbone")
    return inner


@torch.no_grad()
def extract_features(
    model: nn.Module,
    split: ImageSplit,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    cfg: Preprocess | None = None,
    load: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> np.ndarray:
    """Features of every image of `split`, float32 of shape (len(split), D), in eval mode.

    Images come from `load(indices) -> (n, C, H, W)` when given, else each is decoded with
    `split.image(i)` and `preprocess_image(img, cfg)` exactly as the device does. The model must
    already be on `device`; batches are moved there.

    Raises:
        UnavailableError: a CUDA device asked for on a machine without CUDA.
    """
    if load is None and cfg is None:
        raise ValueError("extract_features needs a Preprocess cfg or a load function")
    require_device(device)

    def default_load(idx: np.ndarray) -> torch.Tensor:
        assert cfg is not None
        return torch.from_numpy(np.stack([preprocess_image(split.image(int(i)), cfg) for i in idx]))

    load_fn = load or default_load
    net = feature_module(model)
    was_training = net.training
    net.eval()
    out: list[np.ndarray] = []
    try:
        with _progress() as progress:
            task = progress.add_task(f"features {split.name}", total=len(split))
            for start in range(0, len(split), batch_size):
                idx = np.arange(start, min(start + batch_size, len(split)))
                x = load_fn(idx).to(device)
                out.append(net.forward_features(x).float().cpu().numpy())  # type: ignore[operator]
                progress.advance(task, len(idx))
    finally:
        net.train(was_training)
    if not out:
        raise DatasetError(f"{split.name}: no images to extract features from")
    return np.concatenate(out)


def require_device(device: torch.device | str) -> None:
    """Raise UnavailableError when `device` is a CUDA device and CUDA is not available."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError(
            f"device {str(device)!r}: CUDA is not available here (torch "
            f"{torch.__version__}); use --device cpu or a CUDA build of torch"
        )


def _check_episode(e: Episode, labels: np.ndarray) -> None:
    if not (
        np.array_equal(labels[e.support], np.repeat(e.classes, e.shots))
        and np.array_equal(labels[e.query], np.repeat(e.classes, e.queries))
    ):
        raise DatasetError(
            "episode indices do not match the feature labels; the episode list was made for "
            "another split, make it again for this one"
        )


def episode_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy in percent of logits (n, ways) against labels (n,)."""
    return float((logits.argmax(1) == labels).double().mean() * 100.0)


def evaluate_heads(
    features: np.ndarray,
    labels: np.ndarray,
    episodes: Sequence[Episode],
    heads: Mapping[str, HeadFactory],
) -> dict[str, EvalResult]:
    """Every head on every episode (the same episodes for all heads).

    Args:
        features: cached features of shape (N, D) of the split the episodes index.
        labels: split class ids of shape (N,) (checked against each episode's classes).
        episodes: the episode list.
        heads: name -> factory of a fresh head per episode.

    Returns:
        name -> `EvalResult` (percent).
    """
    if not episodes:
        raise ConfigError("evaluate_heads: no episodes; use episodes >= 1")
    if features.ndim != 2 or len(features) != len(labels):
        raise DatasetError(
            f"features of shape {features.shape} do not match {len(labels)} labels; extract "
            "them again for this split"
        )
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    labels = np.asarray(labels, dtype=np.int64)
    accs: dict[str, list[float]] = {name: [] for name in heads}
    with _progress() as progress:
        bar = progress.add_task("episodes", total=len(episodes))
        for e in episodes:
            _check_episode(e, labels)
            xs, xq = feats[torch.from_numpy(e.support)], feats[torch.from_numpy(e.query)]
            ys = torch.from_numpy(e.support_labels())
            yq = torch.from_numpy(e.query_labels())
            for name, factory in heads.items():
                head = factory()
                head.fit(xs, ys)
                accs[name].append(episode_accuracy(head.predict(xq), yq))
            progress.advance(bar)
    return {name: EvalResult.from_accuracies(a) for name, a in accs.items()}


def evaluate_finetune(
    model: nn.Module,
    load: Callable[[np.ndarray], torch.Tensor],
    episodes: Sequence[Episode],
    steps: int = 100,
    lr: float = 0.01,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """The fine-tune-everything ablation (`heads.finetune_everything`) over episodes; needs
    images: `load(indices) -> (n, C, H, W)`. A fresh copy of the model per episode."""
    accs = []
    with _progress() as progress:
        bar = progress.add_task("fine-tune episodes", total=len(episodes))
        for e in episodes:
            logits = finetune_everything(
                model,
                load(e.support).to(device),
                torch.from_numpy(e.support_labels()).to(device),
                load(e.query).to(device),
                steps=steps,
                lr=lr,
            )
            accs.append(episode_accuracy(logits.cpu(), torch.from_numpy(e.query_labels())))
            progress.advance(bar)
    return EvalResult.from_accuracies(accs)


def head_factories(model: nn.Module, names: Sequence[str]) -> dict[str, HeadFactory]:
    """Factories of the feature heads `names` (not "finetune"). "mtl" uses a learner's
    meta-learned init and test settings, or zeros with T=100, alpha=0.01 for a plain backbone."""
    table: dict[str, HeadFactory] = {
        "mtl": (MTLHead.factory_from_learner(model) if hasattr(model, "fc_weight") else MTLHead),
        "centroid": NearestCentroidHead,
        "centroid-euclidean": lambda: NearestCentroidHead("euclidean"),
        "logreg": LogisticRegressionHead,
    }
    names = canonical_heads(names)
    return {n: table[n] for n in names if n != "finetune"}


def canonical_heads(names: Sequence[str]) -> list[str]:
    """Head names with aliases resolved ("ft" -> "finetune"), in order, without duplicates.

    Raises:
        ConfigError: an unknown head name.
    """
    resolved = [_ALIASES.get(n, n) for n in names]
    unknown = [n for n in resolved if n not in HEAD_NAMES]
    if unknown:
        raise ConfigError(
            f"heads {', '.join(unknown)} unknown; use some of {', '.join(HEAD_NAMES)}"
        )
    return list(dict.fromkeys(resolved))


def meta_test(
    model: nn.Module,
    split: ImageSplit,
    cfg: Preprocess,
    ways: int = 5,
    shots_list: Sequence[int] = (1, 5),
    episodes: int = 2000,
    queries: int = 15,
    seed: int = 0,
    heads: Sequence[str] = ("mtl", "centroid", "logreg"),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    features: np.ndarray | None = None,
    ft_steps: int = 100,
    ft_lr: float = 0.01,
) -> dict[str, Any]:
    """Evaluate `model` on `split` with every head, for each shot count.

    Args:
        model: a backbone or a `MetaTransferLearner`.
        split: the test (or validation) split; cfg: its preprocessing.
        ways, shots_list, episodes, queries, seed: the protocol; episode list i of seed s for
            every head (and, for a given shot count, every model evaluated with that seed).
        heads: names from `HEAD_NAMES`.
        features: precomputed features of the split (N, D), else extracted here.

    Returns:
        JSON-able: {"split", "fingerprint", "ways", "queries", "episodes", "seed", "results":
        {"<shots>": {"<head>": {"mean", "ci95", "episodes"}}}}, accuracies in percent.
    """
    heads = canonical_heads(heads)
    factories = head_factories(model, heads)
    if episodes < 1 or not shots_list or min(shots_list) < 1:
        raise ConfigError(
            f"episodes={episodes}, shots={list(shots_list)}: use episodes >= 1 and shots >= 1"
        )
    split.require(ways, max(shots_list) + queries)
    if features is None and factories:
        features = extract_features(model, split, batch_size, device, cfg=cfg)
    results: dict[str, Any] = {}
    for shots in shots_list:
        sampler = EpisodeSampler.for_split(split, ways, shots, queries, seed)
        eps = sampler.episodes(episodes)
        table = {}
        if factories:
            assert features is not None
            res = evaluate_heads(features, split.labels, eps, factories)
            table = {name: r.to_dict() for name, r in res.items()}
        if "finetune" in heads:

            def load(idx: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(
                    np.stack([preprocess_image(split.image(int(i)), cfg) for i in idx])
                )

            ft = evaluate_finetune(model, load, eps, ft_steps, ft_lr, device)
            table["finetune"] = ft.to_dict()
        for name, r in table.items():
            log.info("%d-way %d-shot %s: %.2f +- %.2f %%", ways, shots, name, r["mean"], r["ci95"])
        results[str(shots)] = table
    return {
        "split": split.name,
        "fingerprint": split.fingerprint(),
        "ways": ways,
        "queries": queries,
        "episodes": episodes,
        "seed": seed,
        "heads": list(heads),
        "results": results,
    }
