"""Recycled memory for the large NumPy outputs of the kernels (``y``, ``dx``).

A large array often comes back from the operating system when freed: glibc maps
every allocation above its mmap threshold (at most 32 MiB) afresh, and trims
its heap when the free memory at its top exceeds twice that (``y`` and ``dx``
of a step, released together, do). The next ``np.empty`` then gets pages the
OS zeroes again on first touch: about 4 ms per 51 MB here, a third of a float64
training step of that size, and 3 ms per 26 MB float32 output where the heap
was trimmed. :func:`empty` hands out outputs of :data:`THRESHOLD` bytes and
more (NumPy's own threshold for advising huge pages) from memory that earlier
outputs of the same size have released, like CuPy's memory pool does for
device memory.

A buffer goes back to the pool only when no array uses it any more: the
output's base is a :class:`_Lease` object, which every view of the output
keeps alive (NumPy stops collapsing a view's base at an object that is not an
array), and a ``weakref.finalize`` of that lease returns the buffer. At most
:data:`KEEP` released buffers are kept (the most recent ones); setting the
environment variable ``REFSYNCBN_OUTPUT_POOL=0`` turns the pool off (and
drops what it holds at the next large allocation).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from contextlib import contextmanager

import numpy as np

__all__ = ["ENV_VAR", "KEEP", "THRESHOLD", "disabled", "empty"]

THRESHOLD = 4 << 20  # bytes
KEEP = 4  # released buffers kept: y and dx of two shapes
ENV_VAR = "REFSYNCBN_OUTPUT_POOL"

_lock = threading.RLock()  # re-entrant: a finalizer may run while this thread holds it
_free: list = []  # released uint8 buffers, oldest first


class _Lease:
    """The base of a pooled output: exposes its buffer as ``shape`` and ``dtype``."""

    __slots__ = ("__array_interface__", "__weakref__")

    def __init__(self, raw, shape, dtype):
        self.__array_interface__ = {
            "data": (raw.ctypes.data, False),
            "shape": shape,
            "typestr": dtype.str,
            "version": 3,
        }


def empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array like ``np.empty(shape, dtype)``.

    Arrays of at least :data:`THRESHOLD` bytes reuse a released buffer of the
    same size when the pool holds one.

    Examples
    --------
    >>> a = empty((2, 3), np.float32)          # small: plain np.empty
    >>> a.shape, a.dtype, a.flags.c_contiguous
    ((2, 3), dtype('float32'), True)
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < THRESHOLD:
        return np.empty(shape, dtype)
    shape = tuple(int(s) for s in shape)
    raw = None
    with _lock:
        if os.environ.get(ENV_VAR) == "0":
            _free.clear()
            return np.empty(shape, dtype)
        for i, buf in enumerate(_free):
            if buf.nbytes == nbytes:
                raw = _free.pop(i)
                break
    if raw is None:
        raw = np.empty(nbytes, np.uint8)
    lease = _Lease(raw, shape, dtype)
    weakref.finalize(lease, _release, raw).atexit = False
    return np.asarray(lease)


@contextmanager
def disabled():
    """Within: the pool is off (``REFSYNCBN_OUTPUT_POOL=0``), e.g. to measure a step's own memory."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = before


def _release(raw) -> None:
    """Return ``raw`` to the pool (the array using it is gone); keep the newest :data:`KEEP`."""
    with _lock:
        _free.append(raw)
        del _free[:-KEEP]
