"""Pre-training under DistributedDataParallel: 2 CPU processes on gloo stay in sync."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from tiny_recipe import tiny_recipe

from mtl_edge.train.checkpoint import read_checkpoint

RECIPE = tiny_recipe(pretrain={"epochs": 2, "batch_size": 8, "lr": 0.1, "val_episodes": 0})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    import torch.distributed as dist

    from mtl_edge.train.pretrain import pretrain

    result = pretrain(RECIPE, Path(out) / "run")
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_stay_in_sync(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    # each rank took its half of every epoch: 72 images -> 36 per rank -> 4 steps of 8
    assert ranks[0]["images"] == 2 * 2 * 4 * 8
    ckpt = read_checkpoint(ranks[0]["checkpoint"])
    assert ckpt["epoch"] == 1
    assert not (tmp_path / "run" / "rank1").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # only rank 0 writes the run folder
