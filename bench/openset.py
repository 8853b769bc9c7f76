"""`mtl-edge bench openset`: open-set rejection of a gallery, measured on seeded episodes.

Episode i (`EpisodeSampler(seed)` over the split, ways = enrolled + unknown) draws
`enrolled + unknown` classes with `shots + queries` photos each: the first `enrolled` classes
are enrolled from their `shots` photos; the queries are the other `queries` photos of every
class, "known" for enrolled classes and "unknown" for the rest.

The device path throughout: features come from the bundle's onnxruntime extractor through
`Enroller.extract` (file bytes, decode, the manifest's preprocessing), once per image; each
episode builds a `Gallery` of the enrolled features (float16 storage, as `mtl-edge enroll`
makes), whose `fit` fits the bundle's head recipe and calibrates the AUTOMATIC threshold
(`mtl_edge.gallery.calibration`). Every rejection score is then compared on the same episodes:

- "probability": top softmax probability of the fitted head (the gallery's default rule);
- "margin": top-1 minus top-2 probability;
- "energy": logsumexp of the head's logits;
- "cosine": largest cosine similarity to the class prototypes on normalised features.

Per rule: the AUROC of known vs unknown queries, and at a threshold calibrated on the enrolled
features only (leave-one-out scores of the same code the gallery runs) by two cut rules,
"balanced" (the gallery's: best balanced accuracy of held-out examples vs held-out classes) and
"percentile" (5th percentile of the held-out known scores), the share of known queries accepted,
of unknown queries rejected, their mean (balanced accuracy) and the open-set accuracy (known
accepted with the right label, unknown rejected). Means over episodes with 95 % intervals, and
paired differences against the gallery's rule.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.atomicio import atomic_write_bytes
from mtl_edge.data.episodes import Episode, EpisodeSampler
from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.fewshot.fc import HeadRecipe, head_logits, softmax
from mtl_edge.gallery import Gallery
from mtl_edge.gallery.calibration import (
    REJECTIONS,
    Scorer,
    balanced_threshold,
    leave_out_scores,
    max_cosine,
    percentile_threshold,
    prototypes,
    scorer,
)
from mtl_edge.stats import mean_ci, paired_difference

log = logging.getLogger(__name__)

RULES = ("probability", "margin", "energy", "cosine")
CUTS = ("balanced", "percentile")
#: The gallery's rule and cut; the reference of the paired differences.
REFERENCE = ("probability", "balanced")
OPENSET_BACKENDS = ("onnxruntime", "onnxruntime-cpu", "auto")
OPENSET_PRECISIONS = ("fp32", "int8-cpu", "int8")
ROC_POINTS = 101
#: Per-episode metrics, in percent.
METRICS = ("known_accepted", "unknown_rejected", "balanced", "open_accuracy")


@dataclass
class OpenSetConfig:
    """What one `bench openset` run measures (see the module docstring)."""

    bundle: Path
    data: Path
    split: str | None = "test"
    episodes: int = 200
    seed: int = 0
    enrolled: int = 5
    unknown: int = 5
    shots: int = 5
    queries: int = 15
    backend: str = "onnxruntime"
    precisions: Sequence[str] = ("fp32",)
    threads: int | None = None
    batch_size: int = 64
    cache: Path | None = None


# ----------------------------------------------------------------------------- scores


def _head_scores(rule: str, logits: np.ndarray) -> np.ndarray:
    """Scores (n,) of a head-based rule from logits (n, ways)."""
    if rule == "energy":
        top = logits.max(axis=1)
        return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    proba = softmax(logits)
    if rule == "probability":
        return proba.max(axis=1)
    part = np.sort(proba, axis=1)
    return part[:, -1] - part[:, -2]


def rule_scorer(rule: str, recipe: HeadRecipe, meta_init: Any) -> Scorer:
    """The calibration `Scorer` of `rule`; the gallery's own for probability and cosine."""

    def fit(x: np.ndarray, y: np.ndarray, ways: int) -> Any:
        return recipe.fit(x, y, ways, meta_init)

    if rule in ("probability", "cosine"):
        return scorer(rule, fit)
    return lambda x, y, ways, q: _head_scores(rule, head_logits(q, fit(x, y, ways)))


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(known score > unknown score) + 0.5 P(tie): the area under the ROC curve."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([known, unknown]))
    n_k, n_u = len(known), len(unknown)
    return float((ranks[:n_k].sum() - n_k * (n_k + 1) / 2) / (n_k * n_u))


