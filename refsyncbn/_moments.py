"""Local per-channel sums and element-wise passes on ``(A, C, B)`` views; pure, ``xp=``.

Every sum is accumulated in float64 whatever the input dtype, so float16 data
whose squares overflow float16 and float32 data with a large mean/std ratio
are both summed exactly enough. Per-channel vectors are float64 arrays of
shape ``(C,)``; ``mask3`` is a boolean ``(A, 1, B)`` array or ``None``.

Each public function dispatches once: unmasked, non-empty, C-contiguous NumPy
float32/float64 arrays take the cache-blocked NumPy kernels below; everything
else (other namespaces and dtypes, masks) the generic array-API code. Both
compute in float64 and round once to the output dtype; the kernels convert
blocks of about ``_BLOCK`` elements to float64 in cache, run their few passes
there (``out=`` buffers, no full-size temporaries) and never broadcast a
per-channel vector along the fast axis (measured ~3x slower than a scalar
operand in NumPy):

* sums: per (sample, channel) row when ``B >= _MIN_ROW`` (float64 matrix-vector
  products), else per column of ``(A, C*B)`` row blocks;
* element-wise passes: per channel slab ``x3[lo:hi, c, :]`` with scalar
  coefficients when ``B >= _MIN_SLAB``, else on ``(A, C*B)`` row blocks
  (widened to at least ``_MIN_WIDTH`` columns) with pre-expanded coefficient
  rows.

Sums that come out non-finite (Inf/NaN in the data) are recomputed by the
generic code, which defines how they propagate.
"""

from __future__ import annotations

import math

import numpy as np

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
    """``(sum x, sum (x - local mean)^2)`` per channel, float64 accumulation.

    The generic path is an exact two-pass; the NumPy kernels form
    ``Q - S^2 / n`` from float64 sums, whose cancellation costs about
    ``u64 * mean^2 / var`` relative (1e-10 at ``|mean| / std = 1e3``).
    """
    if mask3 is None and _fast(x3):
        with np.errstate(all="ignore"):  # a non-finite result is recomputed below
            s, m2 = _np_moments(x3)
        if _finite(s, m2):  # else Inf/NaN in x or float32 overflow: the float64 path decides
            return s, m2
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
    if dtype == x3.dtype and _fast(x3):
        return _np_affine([(x3, scale)], shift - mean * scale)
    y = (_f64(x3, xp=xp) - _col(mean, xp=xp)) * _col(scale, xp=xp) + _col(shift, xp=xp)
    return xp.astype(y, dtype)


def grad_sums(dy3, x3, mean, *, xp):
    """``(sum dy, sum dy * (x - mean))`` per channel over all positions (float64)."""
    if _fast(x3, dy3):
        with np.errstate(all="ignore"):
            a, b = _np_grad_sums(dy3, x3, mean)
        if _finite(a, b):
            return a, b
    dy = _f64(dy3, xp=xp)
    d = _f64(x3, xp=xp) - _col(mean, xp=xp)
    return _channel_sum(dy, xp=xp), _channel_sum(dy * d, xp=xp)


def grad_input(dy3, x3, mean, k_dy, k_x, k_0, mask3, *, xp, dtype):
    """``k_dy * dy - valid * (k_x * (x - mean) + k_0)`` per channel, in ``dtype``."""
    if mask3 is None and dtype == x3.dtype and _fast(x3, dy3):
        return _np_affine([(x3, -k_x), (dy3, k_dy)], k_x * mean - k_0)
    dy = _f64(dy3, xp=xp) * _col(k_dy, xp=xp)
    corr = (_f64(x3, xp=xp) - _col(mean, xp=xp)) * _col(k_x, xp=xp) + _col(k_0, xp=xp)
    return xp.astype(dy - _masked(corr, mask3, xp=xp), dtype)


# --- NumPy kernels --------------------------------------------------------------------

_BLOCK = 1 << 15  # elements per in-cache block (256 KiB in float64)
_MIN_ROW = 32  # B from which sums are taken per (sample, channel) row
_MIN_SLAB = 1024  # B from which element-wise passes go channel slab by channel slab
_MIN_WIDTH = 256  # column blocks are widened to at least this many columns


def _fast(*arrays) -> bool:
    """True when the NumPy kernels apply to ``arrays`` (see the module docstring)."""
    first = arrays[0]
    return (all(isinstance(a, np.ndarray) and a.dtype == first.dtype and a.flags.c_contiguous
                for a in arrays)
            and first.dtype in (np.float32, np.float64) and first.size > 0)


def _finite(*vectors) -> bool:
    return all(bool(np.isfinite(v).all()) for v in vectors)


