"""`.npy` bytes from untrusted files (bundles, galleries), parsed without trusting the header.

`numpy.load` allocates the array the header describes before reading the data, so a 100-byte
file that claims a (10**12,) array costs terabytes of address space. Here the header is parsed
first, its dtype checked against a short list (never objects, never pickles), and the data
length must equal what the shape and dtype need before any array is made.
"""

from __future__ import annotations

import io
import math

import numpy as np

#: dtypes the project stores: features, labels, head weights.
NPY_DTYPES = ("<f2", "<f4", "<f8", "<i4", "<i8")


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as .npy bytes (C order, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def parse_npy(data: bytes, dtypes: tuple[str, ...] = NPY_DTYPES) -> np.ndarray:
    """The array in .npy `data`.

    Args:
        dtypes: accepted dtype strings (numpy's `dtype.str`, little-endian).

    Returns:
        a read-only array of the stored shape and dtype.

    Raises:
        ValueError: not .npy, another dtype, Fortran order, or a data length that does not
            match the header.
    """
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"npy format version {version}")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises several types
        raise ValueError(f"bad npy header ({type(e).__name__})") from None
    if dtype.str not in dtypes:
        raise ValueError(f"dtype {dtype.str} (expected one of {', '.join(dtypes)})")
    if fortran:
        raise ValueError("Fortran-ordered array")
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"bad shape {shape}")
    count = math.prod(shape)
    offset = buf.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"shape {shape} needs {count * dtype.itemsize} bytes, the member has "
            f"{len(data) - offset}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
