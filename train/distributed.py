"""Multi-process data parallel training under torchrun (DistributedDataParallel).

`torchrun --nproc_per_node=N -m mtl_edge.cli train pretrain ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; `context()` then joins the process group (NCCL on CUDA, gloo on the CPU) and each
rank trains on its own slice of every epoch's shuffled order (`shard_order`, the role of a
DistributedSampler: all ranks draw the same permutation from the same seed and keep every
N-th index). Without those variables everything runs in one process unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """This process's place: rank, world size, device; `enabled` under torchrun."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, device, True)


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """`model` inside DistributedDataParallel when distributed, else itself."""
    if not ctx.enabled:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_order(n: int, gen: torch.Generator, ctx: DistContext) -> torch.Tensor:
    """This rank's indices of one epoch: a permutation of range(n) drawn from `gen` (the same
    on every rank), every world_size-th element from `rank`, all ranks the same length."""
    order = torch.randperm(n, generator=gen, device=gen.device)
    per_rank = n // ctx.world_size
    return order[ctx.rank :: ctx.world_size][:per_rank]


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in one process)."""
    if ctx.enabled:
        dist.barrier()


def param_checksum(model: nn.Module) -> float:
    """Sum of all parameters (float64), to check that ranks hold the same weights."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))