def _blocks(n: int, width: int, multiple: int = 1) -> list:
    """``(lo, hi)`` ranges of ``n`` rows of ``width`` elements, about ``_BLOCK`` each."""
    step = max(1, _BLOCK // (width * multiple)) * multiple
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _col_blocks(a: int, k: int) -> list:
    """``(rows, cols, g)`` blocks of an ``(a, k)`` matrix (see :func:`_view`).

    A narrow matrix (``k < _MIN_WIDTH``) is widened, ``g`` rows side by side
    (and a tail with ``g = 1``); a wide one is cut into column chunks so that
    the coefficient rows of a chunk stay in cache.
    """
    if k < _MIN_WIDTH:
        g = -(-_MIN_WIDTH // k)
        full = a - a % g
        return ([(slice(lo, hi), slice(0, k), g) for lo, hi in _blocks(full, k, g)]
                + [(slice(full + lo, full + hi), slice(0, k), 1)
                   for lo, hi in _blocks(a - full, k)])
    width = min(k, _BLOCK)
    return [(slice(lo, hi), slice(k0, min(k0 + width, k)), 1)
            for k0 in range(0, k, width) for lo, hi in _blocks(a, width)]


def _view(m, rows, cols, g):
    """Block ``m[rows, cols]`` of a 2-D matrix, ``g`` rows side by side."""
    blk = m[rows, cols]
    return blk.reshape(-1, g * blk.shape[1]) if g > 1 else blk


def _wide(row, cols, g):
    """The coefficient row of a block: ``row[cols]`` repeated ``g`` times."""
    return np.tile(row[cols], g) if g > 1 else row[cols]


def _buffers(count: int, size: int) -> list:
    return [np.empty(size) for _ in range(count)]


def _work(buf, shape):
    """A C-contiguous float64 array of ``shape`` in the flat buffer ``buf``."""
    return buf[:math.prod(shape)].reshape(shape)


def _block64(block, buf):
    """``block`` itself if float64, else its float64 copy in ``buf``."""
    if block.dtype == np.float64:
        return block
    out = _work(buf, block.shape)
    np.copyto(out, block)
    return out


def _max_block(blocks, k) -> int:
    """Elements of the largest block of :func:`_col_blocks`."""
    return max((r.stop - r.start) * (c.stop - c.start) for r, c, _ in blocks)


def _np_moments(x3):
    """NumPy ``sum_and_m2``: float64 sums ``S``, ``Q``; ``M2 = Q - S^2 / n``."""
    s, q = _np_sum_and_dot(x3, x3)
    return s, q - s * s / (x3.shape[0] * x3.shape[2])


def _np_grad_sums(dy3, x3, mean):
    """NumPy ``grad_sums``: float64 sums ``sum dy`` and ``sum dy * x - mean * sum dy``."""
    sa, sb = _np_sum_and_dot(dy3, x3)
    return sa, sb - mean * sa


def _np_sum_and_dot(u3, v3):
    """Per channel, float64 ``(sum u, sum u * v)``; ``v3`` may be ``u3`` itself."""
    a, c, b = u3.shape
    same = v3 is u3
    if b >= _MIN_ROW:
        urows, vrows = u3.reshape(a * c, b), v3.reshape(a * c, b)
        blocks = _blocks(a * c, b)
        bu, bv = _buffers(2, blocks[0][1] * b)
        ones = np.ones(b)
        su, suv = np.empty(a * c), np.empty(a * c)
        for lo, hi in blocks:
            t = _block64(urows[lo:hi], bu)
            w = t if same else _block64(vrows[lo:hi], bv)
            np.matmul(t, ones, out=su[lo:hi])
            np.vecdot(t, w, out=suv[lo:hi])
        return su.reshape(a, c).sum(axis=0), suv.reshape(a, c).sum(axis=0)
    k = c * b
    u2, v2 = u3.reshape(a, k), v3.reshape(a, k)
    su, suv = np.zeros(k), np.zeros(k)
    blocks = _col_blocks(a, k)
    bu, bv, prod = _buffers(3, _max_block(blocks, k))
    for rows, cols, g in blocks:
        t = _block64(_view(u2, rows, cols, g), bu)
        w = t if same else _block64(_view(v2, rows, cols, g), bv)
        ones = np.ones(t.shape[0])
        su[cols] += (ones @ t).reshape(g, -1).sum(axis=0)
        tw = np.multiply(t, w, out=_work(prod, t.shape))
        suv[cols] += (ones @ tw).reshape(g, -1).sum(axis=0)
    return su.reshape(c, b).sum(axis=1), suv.reshape(c, b).sum(axis=1)


def _np_affine(terms, const):
    """``sum_i coef_i * array_i + const`` per channel; ``terms`` = ``[(array3, coef)]``.

    Float64 arithmetic, rounded once into an array of the dtype of ``array3``.
    """
    x3 = terms[0][0]
    a, c, b = x3.shape
    out = np.empty_like(x3)
    if b >= _MIN_SLAB:
        blocks = _blocks(a, b)
        bufs = _buffers(2, blocks[0][1] * b)
        for j in range(c):
            for lo, hi in blocks:
                _affine_block([(v[lo:hi, j], k[j]) for v, k in terms], const[j],
                              out[lo:hi, j], bufs)
        return out
    k = c * b
    rows = [np.repeat(v, b) for _, v in terms] + [np.repeat(const, b)]
    mats = [v.reshape(a, k) for v, _ in terms]
    blocks = _col_blocks(a, k)
    bufs = _buffers(2, _max_block(blocks, k))
    for r, cols, g in blocks:
        coefs = [_wide(row, cols, g) for row in rows]
        _affine_block([(_view(m, r, cols, g), co) for m, co in zip(mats, coefs, strict=False)],
                      coefs[-1], _view(out.reshape(a, k), r, cols, g), bufs)
    return out


def _affine_block(terms, const, out, bufs):
    """``out = sum coef * array + const`` on one block, in the flat float64 ``bufs``.

    Explicit float64 copies and float64-only ufuncs: mixed-dtype ufuncs cast
    through NumPy's buffers and run ~1.5x slower.
    """
    acc = _block64(terms[0][0], bufs[0])
    np.multiply(acc, terms[0][1], out=_work(bufs[0], out.shape))
    acc = _work(bufs[0], out.shape)
    for v, k in terms[1:]:
        tmp = _block64(v, bufs[1])
        np.add(acc, np.multiply(tmp, k, out=_work(bufs[1], out.shape)), out=acc)
    if out.dtype == np.float64:
        np.add(acc, const, out=out)
    else:
        np.copyto(out, np.add(acc, const, out=acc), casting="same_kind")
