"""The tables of the training stages: pre-training, meta-transfer, the hard-task meta-batch
and the joint method. Each validates itself when built (one line naming the key); the recipe
(`mtl_edge.train.config.Recipe`) holds them beside the other tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtl_edge.fewshot.fc import HEAD_LOSSES
from mtl_edge.settings import require, require_at_least, require_one_of, require_positive

SCHEDULES = ("cosine", "step")
FC_INITS = ("zeros", "normal", "kaiming")
BN_MODES = ("frozen", "train")
REDUCTIONS = ("mean", "sum")
META_KINDS = ("reptile", "maml")
MIX_KINDS = ("paper", "code")
OPTIMIZERS = ("adam", "sgd")
INNER_LOOPS = ("batched", "autograd")
TASK_HEAD_INITS = ("zero", "prototypes")


@dataclass
class PretrainConfig:
    """Phase 1: a classifier over all base classes.

    Attributes:
        epochs, batch_size, lr, momentum, nesterov, weight_decay: SGD over the train split.
        schedule: "cosine" or "step" (x `gamma` every `step_size` epochs); warmup_epochs:
            linear warm-up of the lr; label_smoothing: of the cross-entropy.
        augment, crop_scale, flip, jitter: random resized crop (of that area range), horizontal
            flip (off for characters, where a mirror image is another symbol), brightness /
            contrast / saturation jitter of that strength (`gpu_data.DeviceAugment`).
        val_episodes, val_ways, val_shots, val_queries: validation episodes on the validation
            classes after every `val_every` epochs (nearest-centroid on the features); the best
            one is best.pt. 0 episodes: the last epoch is best.
        device_data: keep the decoded split on the training device (else on the CPU).
        max_steps_per_epoch: stop an epoch early (0 = the whole split; for quick runs).
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: bool = True
    crop_scale: tuple[float, float] = (0.25, 1.0)
    flip: bool = True
    jitter: float = 0.4
    val_episodes: int = 200
    val_ways: int = 5
    val_shots: int = 1
    val_queries: int = 15
    val_every: int = 1
    device_data: bool = True
    max_steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        require_one_of("pretrain", "schedule", self.schedule, SCHEDULES)
        require_at_least("pretrain", self, ["epochs", "batch_size", "step_size", "val_every"], 1)
        require_positive("pretrain", self, ["lr"])
        require(
            0 <= self.label_smoothing < 1,
            f"pretrain.label_smoothing={self.label_smoothing}: need 0 <= value < 1",
        )
        require(0 <= self.jitter < 1, f"pretrain.jitter={self.jitter}: need 0 <= value < 1")


