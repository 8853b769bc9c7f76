"""Dataset pickles read safely: only numpy arrays and plain containers are rebuilt, so a dataset
file can never run code (CIFAR-100's python pickles, tieredImageNet's pickles)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from mtl_edge.errors import DatasetError

#: The only globals a dataset pickle may reference: what numpy needs to rebuild arrays
#: (including pickles written by Python 2 and numpy 1.x).
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("__builtin__", "object"),
    ("builtins", "object"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def load_data_pickle(path: Path) -> Any:
    """Unpickle a dataset file (Python 2 or 3) that may only hold data, never code.

    Raises:
        DatasetError: one line naming the file when it is missing, truncated or not data.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: no such file; check the dataset root")
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path}: not a readable data pickle ({e}); re-download it") from None


def pickle_entry(d: Any, key: str, path: Path) -> Any:
    """`d[key]`, accepting the bytes keys of Python 2 pickles."""
    if isinstance(d, dict):
        for k in (key, key.encode()):
            if k in d:
                return d[k]
    raise DatasetError(f"{path}: has no {key!r} entry; is this the right file?")


def as_text(value: Any) -> str:
    """A Python 2 pickle's bytes as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
