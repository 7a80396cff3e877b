"""Array-namespace plumbing: the only module that imports array_api_compat."""

from __future__ import annotations

import sys

import array_api_compat
import array_api_compat.numpy as compat_numpy
import numpy as np

__all__ = ["astype", "device_of", "is_cupy_array", "namespace", "reshape", "to_numpy"]


def namespace(*arrays):
    """Array namespace shared by ``arrays`` (``None`` entries are ignored)."""
    present = [a for a in arrays if a is not None]
    if not present:
        msg = "no array given: at least one array argument is needed to pick a namespace"
        raise TypeError(msg)
    for a in present:
        if type(a) is not np.ndarray:
            return array_api_compat.array_namespace(*present)
    return compat_numpy  # the common case, without the lookup


def reshape(a, shape, xp):
    """``xp.reshape(a, shape)``, by a NumPy array's own method (per-call cost: 0.1 vs 0.7 us)."""
    return a.reshape(shape) if type(a) is np.ndarray else xp.reshape(a, shape)


def astype(a, dtype, xp):
    """``xp.astype(a, dtype)`` (a copy), by a NumPy array's own method."""
    return a.astype(dtype) if type(a) is np.ndarray else xp.astype(a, dtype)


def device_of(x):
    """Device of ``x`` in its namespace's own terms."""
    return array_api_compat.device(x)


def is_cupy_array(x) -> bool:
    """True when ``x`` is a CuPy array, without importing CuPy to find out."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def to_numpy(x) -> np.ndarray:
    """``x`` on the host as NumPy (a view when it already lives there; maybe read-only)."""
    if isinstance(x, np.ndarray):
        return x
    if is_cupy_array(x):
        return x.get()
    return np.from_dlpack(x, device="cpu")
