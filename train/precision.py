"""Training precision chosen at run time: bf16 autocast + channels-last where the hardware has
bf16 units, FP32 elsewhere.

`runtime.amp` selects the autocast dtype:

- "auto" (default): bf16 on a CUDA GPU that supports it, and on a CPU with AVX512-BF16 or AMX
  (flags read from /proc/cpuinfo through `mtl_edge.sysinfo.cpu_info`); FP32 otherwise, with one
  log line saying why;
- "bf16": bf16 autocast wherever it runs (on a CPU without bf16 units it is emulated: correct,
  but slower than FP32; a warning says so);
- "fp16": float16 autocast with a gradient scaler (CUDA only);
- "none": FP32 (what `--set runtime.amp=none` does from the command line).

`runtime.channels_last` is "auto" (channels-last exactly when bf16/fp16 autocast runs: oneDNN's
bf16 convolutions and cuDNN's tensor-core kernels both prefer NHWC), true or false.
`runtime.compile` runs the backbone through `torch.compile` in pre-training and meta-transfer
(off by default: on the CPU its compile time did not pay; the GPU recipe turns it on).
`fused_options(device)` gives the optimizers their fused kernels on a GPU (`fused=True`; plain
loops elsewhere), and `configure_device` lets cuDNN pick its fastest kernels for the fixed
shapes of a training run.

Parameters and optimizer state stay FP32 under autocast; the losses are computed in FP32 from
`logits.float()`; the few-shot FC inner loop always runs in FP32 on FP32 features.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from mtl_edge.errors import ConfigError

log = logging.getLogger(__name__)

AMP_MODES = ("auto", "bf16", "fp16", "none")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_support() -> tuple[bool, str]:
    """(True, which flags) when this CPU has native bf16 matrix units (AVX512-BF16 or AMX-BF16),
    else (False, why not)."""
    from mtl_edge.sysinfo import cpu_info

    info = cpu_info()
    flags = info["flags"]
    have = [f for f in ("amx_bf16", "avx512_bf16") if flags.get(f)]
    if have:
        return True, f"{info['model']} has {' and '.join(have)}"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn)"
    return False, f"{info['model']} has neither avx512_bf16 nor amx_bf16"


@dataclass(frozen=True)
class Precision:
    """How a training stage runs its forward passes.

    Attributes:
        device_type: "cpu" or "cuda".
        dtype: the autocast dtype (torch.bfloat16 / torch.float16), None for FP32.
        channels_last: models and image batches in channels-last memory format.
        reason: why this precision was chosen (logged and stored in run folders).
    """

    device_type: str
    dtype: torch.dtype | None
    channels_last: bool
    reason: str

    @property
    def name(self) -> str:
        """ "bf16", "fp16" or "fp32", with "+cl" when channels-last."""
        base = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")  # type: ignore[arg-type]
        return base + ("+cl" if self.channels_last else "")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this precision (nothing for FP32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def model(self, module: nn.Module) -> nn.Module:
        """`module` in this precision's memory format (in place; returned for chaining)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return module

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch (B, C, H, W) in this precision's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled only for fp16 on CUDA."""
        enabled = self.dtype is torch.float16 and self.device_type == "cuda"
        return torch.amp.GradScaler("cuda", enabled=enabled)

    def to_dict(self) -> dict[str, object]:
        return {"precision": self.name, "channels_last": self.channels_last, "reason": self.reason}


def resolve_precision(
    amp: str, channels_last: bool | str, device: torch.device | str, announce: bool = True
) -> Precision:
    """The precision that `runtime.amp` and `runtime.channels_last` ask for on `device`.

    Args:
        amp: one of `AMP_MODES`.
        channels_last: "auto", True or False.
        announce: log one line with the choice and its reason.

    Raises:
        ConfigError: an unknown amp mode or channels_last value, fp16 on the CPU.
    """
    if amp not in AMP_MODES:
        raise ConfigError(f"runtime.amp={amp!r}: use one of {', '.join(AMP_MODES)}")
    if channels_last not in (True, False, "auto"):
        raise ConfigError(f"runtime.channels_last={channels_last!r}: use auto, true or false")
    dev = torch.device(device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    dtype: torch.dtype | None = None
    level = logging.INFO
    if amp == "none":
        reason = "runtime.amp = none"
    elif amp == "fp16":
        if kind != "cuda":
            raise ConfigError("runtime.amp=fp16 needs a CUDA GPU; use auto or bf16 on the CPU")
        dtype, reason = torch.float16, "runtime.amp = fp16"
    elif kind == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if ok or amp == "bf16":
            dtype, reason = torch.bfloat16, f"runtime.amp = {amp}, CUDA bf16 support: {ok}"
        else:
            reason = "runtime.amp = auto: this GPU has no bf16 support"
    else:
        ok, why = cpu_bf16_support()
        if ok:
            dtype, reason = torch.bfloat16, f"runtime.amp = {amp}: {why}"
        elif amp == "bf16":
            dtype, level = torch.bfloat16, logging.WARNING
            reason = f"runtime.amp = bf16 although {why}: emulated bf16, likely slower than FP32"
        else:
            reason = f"runtime.amp = auto: {why}; training in FP32 (--set runtime.amp=bf16 forces)"
    cl = dtype is not None if channels_last == "auto" else bool(channels_last)
    prec = Precision(kind, dtype, cl, reason)
    if announce:
        log.log(level, "training precision %s (%s)", prec.name, reason)
    return prec


def fused_options(device: torch.device | str) -> dict[str, bool]:
    """Keyword options of `torch.optim.SGD` / `Adam` for parameters on `device`: the fused
    (one kernel for every parameter) implementation on CUDA, the default elsewhere."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def configure_device(device: torch.device | str) -> None:
    """On CUDA: cuDNN benchmarks its convolution algorithms once per shape (a training run's
    shapes are fixed) and float32 matmuls may use TF32 (the FP32 parts: the FC inner loop)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