@dataclass(frozen=True)
class MetaConfig:
    """Phase 2: SS meta-transfer with the FC base-learner; also the learner's settings
    (`mtl_edge.train.meta_transfer.MetaTransferLearner` takes this table).

    Learner settings (defaults follow the official PyTorch code; the TF code's setting is
    inner_steps=20, test_steps=100, inner_lr=1e-3, inner_loss="tf", second_order=True):

    Attributes:
        inner_steps: T during meta-training (100).
        test_steps: T at validation / meta-test (100).
        inner_lr: alpha (0.01).
        second_order: differentiate through the inner loop (False: first order, see
            `mtl_edge.train.base_learner`).
        inner_loss: "mean" (default, what the device head minimises), "sum" over the support
            set, or "tf": the TF code's cross-entropy summed over the support set and divided by
            the shots (= ways x the mean); see `mtl_edge.fewshot.fc.loss_scale`.
        inner_weight_decay: coefficient of 0.5 * ||W||^2 in the inner loss (0).
        normalize: L2-normalise features before the FC head (False, as both official codes).
        fc_init: the FC initialisation's starting value: "zeros" (default; symmetric slots and
            what the device falls back to), "normal" (std 0.01) or "kaiming" (the PyTorch code).
        bn_mode: "frozen" (default) or "train"; see `mtl_edge.train.ss`.
        reduction: meta-batch loss "mean" (default) or "sum" over tasks.
        inner_loop: "batched" (default: every task of a meta-batch at once, closed-form
            gradient) or "autograd" (the per-task reference); the same update
            (`mtl_edge.train.base_learner`).

    The driver's settings:

    Attributes:
        pretrained: the phase-1 checkpoint (the pipeline passes it directly).
        ways, shots, queries: the meta-training tasks.
        iterations: meta-batches in all; `epoch_length` meta-batches make an epoch (validation,
            checkpoint, lr decay counted in epochs).
        meta_batch: tasks per meta-batch.
        ss_lr, fc_lr: Adam learning rates of SS (Phi_S) and of the FC initialisation.
        lr_step, lr_gamma: multiply both by `lr_gamma` every `lr_step` epochs.
        ss_shortcut: scale-and-shift the 1x1 shortcut convs too.
        hard_tasks: add the hard-task meta-batch (table [hard_tasks]).
        also_without_ht: train a second meta-model without HT (saved as without_ht/best.pt).
        augment: augment the meta-training task images.
        val_episodes, val_shots: validation tasks on the validation classes after each epoch.
        snapshots: also keep the weights at the end of this many evenly spaced epochs (the
            last included) as RUN/snapshot-<epoch>.pt, written at the end of the stage: the
            candidates a later validation picks from when training ran without one.
    """

    inner_steps: int = 100
    test_steps: int = 100
    inner_lr: float = 0.01
    second_order: bool = False
    inner_loss: str = "mean"
    inner_weight_decay: float = 0.0
    normalize: bool = False
    fc_init: str = "zeros"
    bn_mode: str = "frozen"
    reduction: str = "mean"
    inner_loop: str = "batched"
    pretrained: str = ""
    ways: int = 5
    shots: int = 1
    queries: int = 15
    iterations: int = 10000
    epoch_length: int = 100
    meta_batch: int = 1
    ss_lr: float = 1e-4
    fc_lr: float = 1e-3
    lr_step: int = 10
    lr_gamma: float = 0.5
    ss_shortcut: bool = True
    hard_tasks: bool = True
    also_without_ht: bool = False
    augment: bool = False
    val_episodes: int = 100
    val_shots: int = 0
    snapshots: int = 0

    def __post_init__(self) -> None:
        positive = ["shots", "queries", "meta_batch", "iterations", "epoch_length", "lr_step"]
        require_at_least("meta", self, ["inner_steps", "test_steps", "val_episodes"], 0)
        require_at_least("meta", self, ["val_shots", "snapshots"], 0)
        require_at_least("meta", self, positive, 1)
        require_at_least("meta", self, ["ways"], 2)
        require_positive("meta", self, ["inner_lr", "ss_lr", "fc_lr"])
        require_one_of("meta", "inner_loss", self.inner_loss, HEAD_LOSSES)
        require_one_of("meta", "fc_init", self.fc_init, FC_INITS)
        require_one_of("meta", "bn_mode", self.bn_mode, BN_MODES)
        require_one_of("meta", "reduction", self.reduction, REDUCTIONS)
        require_one_of("meta", "inner_loop", self.inner_loop, INNER_LOOPS)


@dataclass(frozen=True)
class HardTaskConfig:
    """The hard-task meta-batch (`mtl_edge.train.hard_tasks`): K' = `count` hard tasks after
    every `every_n_batches` meta-batches from epoch `start_epoch` (0-based; the early
    meta-batches rank classes with a barely adapted SS, so their "failures" are mostly noise),
    on fresh images of the failure classes or not. count = 0 disables HT."""

    count: int = 2
    start_epoch: int = 0
    every_n_batches: int = 1
    fresh_images: bool = True

    def __post_init__(self) -> None:
        require_at_least("hard_tasks", self, ["count", "start_epoch"], 0)
        require_at_least("hard_tasks", self, ["every_n_batches"], 1)

    def active(self, epoch: int, batch: int) -> bool:
        """Whether hard tasks follow meta-batch `batch` (0-based) of epoch `epoch`."""
        return (
            self.count > 0 and epoch >= self.start_epoch and (batch + 1) % self.every_n_batches == 0
        )