def roc_curve(known: np.ndarray, unknown: np.ndarray) -> dict[str, list[float]]:
    """The pooled ROC: true-positive rate (known accepted) at ROC_POINTS false-positive rates."""
    fpr = np.linspace(0.0, 1.0, ROC_POINTS)
    cuts = np.quantile(unknown, 1.0 - fpr)
    tpr = [float(np.mean(known > c)) if f < 1.0 else 1.0 for c, f in zip(cuts, fpr, strict=True)]
    return {"fpr": fpr.round(4).tolist(), "tpr": np.round(tpr, 4).tolist()}


# --------------------------------------------------------------------------- episodes


def draw_episodes(cfg: OpenSetConfig, split: Any) -> list[Episode]:
    """The seeded episode list; raises DatasetError when the split is too small."""
    ways = cfg.enrolled + cfg.unknown
    if cfg.enrolled < 2 or cfg.unknown < 1 or cfg.episodes < 1 or cfg.shots < 2:
        raise ConfigError(
            f"--enrolled {cfg.enrolled} --unknown {cfg.unknown} --shots {cfg.shots} --episodes "
            f"{cfg.episodes}: need enrolled >= 2, unknown >= 1, shots >= 2, episodes >= 1"
        )
    if split.num_classes < ways:
        raise DatasetError(
            f"{cfg.data}: split {cfg.split!r} has {split.num_classes} classes, fewer than "
            f"--enrolled + --unknown = {ways}; lower them or use a larger split"
        )
    sampler = EpisodeSampler.for_split(split, ways, cfg.shots, cfg.queries, cfg.seed)
    return sampler.episodes(cfg.episodes)


def needed_indices(episodes: Sequence[Episode], enrolled: int) -> np.ndarray:
    """Sorted sample indices (M,) any episode enrolls or queries."""
    parts = [np.concatenate([e.support[: enrolled * e.shots], e.query]) for e in episodes]
    return np.unique(np.concatenate(parts))


def _cache_file(cfg: OpenSetConfig, model_id: str, variant: str, key: str) -> Path | None:
    if cfg.cache is None:
        return None
    h = hashlib.sha256(f"openset|{model_id}|{variant}|{cfg.backend}|{key}".encode()).hexdigest()
    return cfg.cache / f"features-{h[:24]}.npy"


