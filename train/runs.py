"""The run folder every training command writes.

    RUN/
      config.toml       the resolved recipe (defaults, file and --set overrides applied)
      run.json          git commit (or "unknown"), seed, command, split fingerprints, environment
      metrics.jsonl     one JSON object per line (epoch, losses, accuracies, timings)
      best.pt, last.pt  checkpoints (`mtl_edge.train.checkpoint`)

Everything is written atomically; metrics lines are appended and flushed one at a time.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_edge import sysinfo
from mtl_edge.atomicio import atomic_write, atomic_write_json
from mtl_edge.errors import ConfigError
from mtl_edge.settings import config_to_dict, read_toml, to_toml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def git_commit() -> str:
    """The commit of the source tree this module runs from, or "unknown"."""
    return sysinfo.git_commit() or "unknown"


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class Run:
    """An open run folder.

    Attributes:
        dir: the folder.
        metrics_path: RUN/metrics.jsonl (or another name for a sub-run).
    """

    dir: Path
    metrics_path: Path

    @classmethod
    def open(
        cls,
        out: str | Path,
        config: Any,
        seed: int,
        resume: bool = False,
        command: str = "",
        metrics_name: str = METRICS_FILE,
    ) -> Run:
        """Create RUN (or reopen it with `resume`) and write config.toml and run.json.

        Raises:
            ConfigError: resuming with a recipe that differs from the run's config.toml.
        """
        run_dir = Path(out)
        run_dir.mkdir(parents=True, exist_ok=True)
        doc = config_to_dict(config)
        cfg_path = run_dir / CONFIG_FILE
        if resume and cfg_path.is_file():
            before = read_toml(cfg_path)
            if before != json.loads(json.dumps(doc)):
                changed = sorted(
                    f"{t}.{k}"
                    for t in set(before) | set(doc)
                    for k in set(before.get(t, {})) | set(doc.get(t, {}))
                    if before.get(t, {}).get(k) != doc.get(t, {}).get(k)
                )
                raise ConfigError(
                    f"{cfg_path}: the run was started with another recipe (differs in "
                    f"{', '.join(changed[:4])}); resume with the same recipe or use a new --out"
                )
        text = to_toml(doc)
        atomic_write(cfg_path, lambda f: f.write(text.encode()))
        info = {
            "commit": git_commit(),
            "seed": seed,
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resumed": bool(resume),
            "environment": sysinfo.collect(),
            "splits": {},
        }
        run_file = run_dir / RUN_FILE
        if resume and run_file.is_file():
            old = json.loads(run_file.read_text())
            info["splits"] = old.get("splits", {})
            info["history"] = [*old.get("history", []), {"started": old.get("started")}]
        atomic_write_json(run_file, info)
        metrics = run_dir / metrics_name
        if not resume and metrics.exists():
            metrics.unlink()
        return cls(run_dir, metrics)

    def record_split(self, role: str, name: str, fingerprint: str, size: int) -> None:
        """Note a data split's fingerprint in run.json (role: "train", "val", ...)."""
        path = self.dir / RUN_FILE
        info = json.loads(path.read_text())
        info.setdefault("splits", {})[role] = {
            "name": name,
            "fingerprint": fingerprint,
            "images": size,
        }
        atomic_write_json(path, info)

    def log_metrics(self, **values: Any) -> None:
        """Append one JSON line (with a UTC timestamp) to the metrics file."""
        line = json.dumps({"time": round(time.time(), 3), **values}, default=_plain)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every metrics line so far."""
        if not self.metrics_path.is_file():
            return []
        return [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray | torch.Tensor):
        return v.tolist()
    return str(v)