@dataclass
class JointConfig:
    """The joint transfer + meta-learning method (Eshratifar et al.; `mtl_edge.train.joint`).

    Attributes:
        meta: "reptile" or "maml".
        mix: "paper" (convex mix, beta weights the meta step) or "code" (steps averaged, beta
            weights the transfer step).
        beta: the mixing weight, in [0, 1].
        ways: classes per training task.
        shots: support images per class (Reptile trains on support + query together).
        queries: query images per class (MAML's outer loss).
        meta_batch: tasks per meta-iteration.
        inner_steps, inner_lr: SGD steps per task (k) and their learning rate (alpha).
        outer_lr: learning rate of the meta step (beta_outer).
        transfer_lr: learning rate of the transfer step.
        optimizer: "adam" (the paper) or "sgd" (the literal update formulas).
        second_order: MAML differentiates through the inner loop.
        head_init: how every task head starts (training inner loops and evaluation): "zero", or
            "prototypes" (Proto-MAML, Triantafillou et al. 2020: row c = 2 * mean feature of
            class c, bias -||mean||^2, i.e. the nearest-mean classifier under squared distance).
        iterations, log_every: meta-iterations in all; write a metrics line every this many.
        checkpoint_every: keep an intermediate checkpoint every this many (0: only the last).
        batched: all inner loops of a meta-batch at once (`mtl_edge.train.joint_batched`).
        cuda_graphs: replay the batched gradients as a CUDA graph on a GPU (no effect on CPU).
    """

    meta: str = "reptile"
    mix: str = "paper"
    beta: float = 0.5
    ways: int = 5
    shots: int = 5
    queries: int = 5
    meta_batch: int = 5
    inner_steps: int = 5
    inner_lr: float = 0.01
    outer_lr: float = 1e-3
    transfer_lr: float = 1e-3
    optimizer: str = "adam"
    second_order: bool = False
    head_init: str = "zero"
    iterations: int = 1000
    log_every: int = 50
    checkpoint_every: int = 0
    batched: bool = True
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        require(0.0 <= self.beta <= 1.0, f"joint.beta={self.beta}: must be within [0, 1]")
        require_one_of("joint", "meta", self.meta, META_KINDS)
        require_one_of("joint", "mix", self.mix, MIX_KINDS)
        require_one_of("joint", "optimizer", self.optimizer, OPTIMIZERS)
        require_one_of("joint", "head_init", self.head_init, TASK_HEAD_INITS)
        require_at_least("joint", self, ["ways", "shots", "meta_batch", "inner_steps"], 1)
        require_at_least("joint", self, ["iterations", "log_every"], 1)
        require_at_least("joint", self, ["checkpoint_every", "queries"], 0)
        require_positive("joint", self, ["inner_lr", "outer_lr", "transfer_lr"])
        require(
            not (self.meta == "reptile" and self.head_init == "zero" and self.inner_steps < 2),
            f"joint.inner_steps={self.inner_steps}: Reptile needs >= 2 (the task head starts "
            "at zero, so the first step moves only the head and theta_i - theta would be 0)",
        )
        require(
            not (self.meta == "maml" and self.queries < 1),
            f"joint.queries={self.queries}: MAML needs >= 1 query per class",
        )

    @property
    def uses_meta(self) -> bool:
        """Whether the meta step is computed (its weight is not 0)."""
        return not (self.mix == "paper" and self.beta == 0.0)

    @property
    def uses_transfer(self) -> bool:
        """Whether the transfer step is computed (its weight is not 0)."""
        return self.beta != (1.0 if self.mix == "paper" else 0.0)

    @property
    def method(self) -> str:
        """Short name: "reptile", "maml", "transfer", "reptile+transfer", "maml+transfer"."""
        if not self.uses_meta:
            return "transfer"
        return self.meta + ("+transfer" if self.uses_transfer else "")
