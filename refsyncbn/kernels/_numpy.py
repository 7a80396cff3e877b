"""NumPy / generic array-API kernels: the always-available backend and the reference.

The interface is described in :mod:`refsyncbn.kernels`. The code is plain
array-API code, so it runs on any namespace (array-api-strict, CuPy without
its own backend, float16 and bfloat16 inputs). NumPy arrays are processed in
tiles ``x3[a0:a1, :, b0:b1]`` of about ``_BLOCK`` elements, converted to
float64 in cache, so that no full-size float64 temporary is made; other
namespaces get the whole array as one tile.

Moments are the corrected two-pass of each tile (mean ``t = sum x / n``, then
``d = x - t``, ``mean = t + sum d / n``, ``M2 = sum d^2 - (sum d)^2 / n``;
Chan, Golub and LeVeque 1983), tiles merged in order with Chan's pairwise
formula: no cancellation, whatever ``|mean| / std``.
"""

from __future__ import annotations

import numpy as np

from . import _pool

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

NAME = "numpy"
_BLOCK = 1 << 16  # elements per tile of a NumPy array (512 KiB in float64)


def supports(x) -> bool:
    """Every validated input: this is generic array-API code."""
    return True


def count(x3, mask3, *, xp) -> int:
    """Elements per channel: ``A * B``, or the number of valid mask positions."""
    if mask3 is None:
        return int(x3.shape[0] * x3.shape[2])
    return int(xp.sum(xp.astype(mask3, xp.int64)))


def moments(x3, mask3, *, xp):
    """Local ``(mean, M2)`` per channel, float64, cancellation-free (see module docstring)."""
    with np.errstate(all="ignore"):  # NaN/Inf data propagate per channel, silently
        n, mean, m2 = 0, None, None
        for ta, tb in _tiles(x3):
            t = _tile_moments(x3[ta, :, tb], None if mask3 is None else mask3[ta, :, tb], xp=xp)
            if t is None:
                continue
            if mean is None:
                n, mean, m2 = t
                continue
            nb, mb, m2b = t
            total = n + nb
            delta = mb - mean
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta * delta * (n * nb / total)
            n = total
    if mean is None:
        zeros = xp.zeros((x3.shape[1],), dtype=xp.float64, device=x3.device)
        return zeros, zeros
    return mean, m2


def normalize(x3, mean, scale, shift, *, xp, dtype):
    """``(x - mean) * scale + shift`` in float64, rounded once to ``dtype``."""
    mean, scale, shift = _col(mean, xp=xp), _col(scale, xp=xp), _col(shift, xp=xp)

    def tile(ta, tb):
        return xp.astype((_f64(x3[ta, :, tb], xp=xp) - mean) * scale + shift, dtype)

    return _tiled(tile, x3, dtype, xp=xp)


def grad_sums(dy3, x3, mean, invstd, *, xp):
    """``(sum dy, sum dy * (x - mean) * invstd)`` per channel over all positions (float64)."""
    mean = _col(mean, xp=xp)
    a, b = 0.0, 0.0
    with np.errstate(all="ignore"):
        for ta, tb in _tiles(x3):
            dy = _f64(dy3[ta, :, tb], xp=xp)
            a = a + xp.sum(dy, axis=(0, 2))
            b = b + xp.sum(dy * (_f64(x3[ta, :, tb], xp=xp) - mean), axis=(0, 2))
    if isinstance(a, float):  # no element
        a = xp.zeros((x3.shape[1],), dtype=xp.float64, device=x3.device)
        return a, a
    return a, b * invstd


def grad_input(dy3, x3, mean, k_dy, k_x, k_0, mask3, *, xp, dtype):
    """``k_dy * dy - valid * (k_x * (x - mean) + k_0)`` in float64, rounded once to ``dtype``."""
    mean, k_dy, k_x, k_0 = (_col(v, xp=xp) for v in (mean, k_dy, k_x, k_0))

    def tile(ta, tb):
        corr = (_f64(x3[ta, :, tb], xp=xp) - mean) * k_x + k_0
        if mask3 is not None:
            corr = xp.where(mask3[ta, :, tb], corr, _zero(corr, xp=xp))
        return xp.astype(_f64(dy3[ta, :, tb], xp=xp) * k_dy - corr, dtype)

    return _tiled(tile, x3, dtype, xp=xp)


def scales(var, eps, weight, bias, *, xp):
    """``(1 / sqrt(var + eps), invstd * weight, bias)`` per channel, float64."""
    invstd = 1.0 / xp.sqrt(var + eps)
    scale = invstd if weight is None else invstd * xp.astype(weight, xp.float64)
    shift = xp.zeros_like(var) if bias is None else xp.astype(bias, xp.float64)
    return invstd, scale, shift


def coefficients(k_dy, kinvstd, a, b, omega, *, xp):
    """``(k_dy * (kinvstd * b * omega), k_dy * a * omega)`` per channel."""
    return k_dy * (kinvstd * b * omega), k_dy * a * omega


def _col(v, *, xp):
    """A per-channel vector ``(C,)`` as a broadcastable ``(1, C, 1)``."""
    return xp.reshape(v, (1, -1, 1))


def _zero(like, *, xp):
    """A float64 scalar 0 on the device of ``like``."""
    return xp.zeros((), dtype=xp.float64, device=like.device)


def _f64(a, *, xp):
    return xp.astype(a, xp.float64)


def _tiles(x3) -> list:
    """``(rows, cols)`` slices cutting ``x3`` into tiles of about ``_BLOCK`` elements."""
    a, c, b = x3.shape
    if not isinstance(x3, np.ndarray) or a * c * b <= _BLOCK:
        return [(slice(None), slice(None))]
    if c * b <= _BLOCK:
        step = _BLOCK // (c * b)
        return [(slice(lo, lo + step), slice(None)) for lo in range(0, a, step)]
    step = max(1, _BLOCK // c)
    return [(slice(i, i + 1), slice(lo, lo + step)) for i in range(a) for lo in range(0, b, step)]


def _tiled(tile, x3, dtype, *, xp):
    """``tile(rows, cols)`` over the tiles of ``x3``, assembled into one array of ``dtype``."""
    tiles = _tiles(x3)
    with np.errstate(all="ignore"):
        if len(tiles) == 1:
            return tile(*tiles[0])
        out = _pool.empty(x3.shape, dtype)
        for ta, tb in tiles:
            out[ta, :, tb] = tile(ta, tb)
    return out


def _tile_moments(x3, mask3, *, xp):
    """``(n, mean, M2)`` of one tile by the corrected two-pass, or None if it has no element."""
    x = _f64(x3, xp=xp)
    if mask3 is None:
        n = int(x3.shape[0] * x3.shape[2])
    else:
        n = int(xp.sum(xp.astype(mask3, xp.int64)))
        x = xp.where(mask3, x, _zero(x, xp=xp))
    if n == 0:
        return None
    t = xp.sum(x, axis=(0, 2), keepdims=True) / n
    d = x - t
    if mask3 is not None:
        d = xp.where(mask3, d, _zero(d, xp=xp))
    s1 = xp.sum(d, axis=(0, 2))
    m2 = xp.sum(d * d, axis=(0, 2)) - s1 * s1 / n
    t = xp.reshape(t, (-1,))
    mean = xp.where(xp.isfinite(t), t + s1 / n, t)  # an infinite mean stays (inf - inf = NaN)
    return n, mean, xp.maximum(m2, _zero(m2, xp=xp))
