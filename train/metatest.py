"""Meta-test: every head on the same frozen features and the same seeded episodes.

Features of the whole split are extracted once (the backbone is frozen at meta-test), then the
feature heads of the few-shot core (`mtl_edge.fewshot.heads`) and, when asked, the image head
that fine-tunes everything (`mtl_edge.train.finetune.FinetuneHead`, on the first
`ft_episodes` episodes) run through the one evaluation loop
(`mtl_edge.fewshot.evaluate.evaluate_episodes`) on one episode list per shot count
(`EpisodeSampler.for_split(split, ways, shots, queries, seed)`), so head differences are paired
and every other caller on the same episodes gets the same numbers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError, DatasetError, UnavailableError
from mtl_edge.fewshot.evaluate import evaluate_episodes
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.fewshot.heads import HeadFactory, canonical_heads, feature_head
from mtl_edge.preprocess import Preprocess, preprocess_image
from mtl_edge.train.config import EVAL_HEADS, EvalConfig
from mtl_edge.train.finetune import FinetuneHead

log = logging.getLogger(__name__)


class EvalModel(Protocol):
    """What meta-test needs of a model (a `mtl_edge.train.checkpoint.LoadedCheckpoint`)."""

    backbone: nn.Module
    preprocess: Preprocess
    head: HeadRecipe
    paper_head: HeadRecipe
    meta_init: tuple[np.ndarray, np.ndarray] | None


def require_device(device: torch.device | str) -> None:
    """Raise UnavailableError when `device` is a CUDA device and CUDA is not available."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError(
            f"device {str(device)!r}: CUDA is not available here (torch "
            f"{torch.__version__}); use --device cpu or a CUDA build of torch"
        )


def image_loader(split: ImageSplit, cfg: Preprocess) -> Callable[[np.ndarray], torch.Tensor]:
    """`load(indices) -> (n, C, H, W)` float32 images of `split`, preprocessed exactly as the
    device does (`mtl_edge.preprocess.preprocess_image`)."""

    def load(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([preprocess_image(split.image(int(i)), cfg) for i in idx]))

    return load


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    load: Callable[[np.ndarray], torch.Tensor],
    count: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    name: str = "features",
) -> np.ndarray:
    """Eval-mode features of images 0..count-1, float32 of shape (count, D).

    Args:
        load: `load(indices) -> (n, C, H, W)` images (e.g. `image_loader`, or a
            `DeviceDataset.eval_batch`); batches are moved to `device`, where the backbone is.
        name: what the progress bar and errors call the images.

    Raises:
        UnavailableError: a CUDA device asked for on a machine without CUDA.
    """
    require_device(device)
    was_training = backbone.training
    backbone.eval()
    out: list[np.ndarray] = []
    try:
        with Progress(disable=not sys.stderr.isatty(), transient=True) as progress:
            task = progress.add_task(f"features {name}", total=count)
            for start in range(0, count, batch_size):
                idx = np.arange(start, min(start + batch_size, count))
                x = load(idx).to(device)
                out.append(backbone.forward_features(x).float().cpu().numpy())  # type: ignore[operator]
                progress.advance(task, len(idx))
    finally:
        backbone.train(was_training)
    if not out:
        raise DatasetError(f"{name}: no images to extract features from")
    return np.concatenate(out)


def feature_heads(model: EvalModel, names: list[str]) -> dict[str, HeadFactory]:
    """Factories of the feature heads `names` ("mtl" fits the model's head recipe from its
    meta-learned init, "mtl-paper" the paper's FC base-learner without the recipe's [head]
    improvements)."""
    factories = {}
    for name in names:
        if name == "mtl-paper":
            factories[name] = feature_head("mtl", model.paper_head, model.meta_init)
        elif name != "finetune":
            factories[name] = feature_head(name, model.head, model.meta_init)
    return factories


def finetune_factory(model: EvalModel, protocol: EvalConfig) -> HeadFactory:
    """The FT ablation's head (see `mtl_edge.train.finetune`)."""
    return lambda: FinetuneHead(model.backbone, protocol.ft_steps, protocol.ft_lr, momentum=0.9)


def meta_test(
    model: EvalModel,
    split: ImageSplit,
    protocol: EvalConfig,
    device: torch.device | str = "cpu",
    features: np.ndarray | None = None,
    load: Callable[[np.ndarray], torch.Tensor] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate `model` on `split` with every head of `protocol`, for each shot count.

    Args:
        model: backbone (on `device`), preprocessing, head recipe and meta-learned init.
        split: the test (or validation) split.
        protocol: ways, shots, queries, episodes, seed, heads, ft_episodes/steps/lr.
        features: precomputed features of the split (N, D), else extracted here.
        load: images of sample indices (default: decoded and preprocessed as the device does).

    Returns:
        JSON-able: {"split", "fingerprint", "ways", "queries", "episodes", "seed", "heads",
        "mtl_head" (the recipe the "mtl" head fitted), "results": {"<shots>": {"<head>":
        {"mean", "ci95", "episodes"}}}}, in percent.
    """
    heads = canonical_heads(list(protocol.heads), EVAL_HEADS)
    split.require(protocol.ways, max(protocol.shots) + protocol.queries)
    load = load or image_loader(split, model.preprocess)
    factories = feature_heads(model, heads)
    if features is None and factories:
        features = extract_features(
            model.backbone, load, len(split), batch_size, device, split.name
        )
    results: dict[str, Any] = {}
    for shots in protocol.shots:
        sampler = EpisodeSampler.for_split(
            split, protocol.ways, shots, protocol.queries, protocol.seed
        )
        episodes = sampler.episodes(protocol.episodes)
        table: dict[str, Any] = {}
        if factories:
            assert features is not None
            res = evaluate_episodes(features, split.labels, episodes, factories)
            table = {name: r.to_dict() for name, r in res.items()}
        if "finetune" in heads:
            ft = evaluate_episodes(
                lambda idx: load(idx).to(device),
                split.labels,
                episodes[: protocol.ft_episodes],
                {"finetune": finetune_factory(model, protocol)},
                "fine-tune episodes",
            )
            table["finetune"] = ft["finetune"].to_dict()
        for name, r in table.items():
            log.info(
                "%d-way %d-shot %s: %.2f +- %.2f %%",
                protocol.ways, shots, name, r["mean"], r["ci95"],
            )  # fmt: skip
        results[str(shots)] = table
    if not results:
        raise ConfigError("meta-test: no shot counts to evaluate")
    return {
        "split": split.name,
        "fingerprint": split.fingerprint(),
        "ways": protocol.ways,
        "queries": protocol.queries,
        "episodes": protocol.episodes,
        "seed": protocol.seed,
        "heads": heads,
        "mtl_head": model.head.to_dict(),
        "results": results,
    }
