"""The smallest training recipe the driver tests share: synthetic 16x16 data, Conv-4 of width 8."""

from __future__ import annotations

import copy
from typing import Any

_BASE: dict[str, Any] = {
    "data": {
        "kind": "synthetic",
        "options": {
            "size": 16,
            "per_class": 12,
            "train_classes": 6,
            "val_classes": 5,
            "test_classes": 5,
        },
    },
    "model": {"backbone": "conv4", "args": {"width": 8}, "preprocess": {"size": 16}},
    "runtime": {"threads": 1},
}


def tiny_recipe(**tables: dict[str, Any]) -> dict[str, Any]:
    """A fresh copy of the base recipe with `tables` (e.g. pretrain={...}) added."""
    return copy.deepcopy(_BASE) | copy.deepcopy(tables)
