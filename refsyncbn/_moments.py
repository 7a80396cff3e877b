"""Local per-channel sums and element-wise passes on ``(A, C, B)`` views; pure, ``xp=``.

Every sum is accumulated in float64 whatever the input dtype, so float16 data
whose squares overflow float16 and float32 data with a large mean/std ratio
are both summed exactly enough. Per-channel vectors are float64 arrays of
shape ``(C,)``; ``mask3`` is a boolean ``(A, 1, B)`` array or ``None``.
"""

from __future__ import annotations

__all__ = [
    "count",
    "grad_input",
    "grad_sums",
    "normalize",
    "sum_and_m2",
    "sumsq_about",
]


def _col(v, *, xp):
    """A per-channel vector ``(C,)`` as a broadcastable ``(1, C, 1)``."""
    return xp.reshape(v, (1, -1, 1))


def _f64(a, *, xp):
    return xp.astype(a, xp.float64)


def _masked(v, mask3, *, xp):
    """``v`` with invalid positions replaced by 0 (so NaN padding is ignored)."""
    if mask3 is None:
        return v
    return xp.where(mask3, v, xp.zeros((), dtype=v.dtype, device=v.device))


def _channel_sum(v, *, xp):
    return xp.sum(v, axis=(0, 2))


def count(x3, mask3, *, xp) -> int:
    """Elements per channel: ``A * B``, or the number of valid mask positions."""
    if mask3 is None:
        return int(x3.shape[0] * x3.shape[2])
    return int(xp.sum(xp.astype(mask3, xp.int64)))


def sum_and_m2(x3, mask3, n: int, *, xp):
    """``(sum x, sum (x - local mean)^2)`` per channel, exact two-pass (float64)."""
    x = _f64(x3, xp=xp)
    s = _channel_sum(_masked(x, mask3, xp=xp), xp=xp)
    if n == 0:
        return s, s
    return s, sumsq_about(x3, mask3, s / n, xp=xp)


def sumsq_about(x3, mask3, center, *, xp):
    """``sum (x - center)^2`` per channel (float64)."""
    d = _f64(x3, xp=xp) - _col(center, xp=xp)
    return _channel_sum(_masked(d * d, mask3, xp=xp), xp=xp)


def normalize(x3, mean, scale, shift, *, xp, dtype):
    """``(x - mean) * scale + shift`` computed in float64, returned in ``dtype``."""
    y = (_f64(x3, xp=xp) - _col(mean, xp=xp)) * _col(scale, xp=xp) + _col(shift, xp=xp)
    return xp.astype(y, dtype)


def grad_sums(dy3, x3, mean, *, xp):
    """``(sum dy, sum dy * (x - mean))`` per channel over all positions (float64)."""
    dy = _f64(dy3, xp=xp)
    d = _f64(x3, xp=xp) - _col(mean, xp=xp)
    return _channel_sum(dy, xp=xp), _channel_sum(dy * d, xp=xp)


def grad_input(dy3, x3, mean, k_dy, k_x, k_0, mask3, *, xp, dtype):
    """``k_dy * dy - valid * (k_x * (x - mean) + k_0)`` per channel, in ``dtype``."""
    dy = _f64(dy3, xp=xp) * _col(k_dy, xp=xp)
    corr = (_f64(x3, xp=xp) - _col(mean, xp=xp)) * _col(k_x, xp=xp) + _col(k_0, xp=xp)
    return xp.astype(dy - _masked(corr, mask3, xp=xp), dtype)
