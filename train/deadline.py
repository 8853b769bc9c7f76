"""A graceful stop that the training loops honour: the deadline guard of a time-limited job.

A job that must end by a deadline (the GPU plan's compute command, `scripts/gpu/mini/`) calls
`install()`; a SIGINT or SIGTERM then only sets a flag. Pre-training and meta-transfer check
`requested()` at every step (through `mtl_edge.train.budget.stop_now`): the stage ends its
epoch early, writes its checkpoints and returns normally, so what was trained is kept. A second
signal interrupts at once (KeyboardInterrupt), as without the guard. Without `install()`
nothing changes: Ctrl-C interrupts as usual.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

_STOP = threading.Event()


def _handler(signum: int, _frame: FrameType | None) -> None:
    if _STOP.is_set():
        raise KeyboardInterrupt
    _STOP.set()
    log.warning("%s: stopping after the current step (a second one interrupts at once)",
                signal.Signals(signum).name)  # fmt: skip


def install(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Make `signals` request a graceful stop instead of interrupting (main thread only)."""
    for sig in signals:
        signal.signal(sig, _handler)


def request() -> None:
    """Ask the training loops to stop after their current step."""
    _STOP.set()


def requested() -> bool:
    """Whether a stop was asked for."""
    return _STOP.is_set()


def clear() -> None:
    """Forget a stop request (the next job in the same process starts fresh)."""
    _STOP.clear()
