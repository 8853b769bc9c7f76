"""The image head: fine-tune a copy of the whole backbone and a fresh head on the support set.

`FinetuneHead` keeps the few-shot head contract of `mtl_edge.fewshot.heads` with images in
place of features: `fit(support images (n_s, C, H, W), labels (n_s,))`, then
`predict(query images (n_q, C, H, W)) -> scores (n_q, ways)`. Two callers use it with their
own settings:

- meta-test's "finetune" head, the paper's FT ablation: full-batch SGD with momentum 0.9 on
  the mean cross-entropy, BatchNorm in eval mode (running statistics: a 5-25 image support set
  gives poor batch statistics) with its affine parameters trained, a zero-initialised head;
- the joint grid's "inner" / "finetune" adaptation (Eshratifar et al.): plain SGD on random
  support batches of at most `batch_size` images, BatchNorm on batch statistics as in training,
  a zero or prototype head (`head_init`), the query classified with the running statistics.

The copy's SS convs become plain convs first (`mtl_edge.train.ss.revert_ss`), so every weight
trains; the backbone given is never changed.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl_edge.errors import ConfigError
from mtl_edge.train.joint import initial_head
from mtl_edge.train.ss import revert_ss
from mtl_edge.train.stage_config import TASK_HEAD_INITS

BN_MODES = ("eval", "train")
#: Images per forward pass when classifying the query set.
QUERY_CHUNK = 500


class FinetuneHead:
    """Fine-tune everything on the support images, then classify the query images.

    Args:
        backbone: a network with `forward_features` and `feature_dim`; left unchanged.
        steps, lr, momentum: SGD.
        batch_size: support images per step, drawn at random (0: all of them every step).
        bn_mode: "eval" (running statistics) or "train" (batch statistics while adapting).
        head_init: "zero" or "prototypes" (`mtl_edge.train.joint.initial_head`).
        seed: seed of the random support batches.
    """

    def __init__(
        self,
        backbone: nn.Module,
        steps: int = 100,
        lr: float = 0.01,
        momentum: float = 0.9,
        batch_size: int = 0,
        bn_mode: str = "eval",
        head_init: str = "zero",
        seed: int = 0,
    ) -> None:
        if bn_mode not in BN_MODES or head_init not in TASK_HEAD_INITS:
            raise ConfigError(
                f"finetune head: bn_mode={bn_mode!r}, head_init={head_init!r}: use "
                f"{'/'.join(BN_MODES)} and {'/'.join(TASK_HEAD_INITS)}"
            )
        if steps < 0 or lr <= 0 or batch_size < 0:
            raise ConfigError(
                f"finetune head: steps={steps}, lr={lr}, batch_size={batch_size}: need steps "
                ">= 0, lr > 0, batch_size >= 0"
            )
        self.backbone = backbone
        self.steps, self.lr, self.momentum = steps, lr, momentum
        self.batch_size, self.bn_mode, self.head_init = batch_size, bn_mode, head_init
        self.seed = seed
        self.net: nn.Module | None = None
        self.head: tuple[torch.Tensor, torch.Tensor] | None = None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net.forward_features(x)  # type: ignore[operator]

    def fit(self, support: torch.Tensor, labels: np.ndarray) -> None:
        """Adapt on support images (n_s, C, H, W) and episode labels (n_s,)."""
        net = revert_ss(copy.deepcopy(self.backbone))
        net.train(self.bn_mode == "train")
        for p in net.parameters():
            p.requires_grad_(True)
        self.net = net
        device = support.device
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
        ways = int(y.max()) + 1
        like = next(net.parameters())

        def support_features() -> torch.Tensor:
            with torch.no_grad():
                return self._features(support)

        w0, b0 = initial_head(self.head_init, support_features, y, ways, int(net.feature_dim), like)
        head = (w0.detach().requires_grad_(True), b0.detach().requires_grad_(True))
        opt = torch.optim.SGD([*net.parameters(), *head], lr=self.lr, momentum=self.momentum)
        gen = np.random.default_rng(self.seed)
        with torch.enable_grad():
            for _ in range(self.steps):
                if self.batch_size and self.batch_size < len(y):
                    order = gen.permutation(len(y))[: self.batch_size]
                    pick = torch.as_tensor(order, device=device)
                    x, t = support[pick], y[pick]
                else:
                    x, t = support, y
                loss = F.cross_entropy(F.linear(self._features(x), head[0], head[1]), t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        self.head = (head[0].detach(), head[1].detach())

    @torch.no_grad()
    def predict(self, query: torch.Tensor) -> np.ndarray:
        """Scores of shape (n_q, ways) (eval mode: BatchNorm on running statistics)."""
        if self.net is None or self.head is None:
            raise RuntimeError("FinetuneHead.predict before fit")
        parts = [
            F.linear(self._features(query[i : i + QUERY_CHUNK]), *self.head).float().cpu()
            for i in range(0, len(query), QUERY_CHUNK)
        ]
        return torch.cat(parts).numpy()
