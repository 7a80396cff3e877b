"""Numba backend: fused loops over ``(A, C, B)`` views, float64 accumulation.

Each kernel reads its inputs once from memory and writes its output once:

* ``moments``: one read of ``x``; every cache-sized block (a row chunk
  ``x3[a, c, lo:hi]``, or a few rows of the ``(A, C*B)`` matrix) gets its own
  mean, then its M2 about that mean while it is in cache (two-pass, no
  ``sum x^2 - (sum x)^2 / n`` cancellation); the blocks are combined per
  channel about a fixed pivot, the mean of a sample of its values, with
  compensated sums (:func:`_combine`); a pivot that turns out far from the
  mean (a rare, skewed sample) makes :func:`moments` read ``x`` once more
  about the mean just found;
* ``normalize``: ``(x - mean) * scale + shift`` in float64, rounded once;
* ``grad_sums``: ``sum dy`` and ``sum dy * (x - mean)`` in one read of both;
* ``grad_input``: ``k_dy * dy - valid * (k_x * (x - mean) + k_0)``, rounded once.

Two loop orders cover the layouts: rows of ``B`` elements when ``B`` is long
(NCHW, NCDHW: the contiguous axis is ``B``), else the ``(A, C*B)`` matrix
column by column (NHWC, NC, short NCL: the contiguous axis is ``C*B``), whose
``C*B`` column results are folded into channels at the end. Where the rows
come from cache (``_L2_BYTES``) the column sums are swept four rows at a time
and ``normalize``/``grad_input`` two, so that each per-column sum or
coefficient is loaded once per several rows; a matrix that is one block (NC)
takes its moments straight from the two passes, without combining blocks.
Any strides work; C-contiguous views run vectorized. Only NumPy float32 and
float64 arrays come here (:func:`supports`); the interface is described in
:mod:`refsyncbn.kernels`.

Compiled lazily on first use and cached on disk (``cache=True``: in
``__pycache__`` next to this file, or numba's user cache directory when that is
not writable; ``NUMBA_CACHE_DIR`` overrides both). Reductions may reassociate
and contract (fused multiply-add) to vectorize, but never assume finite values,
so NaN and Inf propagate as in the NumPy backend.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _pool

__all__ = ["NAME", "count", "grad_input", "grad_sums", "moments", "normalize", "supports"]

NAME = "numba"

_ROW_MIN = 32  # B from which kernels run along rows of B elements
_SAMPLE = 32  # values per channel whose mean is the pivot of the block combination
_FAR = 2.0  # recompute about the mean when P > _FAR * M2 (see moments)
_BLOCK = 1 << 16  # elements per in-cache block of the two-pass moments (<= 512 KiB: L2)
# Operands up to this size (a core's L2) are swept four rows at a time: in cache that
# cuts the loads and stores of the per-column sums by four; out of cache the four
# interleaved row streams ran up to 2x slower than memory for float64 rows, but the
# gradient sums of float32 operands gained (NHWC 32x56x56x64: 2.4 -> 2.0 ms).
_L2_BYTES = 1 << 20
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_jit = numba.njit(cache=True, nogil=True)
_jit_sum = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})


def supports(x) -> bool:
    """True for NumPy float32/float64 arrays (what these loops take)."""
    return isinstance(x, np.ndarray) and x.dtype in _DTYPES


def count(x3, mask3, *, xp) -> int:
    """Elements per channel: ``A * B``, or the number of valid mask positions."""
    if mask3 is None:
        return int(x3.shape[0] * x3.shape[2])
    return int(np.count_nonzero(mask3))


def moments(x3, mask3, *, xp):
    """Local ``(mean, M2)`` per channel (float64; zeros for a channel without elements).

    The blocks are combined about a pivot per channel, the mean of a sample of
    its values; where the pivot turns out far from the mean (the blocks' sum of
    squares about it, ``P``, exceeds ``_FAR`` times M2, so that its rounding
    would show), the moments are computed again about the mean just found.
    """
    _, c, b = x3.shape
    if x3.size == 0:  # no element (an empty batch, or no spatial position)
        return np.zeros(c), np.zeros(c)
    if b >= _ROW_MIN:
        mask = _rows_mask(mask3)
        mean, m2, far = _moments_rows(x3, mask, _BLOCK, _sample_mean_rows(x3, mask))
        if far:
            mean, m2, _ = _moments_rows(x3, mask, _BLOCK, mean)
        return mean, m2
    x2, mask = _matrix(x3), _matrix_mask(mask3, x3.shape)
    rows, four = max(1, _BLOCK // max(c * b, 1)), x3.nbytes <= _L2_BYTES
    if mask is None and b == 1 and x2.shape[0] <= rows:  # a single block (NC): no pivot
        return _single_block_moments(x2, four)
    mean, m2, far = _moments_cols(x2, mask, rows, b, four, _sample_mean_cols(x2, mask, b))
    if far:
        mean, m2, _ = _moments_cols(x2, mask, rows, b, four, mean)
    return mean, m2


def normalize(x3, mean, scale, shift, *, xp, dtype):
    """``(x - mean) * scale + shift`` in float64, rounded once to ``dtype``; ``(A, C, B)``."""
    out = _pool.empty(x3.shape, dtype)
    b = x3.shape[2]
    if b >= _ROW_MIN:
        _normalize_rows(x3, mean, scale, shift, out)
    else:
        _normalize_cols(
            _matrix(x3), mean, scale, shift, b, _matrix(out), 2 * x3.nbytes <= _L2_BYTES
        )
    return out


def grad_sums(dy3, x3, mean, invstd, *, xp):
    """``(sum dy, sum dy * (x - mean) * invstd)`` per channel over all positions (float64)."""
    dy3, b = _operand(dy3), x3.shape[2]
    if x3.size == 0:
        sa = sb = np.zeros(x3.shape[1])
    elif b >= _ROW_MIN:
        sa, sb = _grad_sums_rows(dy3, x3, mean)
    else:  # column sums folded into channels by a separate loop: inlined, it slowed the sums
        four = dy3.nbytes + x3.nbytes <= _L2_BYTES or dy3.itemsize + x3.itemsize == 8
        sa, sb = _grad_sums_cols(_matrix(dy3), _matrix(x3), mean, b, four)
        if b > 1:
            sa, sb = _fold(sa, sb, b)
    return sa, sb * invstd


def grad_input(dy3, x3, mean, k_dy, k_x, k_0, mask3, *, xp, dtype):
    """``k_dy * dy - valid * (k_x * (x - mean) + k_0)`` per channel, rounded once to ``dtype``."""
    out = _pool.empty(x3.shape, dtype)
    dy3, b = _operand(dy3), x3.shape[2]
    if b >= _ROW_MIN:
        _grad_input_rows(dy3, x3, mean, k_dy, k_x, k_0, _rows_mask(mask3), out)
    else:
        _grad_input_cols(
            _matrix(dy3),
            _matrix(x3),
            mean,
            k_dy,
            k_x,
            k_0,
            b,
            _matrix_mask(mask3, x3.shape),
            _matrix(out),
            2 * x3.nbytes + dy3.nbytes <= _L2_BYTES,
        )
    return out


def _operand(dy3):
    """``dy3`` as these loops take it: a dy of another float dtype (float16) converted exactly."""
    return dy3 if dy3.dtype in _DTYPES else np.asarray(dy3, dtype=np.float64)


def _matrix(v3):
    """``(A, C, B)`` as ``(A, C*B)`` (a view when the strides allow, else a copy)."""
    a, c, b = v3.shape
    return v3.reshape(a, c * b)


def _rows_mask(mask3):
    """The mask as a fresh C-contiguous bool array: one compiled variant for every mask."""
    return None if mask3 is None else np.array(mask3, dtype=np.bool_, order="C")


def _matrix_mask(mask3, shape):
    """``(A, 1, B)`` mask expanded to an ``(A, C*B)`` matrix (C-contiguous, like :func:`_rows_mask`)."""
    if mask3 is None:
        return None
    return np.array(_matrix(np.broadcast_to(mask3, shape)), dtype=np.bool_, order="C")


# --- compiled loops ----------------------------------------------------------------------


@_jit
def _combine(st, i, k, mu, q, r):
    """Add a block of ``k`` elements to entry ``i`` of ``st``.

    ``mu`` is the block's rounded mean, ``q = sum (x - mu)^2`` and
    ``r = sum (x - mu)`` (the rounding of ``mu``, exact enough because
    ``x - mu`` cancels exactly): the block's mean is ``mu + r / k`` and its M2
    ``q - r^2 / k`` (the corrected two-pass algorithm; without ``r`` the mean's
    rounding enters the M2 to first order, 2e-10 relative at ``|mean| / std = 1e8``).

    ``st`` rows: count ``n``, pivot ``K`` (set by the caller), ``T = sum k (mu - K)``,
    ``P = sum k (mu - K)^2``, ``Q = sum M2``, ``S = sum k mu`` (the plain sum, the
    mean where it is not finite, as in the NumPy backend), then the compensations
    of ``T``, ``P`` and ``Q`` (:func:`_add`). Unlike Chan's running-mean update,
    whose rounded intermediate means also enter to first order, the block means
    are only differenced with one fixed pivot; :func:`_finish` forms
    ``M2 = Q + P - T^2 / n``, which is accurate while ``K`` is within about a
    standard deviation of the mean (``P`` at most a few times M2; else
    :func:`moments` starts again about the mean).
    """
    d = (mu - st[1, i]) + r / k
    st[0, i] += k
    _add(st, 2, i, k * d)
    _add(st, 3, i, k * d * d)
    _add(st, 4, i, q - r * r / k)
    st[5, i] += k * mu


@_jit
def _add(st, row, i, v):
    """``st[row, i] += v`` with Neumaier's compensation kept in ``st[row + 4, i]``.

    Many blocks add onto one large sum (one block far from the others, say):
    compensated, the sum's own roundings stay below one ulp of it.
    """
    s = st[row, i]
    t = s + v
    if abs(s) >= abs(v):
        st[row + 4, i] += (s - t) + v
    else:
        st[row + 4, i] += (v - t) + s
    st[row, i] = t


@_jit
def _single_block_moments(x, four):
    """``(mean, M2)`` per column of ``x`` as one block: the corrected two-pass, no pivot."""
    na, nk = x.shape
    mu, q, r = np.empty(nk), np.empty(nk), np.empty(nk)
    _col_sums(x, 0, na, mu, four)
    mu /= na
    _col_deviations(x, 0, na, mu, q, r)
    mean, m2 = np.empty(nk), np.empty(nk)
    for j in range(nk):
        total = na * mu[j]
        mean[j] = mu[j] + r[j] / na if abs(total) < np.inf else total / na  # Inf/NaN: plain mean
        m2[j] = q[j] - r[j] * r[j] / na
    return mean, m2


@_jit
def _finish(st):
    """``(mean, M2, far)`` of the entries of ``st`` (zeros for an entry without elements).

    ``far``: some entry's pivot was far from its mean (``P > _FAR * M2``).
    """
    size = st.shape[1]
    mean, m2 = np.zeros(size), np.zeros(size)
    far = False
    for i in range(size):
        n = st[0, i]
        if n > 0:
            t, p = st[2, i] + st[6, i], st[3, i] + st[7, i]
            between = p - t * t / n
            if between < 0:  # rounding; a NaN stays
                between = 0.0
            mean[i] = st[1, i] + t / n
            if not np.isfinite(st[5, i]):  # Inf/NaN in the data: the plain mean
                mean[i] = st[5, i] / n
            m2[i] = (st[4, i] + st[8, i]) + between
            far = far or p > _FAR * m2[i]
    return mean, m2, far


@_jit_sum
def _moments_rows(x, mask, block, pivot):
    """Two-pass moments of each in-cache chunk of each row, combined per channel about ``pivot``."""
    na, nc, nb = x.shape
    st = np.zeros((9, nc))
    st[1, :] = pivot
    for a in range(na):
        for c in range(nc):
            for lo in range(0, nb, block):
                if mask is None:
                    k, mu, q, r = _segment(x[a, c, lo : lo + block])
                else:
                    k, mu, q, r = _segment_masked(
                        x[a, c, lo : lo + block], mask[a, 0, lo : lo + block]
                    )
                if k > 0:
                    _combine(st, c, k, mu, q, r)
    return _finish(st)


@_jit_sum
def _segment(v):
    """``(count, mean, sum (v - mean)^2, sum (v - mean))`` of a 1-D chunk (two passes).

    (A loop over a 1-D slice vectorizes; the same loop inlined with chunk bounds did not.)
    """
    s = 0.0
    for j in range(v.size):
        s += v[j]
    mu = s / v.size
    q, r = 0.0, 0.0
    for j in range(v.size):
        d = v[j] - mu
        q += d * d
        r += d
    return v.size, mu, q, r


@_jit_sum
def _segment_masked(v, valid):
    """:func:`_segment` over the positions where ``valid`` is true (M2 0 when there are none)."""
    s, k = 0.0, 0
    for j in range(v.size):
        if valid[j]:
            s += v[j]
            k += 1
    mu = s / max(k, 1)
    q, r = 0.0, 0.0
    for j in range(v.size):
        if valid[j]:
            d = v[j] - mu
            q += d * d
            r += d
    return k, mu, q, r


@_jit_sum
def _moments_cols(x, mask, rows, nb, four, pivot):
    """Two-pass moments of blocks of ``rows`` rows per column, combined about the
    channel's ``pivot``; the columns' sums are then added per channel.

    The second pass reads the block from cache: four rows a sweep; the first
    too when ``four`` (all of ``x`` is in cache).
    """
    na, nk = x.shape
    s, q, r, k = np.empty(nk), np.empty(nk), np.empty(nk), np.empty(nk)
    st = np.zeros((9, nk))
    st[1, :] = _widen(pivot, nb)
    for lo in range(0, na, rows):
        hi = min(lo + rows, na)
        if mask is None:
            k[:] = hi - lo
            _col_sums(x, lo, hi, s, four)
        else:
            s[:] = 0.0
            k[:] = 0.0
            for a in range(lo, hi):
                for j in range(nk):
                    if mask[a, j]:
                        s[j] += x[a, j]
                        k[j] += 1.0
        for j in range(nk):
            s[j] = s[j] / k[j] if k[j] > 0 else 0.0
        if mask is None:
            _col_deviations(x, lo, hi, s, q, r)
        else:
            q[:] = 0.0
            r[:] = 0.0
            for a in range(lo, hi):
                for j in range(nk):
                    if mask[a, j]:
                        d = x[a, j] - s[j]
                        q[j] += d * d
                        r[j] += d
        for j in range(nk):
            if k[j] > 0:
                _combine(st, j, k[j], s[j], q[j], r[j])
    if nb == 1:
        return _finish(st)
    channels = np.zeros((9, nk // nb))
    channels[1, :] = pivot  # every column of a channel has the channel's pivot: sums add
    for j in range(nk):
        channels[0, j // nb] += st[0, j]
        channels[5, j // nb] += st[5, j]
        for row in (2, 3, 4):
            _add(channels, row, j // nb, st[row, j])
            channels[row + 4, j // nb] += st[row + 4, j]
    return _finish(channels)


@_jit
def _sample_mean_rows(x, mask):
    """Per channel, the mean of up to ``_SAMPLE`` valid values spread over ``(A, B)`` (0 if none)."""
    na, nc, nb = x.shape
    step = max(1, (na * nb) // _SAMPLE)
    out = np.zeros(nc)
    for c in range(nc):
        s, k = 0.0, 0
        for f in range(0, na * nb, step):
            a, j = f // nb, f % nb
            if mask is None or mask[a, 0, j]:
                s += x[a, c, j]
                k += 1
        out[c] = s / max(k, 1)
    return out


@_jit
def _sample_mean_cols(x, mask, nb):
    """Per channel of ``(A, C*B)``, the mean of its valid values in up to ``_SAMPLE`` spread rows."""
    na, nk = x.shape
    step = max(1, na // _SAMPLE)
    s, k = np.zeros(nk // nb), np.zeros(nk // nb)
    for a in range(0, na, step):
        for j in range(nk):
            if mask is None or mask[a, j]:
                s[j // nb] += x[a, j]
                k[j // nb] += 1.0
    for c in range(s.size):
        s[c] /= max(k[c], 1.0)
    return s


@_jit_sum
def _col_sums(x, lo, hi, s, four):
    """``s[j] = sum x[lo:hi, j]`` in float64, four rows a sweep of ``s`` when ``four``.

    Four rows a sweep load and store ``s[j]`` once per four elements (a sweep
    per row is bound by those stores when ``x`` is in cache).
    """
    s[:] = 0.0
    a = lo
    while four and a + 4 <= hi:
        for j in range(x.shape[1]):
            s[j] += (np.float64(x[a, j]) + np.float64(x[a + 1, j])) + (
                np.float64(x[a + 2, j]) + np.float64(x[a + 3, j])
            )
        a += 4
    _add_rows(x, a, hi, s)


@_jit_sum
def _add_rows(x, lo, hi, s):
    """``s[j] += sum x[lo:hi, j]``, a sweep per row.

    A function of its own: the same loop after the four-row sweeps in
    :func:`_col_sums` read x from memory at two thirds of the speed (float64).
    """
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            s[j] += x[i, j]


@_jit_sum
def _col_deviations(x, lo, hi, mu, q, r):
    """``q[j] = sum (x[lo:hi, j] - mu[j])^2`` and ``r[j] = sum (x[lo:hi, j] - mu[j])``, four rows a sweep."""
    q[:] = 0.0
    r[:] = 0.0
    a = lo
    while a + 4 <= hi:
        for j in range(x.shape[1]):
            m = mu[j]
            d0, d1, d2, d3 = x[a, j] - m, x[a + 1, j] - m, x[a + 2, j] - m, x[a + 3, j] - m
            q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            r[j] += (d0 + d1) + (d2 + d3)
        a += 4
    for i in range(a, hi):
        for j in range(x.shape[1]):
            d = x[i, j] - mu[j]
            q[j] += d * d
            r[j] += d


@_jit_sum
def _grad_sums_rows(dy, x, mean):
    """Per-channel ``sum dy`` and ``sum dy * (x - mean)`` along rows."""
    na, nc, nb = x.shape
    sa, sb = np.zeros(nc), np.zeros(nc)
    for a in range(na):
        for c in range(nc):
            m = mean[c]
            ra, rb = 0.0, 0.0
            for j in range(nb):
                g = np.float64(dy[a, c, j])
                ra += g
                rb += g * (x[a, c, j] - m)
            sa[c] += ra
            sb[c] += rb
    return sa, sb


@_jit_sum
def _grad_sums_cols(dy, x, mean, nb, four):
    """Per-column ``sum dy`` and ``sum dy * (x - mean)`` down the columns of ``(A, C*B)``.

    Four rows a sweep of the sums when ``four``, as in :func:`_col_sums`.
    """
    na, nk = x.shape
    m = np.repeat(mean, nb)  # per column (per-channel vectors are widened in here)
    sa, sb = np.zeros(nk), np.zeros(nk)
    a = 0
    while four and a + 4 <= na:
        for j in range(nk):
            g0, g1 = np.float64(dy[a, j]), np.float64(dy[a + 1, j])
            g2, g3 = np.float64(dy[a + 2, j]), np.float64(dy[a + 3, j])
            sa[j] += (g0 + g1) + (g2 + g3)
            sb[j] += (g0 * (x[a, j] - m[j]) + g1 * (x[a + 1, j] - m[j])) + (
                g2 * (x[a + 2, j] - m[j]) + g3 * (x[a + 3, j] - m[j])
            )
        a += 4
    _add_grad_rows(dy, x, m, a, na, sa, sb)
    return sa, sb


@_jit_sum
def _add_grad_rows(dy, x, m, lo, hi, sa, sb):
    """``sa[j] += sum dy[lo:hi, j]``, ``sb[j] += sum dy * (x - m)[lo:hi, j]``, a sweep per row (see :func:`_add_rows`)."""
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            g = np.float64(dy[i, j])
            sa[j] += g
            sb[j] += g * (x[i, j] - m[j])


@_jit
def _fold(u, v, nb):
    """Per-channel sums of ``u`` and ``v`` over each channel's ``nb`` consecutive columns, in order."""
    fu, fv = np.zeros(u.size // nb), np.zeros(v.size // nb)
    for j in range(u.size):
        fu[j // nb] += u[j]
        fv[j // nb] += v[j]
    return fu, fv


@_jit
def _normalize_rows(x, mean, scale, shift, out):
    """``out = (x - mean) * scale + shift`` along rows, rounded once at the store."""
    na, nc, nb = x.shape
    for a in range(na):
        for c in range(nc):
            m, k, t = mean[c], scale[c], shift[c]
            for j in range(nb):
                out[a, c, j] = (x[a, c, j] - m) * k + t


@_jit
def _normalize_cols(x, mean, scale, shift, nb, out, two):
    """``out = (x - mean) * scale + shift`` on ``(A, C*B)``, rounded once at the store."""
    na, nk = x.shape
    m, k, t = _widen(mean, nb), _widen(scale, nb), _widen(shift, nb)
    a = 0
    while two and a + 2 <= na:
        for j in range(nk):
            mj, kj, tj = m[j], k[j], t[j]
            out[a, j] = (x[a, j] - mj) * kj + tj
            out[a + 1, j] = (x[a + 1, j] - mj) * kj + tj
        a += 2
    for i in range(a, na):
        for j in range(nk):
            out[i, j] = (x[i, j] - m[j]) * k[j] + t[j]


@_jit
def _widen(v, nb):
    """A per-channel vector per column of ``(A, C*B)``: each entry ``nb`` times."""
    return v if nb == 1 else np.repeat(v, nb)


@_jit
def _grad_input_rows(dy, x, mean, kdy, kx, k0, mask, out):
    """``out = kdy * dy - valid * (kx * (x - mean) + k0)`` along rows, rounded once."""
    na, nc, nb = x.shape
    for a in range(na):
        for c in range(nc):
            m, g, h, z = mean[c], kdy[c], kx[c], k0[c]
            for j in range(nb):
                if mask is None or mask[a, 0, j]:
                    out[a, c, j] = g * dy[a, c, j] - (h * (x[a, c, j] - m) + z)
                else:
                    out[a, c, j] = g * dy[a, c, j]


@_jit
def _grad_input_cols(dy, x, mean, kdy, kx, k0, nb, mask, out, two):
    """``out = kdy * dy - valid * (kx * (x - mean) + k0)`` on ``(A, C*B)``, rounded once."""
    na, nk = x.shape
    m, g, h, z = _widen(mean, nb), _widen(kdy, nb), _widen(kx, nb), _widen(k0, nb)
    a = 0
    while two and mask is None and a + 2 <= na:
        for j in range(nk):
            mj, gj, hj, zj = m[j], g[j], h[j], z[j]
            out[a, j] = gj * dy[a, j] - (hj * (x[a, j] - mj) + zj)
            out[a + 1, j] = gj * dy[a + 1, j] - (hj * (x[a + 1, j] - mj) + zj)
        a += 2
    for i in range(a, na):
        for j in range(nk):
            if mask is None or mask[i, j]:
                out[i, j] = g[j] * dy[i, j] - (h[j] * (x[i, j] - m[j]) + z[j])
            else:
                out[i, j] = g[j] * dy[i, j]
