"""CuPy backend: fused GPU kernels over ``(A, C, B)`` views, float64 accumulation.

Imported only when CuPy arrays arrive (:func:`refsyncbn.kernels.select`). The
interface is described in :mod:`refsyncbn.kernels`; per-channel vectors are
broadcast as ``(1, C, 1)`` and reductions run over axes ``(0, 2)``:

* ``moments``: the corrected two-pass of the whole local batch, ``t = sum x / n``,
  then ``r = sum (x - t)`` and ``q = sum (x - t)^2`` (``mean = t + r / n``,
  ``M2 = q - r^2 / n``): three reads of ``x``, each a float64
  ``ReductionKernel``, no temporaries;
* ``normalize`` and ``grad_input``: one ``ElementwiseKernel`` each, float64
  arithmetic rounded once at the store;
* ``grad_sums``: two float64 reductions (``sum dy``, ``sum dy * (x - mean)``).

Kernels are compiled with ``--fmad=false``, so the GPU rounds each operation
as the CPU backends do (no fused multiply-add). float16 CuPy arrays go to the
generic NumPy-backend code (:func:`supports`).
"""

from __future__ import annotations

import cupy as cp

from ._numpy import coefficients, scales  # per-channel: generic array-API code

__all__ = [
    "NAME",
    "coefficients",
    "count",
    "grad_input",
    "grad_sums",
    "moments",
    "normalize",
    "scales",
    "supports",
]

NAME = "cupy"
_OPTIONS = ("--fmad=false",)

_SUM = cp.ReductionKernel(
    "T x, bool valid, float64 t",
    "float64 out",
    "valid ? (double)x - t : 0.0",
    "a + b",
    "out = a",
    "0",
    "refsyncbn_sum_about",
    options=_OPTIONS,
)
_SQUARES = cp.ReductionKernel(
    "T x, bool valid, float64 t",
    "float64 out",
    "valid ? ((double)x - t) * ((double)x - t) : 0.0",
    "a + b",
    "out = a",
    "0",
    "refsyncbn_squares_about",
    options=_OPTIONS,
)
_DOT = cp.ReductionKernel(
    "T dy, X x, float64 mean",
    "float64 out",
    "(double)dy * ((double)x - mean)",
    "a + b",
    "out = a",
    "0",
    "refsyncbn_dot_about",
    options=_OPTIONS,
)
_NORMALIZE = cp.ElementwiseKernel(
    "T x, float64 mean, float64 scale, float64 shift",
    "Y y",
    "y = (Y)(((double)x - mean) * scale + shift)",
    "refsyncbn_normalize",
    options=_OPTIONS,
)
_GRAD_INPUT = cp.ElementwiseKernel(
    "T dy, X x, float64 mean, float64 kdy, float64 kx, float64 k0, bool valid",
    "Y dx",
    "double g = kdy * (double)dy; dx = (Y)(valid ? g - (kx * ((double)x - mean) + k0) : g)",
    "refsyncbn_grad_input",
    options=_OPTIONS,
)


def supports(x) -> bool:
    """True for CuPy float32/float64 arrays."""
    return isinstance(x, cp.ndarray) and x.dtype in (cp.float32, cp.float64)


def count(x3, mask3, *, xp) -> int:
    """Elements per channel: ``A * B``, or the number of valid mask positions."""
    if mask3 is None:
        return int(x3.shape[0] * x3.shape[2])
    return int(cp.count_nonzero(mask3))


def moments(x3, mask3, *, xp):
    """Local ``(mean, M2)`` per channel by the corrected two-pass (see the module docstring)."""
    n = count(x3, mask3, xp=xp)
    c = x3.shape[1]
    if n == 0:
        zeros = cp.zeros(c, dtype=cp.float64)
        return zeros, zeros
    valid = _valid(mask3)
    t = _SUM(x3, valid, _zero(), axis=(0, 2)) / n
    tc = _col(t)
    r = _SUM(x3, valid, tc, axis=(0, 2))
    q = _SQUARES(x3, valid, tc, axis=(0, 2))
    mean = cp.where(cp.isfinite(t), t + r / n, t)  # an infinite mean stays, as in NumPy
    return mean, cp.maximum(q - r * r / n, 0.0)


def normalize(x3, mean, scale, shift, *, xp, dtype):
    """``(x - mean) * scale + shift`` in float64, rounded once to ``dtype``."""
    out = cp.empty(x3.shape, dtype=dtype)
    return _NORMALIZE(x3, _col(mean), _col(scale), _col(shift), out)


def grad_sums(dy3, x3, mean, invstd, *, xp):
    """``(sum dy, sum dy * (x - mean) * invstd)`` per channel over all positions (float64)."""
    a = _SUM(dy3, _valid(None), _zero(), axis=(0, 2))
    return a, _DOT(dy3, x3, _col(mean), axis=(0, 2)) * invstd


def grad_input(dy3, x3, mean, k_dy, k_x, k_0, mask3, *, xp, dtype):
    """``k_dy * dy - valid * (k_x * (x - mean) + k_0)`` in float64, rounded once to ``dtype``."""
    out = cp.empty(x3.shape, dtype=dtype)
    return _GRAD_INPUT(dy3, x3, _col(mean), _col(k_dy), _col(k_x), _col(k_0), _valid(mask3), out)


def _col(v):
    """A per-channel vector ``(C,)`` as a broadcastable ``(1, C, 1)``."""
    return cp.reshape(v, (1, -1, 1))


def _zero():
    """A broadcastable float64 zero on the current device."""
    return cp.zeros((1, 1, 1), dtype=cp.float64)


def _valid(mask3):
    """The mask, or a broadcastable True where there is none."""
    return cp.ones((1, 1, 1), dtype=cp.bool_) if mask3 is None else mask3
