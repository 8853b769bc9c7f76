"""N-way K-shot Q-query episodes, reproducible by seed and storable as JSON.

Episode `i` of a sampler depends only on (seed, i), never on what was drawn before, so every
backend, precision and method evaluated on "episodes 0..1999 of seed 0" sees the same tasks,
and a fixed list can be saved once and shared. The same sampler draws the hard tasks of MTL's
HT meta-batch (`hard_episode`): classes from a given pool only, images the meta-batch did not
use, from a stream of their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_edge.atomicio import atomic_write_json
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import DatasetError
from mtl_edge.jsonfile import read_json_document

EPISODES_SCHEMA = "mtl-edge.episodes"
EPISODES_VERSION = 1
#: Keeps the hard episodes' random stream apart from the ordinary one.
_HARD_STREAM = 0x4854


@dataclass(frozen=True)
class Episode:
    """One few-shot task over sample indices of a split.

    Attributes:
        classes: split class ids, shape (ways,); episode label j means classes[j].
        support: sample indices of shape (ways * shots,), class-major: label j's shots are
            support[j * shots:(j + 1) * shots].
        query: sample indices of shape (ways * queries,), class-major likewise.
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray

    @property
    def ways(self) -> int:
        return len(self.classes)

    @property
    def shots(self) -> int:
        return len(self.support) // self.ways

    @property
    def queries(self) -> int:
        return len(self.query) // self.ways

    def support_labels(self) -> np.ndarray:
        """int64 array of shape (ways * shots,): episode labels 0..ways-1 of the support set."""
        return np.repeat(np.arange(self.ways, dtype=np.int64), self.shots)

    def query_labels(self) -> np.ndarray:
        """int64 array of shape (ways * queries,): episode labels of the query set."""
        return np.repeat(np.arange(self.ways, dtype=np.int64), self.queries)

    def to_json(self) -> dict[str, list[int]]:
        return {
            "classes": self.classes.tolist(),
            "support": self.support.tolist(),
            "query": self.query.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Episode:
        return cls(
            classes=np.asarray(d["classes"], dtype=np.int64),
            support=np.asarray(d["support"], dtype=np.int64),
            query=np.asarray(d["query"], dtype=np.int64),
        )


class EpisodeSampler:
    """Draws episodes from per-class sample indices.

    Args:
        indices_by_class: for each class id, the sample indices of that class.
        ways, shots, queries: N, K and Q.
        seed: episode i is drawn from a generator seeded by (seed, i).
        class_names: names for error messages (defaults to the class ids).
        name: the split's name for error messages.
    """

    def __init__(
        self,
        indices_by_class: Sequence[np.ndarray],
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        name: str = "split",
    ) -> None:
        if ways < 2 or shots < 1 or queries < 0:
            raise DatasetError(
                f"episodes: ways={ways}, shots={shots}, queries={queries}: need ways >= 2, "
                "shots >= 1 and queries >= 0"
            )
        names = (
            list(class_names)
            if class_names is not None
            else [str(i) for i in range(len(indices_by_class))]
        )
        if len(indices_by_class) < ways:
            raise DatasetError(
                f"{name}: has {len(indices_by_class)} classes, fewer than the {ways} ways asked; "
                "lower --ways or use a larger split"
            )
        for c, idx in enumerate(indices_by_class):
            if len(idx) < shots + queries:
                raise DatasetError(
                    f"{name}: class {names[c]!r} has {len(idx)} images, fewer than the "
                    f"{shots + queries} (shots {shots} + queries {queries}) an episode needs; "
                    "lower shots/queries or add images"
                )
        self.indices_by_class = [np.asarray(i, dtype=np.int64) for i in indices_by_class]
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed
        #: Hard episodes that had to reuse avoided images (too few fresh ones in a class).
        self.reused = 0

    @classmethod
    def for_split(
        cls, split: ImageSplit, ways: int, shots: int, queries: int, seed: int = 0
    ) -> EpisodeSampler:
        return cls(
            split.indices_by_class(),
            ways,
            shots,
            queries,
            seed,
            class_names=split.class_names,
            name=split.name,
        )

    def episode(self, index: int) -> Episode:
        """Episode number `index`; a pure function of (seed, index)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        classes = rng.choice(len(self.indices_by_class), self.ways, replace=False)
        per = self.shots + self.queries
        return self._episode(
            classes, [rng.choice(self.indices_by_class[c], per, False) for c in classes]
        )

    def hard_episode(
        self, index: int, pool: Sequence[int], avoid: np.ndarray | None = None
    ) -> Episode:
        """Hard episode number `index`: `ways` classes drawn from `pool` only, and images not
        in `avoid` (the sample indices the meta-batch used) while a class has enough of them.
        When fewer than shots + queries fresh images remain, every fresh one is taken and the
        rest are avoided ones, shuffled together (counted in `reused`). A pure function of
        (seed, index, pool, avoid), from a stream apart from `episode`'s.

        Raises:
            DatasetError: a pool of fewer than `ways` classes.
        """
        if len(set(pool)) < self.ways:
            raise DatasetError(f"hard episode: pool of {len(set(pool))} classes < {self.ways} ways")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index, _HARD_STREAM]))
        classes = rng.choice(np.asarray(pool, dtype=np.int64), self.ways, replace=False)
        avoid = np.zeros(0, np.int64) if avoid is None else np.unique(np.asarray(avoid))
        return self._episode(classes, [self._fresh(rng, int(c), avoid) for c in classes])

    def _fresh(self, rng: np.random.Generator, c: int, avoid: np.ndarray) -> np.ndarray:
        """shots + queries distinct sample indices of class `c`, unused ones first."""
        need, candidates = self.shots + self.queries, self.indices_by_class[c]
        used = np.isin(candidates, avoid)
        fresh = candidates[~used]
        if len(fresh) >= need:
            return rng.choice(fresh, need, replace=False)
        self.reused += 1
        extra = rng.choice(candidates[used], need - len(fresh), replace=False)
        return rng.permutation(np.concatenate([fresh, extra]))

    def _episode(self, classes: np.ndarray, picks: list[np.ndarray]) -> Episode:
        return Episode(
            classes=classes.astype(np.int64),
            support=np.concatenate([p[: self.shots] for p in picks]),
            query=np.concatenate([p[self.shots :] for p in picks]),
        )

    def episodes(self, count: int, start: int = 0) -> list[Episode]:
        return [self.episode(i) for i in range(start, start + count)]

    def __iter__(self) -> Iterator[Episode]:
        i = 0
        while True:
            yield self.episode(i)
            i += 1


def save_episodes(path: str | Path, episodes: Sequence[Episode], meta: dict[str, Any]) -> None:
    """Write an episode list as JSON (atomically). `meta` records split, seed, ways, etc."""
    atomic_write_json(
        path,
        {
            "schema": EPISODES_SCHEMA,
            "version": EPISODES_VERSION,
            "meta": meta,
            "episodes": [e.to_json() for e in episodes],
        },
    )


def load_episodes(path: str | Path) -> tuple[list[Episode], dict[str, Any]]:
    """Read an episode list written by `save_episodes`. Returns (episodes, meta)."""
    path = Path(path)
    doc = read_json_document(
        path,
        DatasetError,
        what="episode file",
        schema=EPISODES_SCHEMA,
        version=EPISODES_VERSION,
        missing="no such episode file; write one with `mtl-edge data episodes --out`",
        fix="write it again with `mtl-edge data episodes --out`",
    )
    try:
        return [Episode.from_json(e) for e in doc["episodes"]], dict(doc.get("meta", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: malformed episode entry ({e})") from None
