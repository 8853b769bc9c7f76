"""The FC inner loop alone: the batched closed-form loop vs the per-task autograd loop.

    python -m mtl_edge.bench.inner_loop_speed [--rounds 5] [--reps 10]

Random support/query features of a meta-batch with HT (4 tasks: 5-way 1-shot, 15 queries,
D = 512, the ResNet-12 64-128-256-512's feature size); one timed unit is the inner loop plus
the query loss's backward to the FC initialisation, in the two settings the recipes use
(T = 20 second order, the TF setting; T = 100 first order). Rounds interleave the two loops;
the figure to read is the median per-round ratio (a shared machine's speed drifts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mtl_edge.train.base_learner import batched_inner_loop, inner_loop

TASKS, SHOTS, QUERIES, WAYS, DIM = 4, 1, 15, 5, 512


def _unit(kind: str, steps: int, second: bool, data: tuple[torch.Tensor, ...]) -> None:
    fs, ys, fq, yq, w0, b0 = data
    if kind == "batched":
        w, b = batched_inner_loop(fs, ys, w0, b0, steps, 1e-3, create_graph=second)
        logits = torch.bmm(fq, w.transpose(1, 2)) + b[:, None]
        loss = F.cross_entropy(logits.flatten(0, 1), yq.flatten())
    else:
        loss = torch.zeros(())
        for t in range(TASKS):
            w, b = inner_loop(fs[t], ys[t], w0, b0, steps, 1e-3, create_graph=second)
            loss = loss + F.cross_entropy(fq[t] @ w.T + b, yq[t]) / TASKS
    loss.backward()


def measure(rounds: int = 5, reps: int = 10, seed: int = 0) -> list[dict[str, float]]:
    """Per setting: best seconds of each loop and the median per-round ratio autograd/batched."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    data = (
        torch.randn(TASKS, WAYS * SHOTS, DIM, generator=gen),
        labels.repeat_interleave(SHOTS).repeat(TASKS, 1),
        torch.randn(TASKS, WAYS * QUERIES, DIM, generator=gen),
        labels.repeat_interleave(QUERIES).repeat(TASKS, 1),
        torch.zeros(WAYS, DIM, requires_grad=True),
        torch.zeros(WAYS, requires_grad=True),
    )
    out = []
    for steps, second in ((20, True), (100, False)):
        times: dict[str, list[float]] = {"batched": [], "autograd": []}
        for _ in range(rounds):
            for kind, got in times.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    _unit(kind, steps, second, data)
                got.append((time.perf_counter() - t0) / reps)
        ratios = [a / b for a, b in zip(times["autograd"], times["batched"], strict=True)]
        out.append(
            {"inner_steps": steps, "second_order": second}
            | {"batched_s": min(times["batched"]), "autograd_s": min(times["autograd"])}
            | {"ratio_autograd_over_batched": statistics.median(ratios)}
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    report["settings"] = measure(args.rounds, args.reps)  # type: ignore[assignment]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