def extract(
    cfg: OpenSetConfig,
    precision: str,
    paths: Sequence[Path],
    key: str,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features (M, D) float32 of image files through `Enroller.extract` (the device path)."""
    from mtl_edge.enroller import Enroller

    enroller = Enroller(
        cfg.bundle,
        cfg.bundle / "unused.gallery",  # extraction only: no gallery is read or written
        backend=cfg.backend,
        precision=precision,
        threads=cfg.threads,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    info = {"variant": enroller.variant, "provider": enroller.extractor.provider}
    path = _cache_file(cfg, enroller.bundle.model_id, enroller.variant, key)
    if path is not None and path.is_file():
        log.info("features of %s from %s", precision, path)
        return np.load(path, allow_pickle=False), {**info, "cached": True}
    features, _ = enroller.extract(list(paths))
    if path is not None:
        buf = io.BytesIO()
        np.save(buf, features, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
    return features, {**info, "cached": False}


def run_episode(
    table: np.ndarray, episode: Episode, cfg: OpenSetConfig, bundle: Any, variant: str
) -> dict[str, Any]:
    """Scores and per-rule metrics (percent) of one episode; `table` is (N, D) by sample."""
    k, shots, q = cfg.enrolled, episode.shots, episode.queries
    gallery = Gallery(
        bundle.model_id, bundle.feature_dim, bundle.head, "float16", bundle.meta_init(),
        bundle.backbone_name, variant=variant, rejection="probability",
    )  # fmt: skip
    for j in range(k):
        gallery.add_class(f"class-{j}", table[episode.support[j * shots : (j + 1) * shots]])
    head = gallery.fit()  # the device's fit and AUTOMATIC threshold calibration
    x, y = gallery.features_and_labels()  # float16-rounded, as stored
    queries = table[episode.query]
    is_known = np.arange(len(episode.query)) < k * q
    truth = np.repeat(np.arange(episode.ways), q)
    logits = head_logits(queries, head)
    predicted = logits.argmax(axis=1)
    out: dict[str, Any] = {
        "closed_accuracy": 100.0 * float(np.mean(predicted[is_known] == truth[is_known])),
        "scores": {},
        "metrics": {},
        "device": {},
    }
    device_cuts = {}
    for rule in REJECTIONS:  # the gallery's own rules: its threshold and verdicts
        gallery.set_rejection(rule)
        gallery.fit()
        device_cuts[rule] = gallery.threshold
        accepted = np.array([p.known for p in gallery.predict(queries)])
        out["device"][rule] = {
            "known_accepted": 100.0 * float(accepted[is_known].mean()),
            "unknown_rejected": 100.0 * float(1.0 - accepted[~is_known].mean()),
        }
    for rule in RULES:
        s = (
            max_cosine(queries, prototypes(x, y, k))
            if rule == "cosine"
            else _head_scores(rule, logits)
        )
        sk, su = s[is_known], s[~is_known]
        known_loo, unknown_loo = leave_out_scores(
            x, y, k, bundle.head.steps, rule_scorer(rule, bundle.head, bundle.meta_init())
        )
        cuts = {
            "balanced": balanced_threshold(known_loo, unknown_loo),
            "percentile": percentile_threshold(known_loo),
        }
        if rule in device_cuts:
            # the gallery's stored threshold is this cut clipped to [0, 1]; use it as is
            cuts["balanced"] = device_cuts[rule]
        out["scores"][rule] = (sk, su)
        out["metrics"][(rule, "auroc")] = 100.0 * auroc(sk, su)
        for cut_name, t in cuts.items():
            acc_k = 100.0 * float(np.mean(sk >= t))
            rej_u = 100.0 * float(np.mean(su < t))
            right = (s >= t) & (predicted == truth)
            open_acc = (right[is_known].sum() + (su < t).sum()) / len(s)
            out["metrics"][(rule, cut_name)] = {
                "threshold": float(t),
                "known_accepted": acc_k,
                "unknown_rejected": rej_u,
                "balanced": (acc_k + rej_u) / 2,
                "open_accuracy": 100.0 * float(open_acc),
            }
    return out


def _summary(per_episode: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of every (rule, cut) with means, intervals and paired differences."""
    rows = []
    ref_auc = [e["metrics"][(REFERENCE[0], "auroc")] for e in per_episode]
    ref = {m: [e["metrics"][REFERENCE][m] for e in per_episode] for m in METRICS}
    for rule in RULES:
        aucs = [e["metrics"][(rule, "auroc")] for e in per_episode]
        auc, auc_ci = mean_ci(aucs)
        d_auc, d_auc_ci = paired_difference(ref_auc, aucs)
        for cut in CUTS:
            row: dict[str, Any] = {"rule": rule, "cut": cut, "auroc": auc, "auroc_ci95": auc_ci}
            row["auroc_diff"], row["auroc_diff_ci95"] = d_auc, d_auc_ci
            thresholds = [e["metrics"][(rule, cut)]["threshold"] for e in per_episode]
            row["threshold_median"] = float(np.median(thresholds))
            for m in METRICS:
                values = [e["metrics"][(rule, cut)][m] for e in per_episode]
                row[m], row[f"{m}_ci95"] = mean_ci(values)
                if m in ("balanced", "open_accuracy"):
                    row[f"{m}_diff"], row[f"{m}_diff_ci95"] = paired_difference(ref[m], values)
            rows.append(row)
    return {"rows": rows}


def _pooled_roc(per_episode: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for rule in RULES:
        sk = np.concatenate([e["scores"][rule][0] for e in per_episode])
        su = np.concatenate([e["scores"][rule][1] for e in per_episode])
        out[rule] = {**roc_curve(sk, su), "pooled_auroc": 100.0 * auroc(sk, su)}
    return out


def run_openset(
    cfg: OpenSetConfig, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """The `results` of an openset report: one block per precision (see the module docstring).

    Raises:
        ConfigError / DatasetError: bad options, a split too small, a folder without paths.
    """
    from mtl_edge.bundle import Bundle
    from mtl_edge.data.folders import read_class_folders

    if cfg.backend not in OPENSET_BACKENDS:
        raise ConfigError(f"--backend {cfg.backend!r}: use one of {', '.join(OPENSET_BACKENDS)}")
    for p in cfg.precisions:
        if p not in OPENSET_PRECISIONS:
            raise ConfigError(f"--precisions {p!r}: use some of {', '.join(OPENSET_PRECISIONS)}")
    bundle = Bundle.load(cfg.bundle)
    split = read_class_folders(cfg.data, cfg.split)
    episodes = draw_episodes(cfg, split)
    indices = needed_indices(episodes, cfg.enrolled)
    assert split.paths is not None  # class folders always have paths
    key = hashlib.sha256(split.fingerprint().encode() + indices.tobytes()).hexdigest()
    blocks = []
    for precision in cfg.precisions:
        paths = [split.paths[int(i)] for i in indices]
        features, info = extract(cfg, precision, paths, key, progress)
        table = np.zeros((len(split), features.shape[1]), dtype=np.float32)
        table[indices] = features
        per_episode = [run_episode(table, e, cfg, bundle, info["variant"]) for e in episodes]
        closed, closed_ci = mean_ci([e["closed_accuracy"] for e in per_episode])
        blocks.append(
            {
                "precision": precision,
                **info,
                "closed_accuracy": closed,
                "closed_accuracy_ci95": closed_ci,
                # Gallery.predict's own verdicts: equal to the rule's balanced row
                "device": {
                    rule: {
                        m: float(np.mean([e["device"][rule][m] for e in per_episode]))
                        for m in ("known_accepted", "unknown_rejected")
                    }
                    for rule in REJECTIONS
                },
                **_summary(per_episode),
                "roc": _pooled_roc(per_episode),
            }
        )
    return {
        "blocks": blocks,
        "bundle": str(cfg.bundle),
        "model_id": bundle.model_id,
        "backbone": bundle.backbone_name,
        "head": bundle.head.to_dict(),
        "split": f"{cfg.data.name}/{cfg.split}" if cfg.split else cfg.data.name,
        "split_fingerprint": split.fingerprint(),
        "images": int(len(indices)),
        "seed": cfg.seed,
        "episodes": cfg.episodes,
        "enrolled": cfg.enrolled,
        "unknown": cfg.unknown,
        "shots": cfg.shots,
        "queries": cfg.queries,
        "reference": list(REFERENCE),
    }


# ----------------------------------------------------------------------------- report


def openset_markdown(report: dict[str, Any]) -> str:
    """The Markdown page of an openset report."""
    from mtl_edge.bench.report import _fmt, _table, environment_lines

    res = report["results"]
    lines = ["# Open-set rejection", "", *environment_lines(report["environment"]), ""]
    lines.append(
        f"- bundle {res['bundle']} ({res['backbone']}), split {res['split']}, seed "
        f"{res['seed']}, {res['episodes']} episodes of {res['enrolled']} enrolled classes x "
        f"{res['shots']} shots + {res['unknown']} unknown classes, {res['queries']} queries "
        f"per class ({res['images']} images extracted once)"
    )
    lines.append(
        "- the gallery's rule: " + " / ".join(res["reference"]) + "; diff = paired difference "
        "against it on the same episodes (points); all figures % with 95 % intervals"
    )
    for block in res["blocks"]:
        lines += [
            "",
            f"## {block['precision']} ({block['variant']}, {block['provider']})",
            "",
            f"Closed-set accuracy of the head on known queries: "
            f"{_fmt(block['closed_accuracy'])} +- {_fmt(block['closed_accuracy_ci95'])}. "
            "Gallery.predict's own verdicts (known accepted / unknown rejected): "
            + "; ".join(
                f"{rule} {_fmt(d['known_accepted'])} / {_fmt(d['unknown_rejected'])}"
                for rule, d in block["device"].items()
            ),
            "",
        ]
        header = [
            "rule", "cut", "AUROC", "diff", "known accepted", "unknown rejected",
            "balanced", "diff", "open-set acc.", "diff", "median threshold",
        ]  # fmt: skip
        rows = []
        for r in block["rows"]:

            def pm(key: str, r: dict[str, Any] = r) -> str:
                return f"{_fmt(r.get(key))} +- {_fmt(r.get(key + '_ci95'))}"

            rows.append(
                [
                    r["rule"], r["cut"], pm("auroc"), pm("auroc_diff"), pm("known_accepted"),
                    pm("unknown_rejected"), pm("balanced"), pm("balanced_diff"),
                    pm("open_accuracy"), pm("open_accuracy_diff"), _fmt(r["threshold_median"], 3),
                ]
            )  # fmt: skip
        lines += _table(header, rows)
    return "\n".join(lines) + "\n"


def plot_openset(report: dict[str, Any], path: Path) -> Path:
    """Pooled ROC curves per rule, with each rule's mean operating point at its balanced cut."""
    from mtl_edge.bench.plots import _pyplot, save_figure

    plt = _pyplot()
    blocks = report["results"]["blocks"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 4.6), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        points = {(r["rule"], r["cut"]): r for r in block["rows"]}
        for rule, roc in block["roc"].items():
            (line,) = ax.plot(
                roc["fpr"], roc["tpr"], label=f"{rule} (pooled AUROC {roc['pooled_auroc']:.1f})"
            )
            for cut, marker in (("balanced", "o"), ("percentile", "s")):
                r = points[(rule, cut)]
                ax.plot(
                    1 - r["unknown_rejected"] / 100, r["known_accepted"] / 100, marker,
                    color=line.get_color(), markersize=7 if cut == "balanced" else 5,
                )  # fmt: skip
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        ax.set_xlabel("unknown photos accepted")
        ax.set_ylabel("known photos accepted")
        ax.set_title(f"{block['precision']}: o balanced cut, s percentile cut", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Open-set ROC, {report['results']['episodes']} episodes", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
