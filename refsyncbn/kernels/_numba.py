"""Numba backend: fused loops over ``(A, C, B)`` views, float64 accumulation.

Each kernel reads its inputs once from memory and writes its output once:

* ``moments``: one read of ``x``: per channel, ``sum (x - K)`` and
  ``sum (x - K)^2`` about a fixed pivot ``K``, the mean of a sample of 32 of
  its values (no ``sum x^2 - (sum x)^2 / n`` cancellation while ``K`` is near
  the mean); sums of blocks (row chunks, or blocks of rows of the
  ``(A, C*B)`` matrix) added with compensation (:func:`_add`). A pivot that
  turns out far from the mean (a skewed sample) makes :func:`moments` read
  ``x`` once more about the mean just found; a matrix that is one block in
  cache (NC) is read twice, its own mean the pivot;
* ``normalize``: ``(x - mean) * scale + shift`` in float64, rounded once;
* ``grad_sums``: ``sum dy`` and ``sum dy * (x - mean)`` in one read of both;
* ``grad_input``: ``k_dy * dy - valid * (k_x * (x - mean) + k_0)``, rounded once.

Two loop orders cover the layouts: rows of ``B`` elements when ``B`` is long
(NCHW, NCDHW: the contiguous axis is ``B``), else the ``(A, C*B)`` matrix
column by column (NHWC, NC, short NCL: the contiguous axis is ``C*B``), whose
``C*B`` column results are folded into channels at the end. Where the rows
come from cache (``_L2_BYTES``) the column sums are swept four rows at a time
and ``normalize``/``grad_input`` two, so that each per-column sum or
coefficient is loaded once per several rows.
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

NAME = "numba"

_ROW_MIN = 32  # B from which kernels run along rows of B elements
_SAMPLE = 32  # values (rows) per channel whose mean is the pivot of the moments
_FAR = 2.0  # recompute about the mean when P > _FAR * M2 (see _finish)
_BLOCK = 1 << 16  # elements per block of the moments' sums (a chain of roundings)
# Operands up to this size (a core's L2) are swept four rows at a time: in cache that
# cuts the loads and stores of the per-column sums by four; out of cache the four
# interleaved row streams ran up to 2x slower than memory for float64 rows, but the
# sums of float32 operands gained (NHWC 32x56x56x64: gradient sums 2.4 -> 2.0 ms,
# moments 1.6 -> 1.2 ms).
_L2_BYTES = 1 << 20
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_jit = numba.njit(cache=True, nogil=True)
_jit_ieee = numba.njit(cache=True, nogil=True, error_model="numpy")  # 1 / 0 is inf, not an error
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

    One read of ``x`` about a pivot per channel, the mean of a sample of its
    values; where the pivot turns out far from the mean (``P > _FAR * M2``, see
    :func:`_finish`), a second read about the mean just found.
    """
    _, c, b = x3.shape
    if x3.size == 0:  # no element (an empty batch, or no spatial position)
        return np.zeros(c), np.zeros(c)
    if b >= _ROW_MIN:
        mask = _rows_mask(mask3)
        mean, m2, far = _moments_rows(x3, mask, _BLOCK, _sample_mean_rows(x3, mask))
        if far:
            mean, m2, _ = _moments_rows(x3, mask, _BLOCK, _finite(mean))
        return mean, m2
    x2, mask = _matrix(x3), _matrix_mask(mask3, x3.shape)
    rows, four = max(1, _BLOCK // max(c * b, 1)), x3.nbytes <= _L2_BYTES or x3.itemsize == 4
    if mask is None and b == 1 and x2.shape[0] <= rows:  # one block (NC): its own mean
        return _single_block_moments(x2, four)
    mean, m2, far = _moments_cols(x2, mask, rows, b, four, _sample_mean_cols(x2, mask, b))
    if far:
        mean, m2, _ = _moments_cols(x2, mask, rows, b, four, _finite(mean))
    return mean, m2


def _finite(mean):
    """The means as pivots: 0 for an Inf/NaN mean (whose channel stays Inf/NaN)."""
    return np.where(np.isfinite(mean), mean, 0.0)


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


def scales(var, eps, weight, bias, *, xp):
    """``(1 / sqrt(var + eps), invstd * weight, bias)`` per channel, float64 (one call)."""
    return _scales(var, float(eps), _operand(weight), _operand(bias))


def coefficients(k_dy, kinvstd, a, b, omega, *, xp):
    """``(k_dy * (kinvstd * b * omega), k_dy * a * omega)`` per channel (one call)."""
    return _coefficients(k_dy, kinvstd, a, b, float(omega))


def _operand(v):
    """``v`` (dy, weight, bias) as these loops take it: another float dtype (float16)
    converted exactly to float64; None stays."""
    return v if v is None or v.dtype in _DTYPES else np.asarray(v, dtype=np.float64)


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


@_jit_ieee
def _scales(var, eps, weight, bias):
    """:func:`scales`, each operation rounded as NumPy rounds it."""
    n = var.size
    invstd, scale, shift = np.empty(n), np.empty(n), np.zeros(n)
    for i in range(n):
        invstd[i] = 1.0 / np.sqrt(var[i] + eps)
        scale[i] = invstd[i] if weight is None else invstd[i] * np.float64(weight[i])
        if bias is not None:
            shift[i] = bias[i]
    return invstd, scale, shift


@_jit_ieee
def _coefficients(k_dy, kinvstd, a, b, omega):
    """:func:`coefficients`, each operation rounded as NumPy rounds it."""
    n = k_dy.size
    k_x, k_0 = np.empty(n), np.empty(n)
    for i in range(n):
        k_x[i] = k_dy[i] * (kinvstd[i] * b[i] * omega)
        k_0[i] = k_dy[i] * a[i] * omega
    return k_x, k_0


@_jit
def _single_block_moments(x, four):
    """``(mean, M2)`` per column of ``x`` as one block: the corrected two-pass, the
    pivot the block's own mean (a first read, from cache)."""
    na, nk = x.shape
    mu, t, p = np.empty(nk), np.empty(nk), np.empty(nk)
    _col_sums(x, 0, na, mu, four)
    mu /= na
    _col_shifted(x, 0, na, mu, t, p, four)
    mean, m2 = np.empty(nk), np.empty(nk)
    for j in range(nk):
        total = na * mu[j]
        mean[j] = mu[j] + t[j] / na if abs(total) < np.inf else total / na  # Inf/NaN: plain mean
        m2[j] = p[j] - t[j] * t[j] / na
    return mean, m2


@_jit_sum
def _col_sums(x, lo, hi, s, four):
    """``s[j] = sum x[lo:hi, j]`` in float64, four rows a sweep when ``four`` (see
    :func:`_col_shifted`)."""
    s[:] = 0.0
    a = lo
    while four and a + 4 <= hi:
        for j in range(x.shape[1]):
            s[j] += (np.float64(x[a, j]) + np.float64(x[a + 1, j])) + (
                np.float64(x[a + 2, j]) + np.float64(x[a + 3, j])
            )
        a += 4
    for i in range(a, hi):
        for j in range(x.shape[1]):
            s[j] += x[i, j]


@_jit
def _add(st, row, i, v):
    """``st[row, i] += v`` with Neumaier's compensation kept in ``st[row + 2, i]``.

    Many blocks add onto one sum (one far larger than the others, say):
    compensated, the sum's own roundings stay below one ulp of it.
    """
    s = st[row, i]
    t = s + v
    if abs(s) >= abs(v):
        st[row + 2, i] += (s - t) + v
    else:
        st[row + 2, i] += (v - t) + s
    st[row, i] = t


@_jit
def _compensated(s, c):
    """A compensated sum's value; an infinite sum stays (its compensation is NaN)."""
    return s + c if abs(s) < np.inf else s


@_jit
def _finish(st):
    """``(mean, M2, far)`` of the entries of a moments state (zeros without elements).

    ``st`` rows: count ``n``, pivot ``K``, ``T = sum (x - K)``, ``P = sum (x - K)^2``
    and the compensations of ``T`` and ``P`` (:func:`_add`). ``mean = K + T / n``
    and ``M2 = P - T^2 / n``; the subtraction costs about ``u P / M2`` relative,
    so ``far`` says that some entry's pivot was far from its mean
    (``P > _FAR * M2``, a pivot beyond about a standard deviation).
    """
    size = st.shape[1]
    mean, m2 = np.zeros(size), np.zeros(size)
    far = False
    for i in range(size):
        n = st[0, i]
        if n > 0:
            t, p = _compensated(st[2, i], st[4, i]), _compensated(st[3, i], st[5, i])
            mean[i] = st[1, i] + t / n  # Inf/NaN in the data: Inf/NaN
            v = p - t * t / n
            m2[i] = 0.0 if v < 0 else v  # rounding; a NaN stays
            far = far or p > _FAR * m2[i]
    return mean, m2, far


@_jit_sum
def _moments_rows(x, mask, block, pivot):
    """Sums about ``pivot`` along each row chunk of ``block`` elements, added per channel."""
    na, nc, nb = x.shape
    st = np.zeros((6, nc))
    st[1, :] = pivot
    for a in range(na):
        for c in range(nc):
            for lo in range(0, nb, block):
                if mask is None:
                    k, t, p = _shifted(x[a, c, lo : lo + block], pivot[c])
                else:
                    k, t, p = _shifted_masked(
                        x[a, c, lo : lo + block], mask[a, 0, lo : lo + block], pivot[c]
                    )
                st[0, c] += k
                _add(st, 2, c, t)
                _add(st, 3, c, p)
    return _finish(st)


@_jit_sum
def _shifted(v, pivot):
    """``(count, sum (v - pivot), sum (v - pivot)^2)`` of a 1-D chunk.

    (A loop over a 1-D slice vectorizes; the same loop inlined with chunk bounds did not.)
    """
    t, p = 0.0, 0.0
    for j in range(v.size):
        d = v[j] - pivot
        t += d
        p += d * d
    return v.size, t, p


@_jit_sum
def _shifted_masked(v, valid, pivot):
    """:func:`_shifted` over the positions where ``valid`` is true."""
    t, p, k = 0.0, 0.0, 0
    for j in range(v.size):
        if valid[j]:
            d = v[j] - pivot
            t += d
            p += d * d
            k += 1
    return k, t, p


@_jit_sum
def _moments_cols(x, mask, rows, nb, four, pivot):
    """Sums about the channel's ``pivot`` down blocks of ``rows`` rows per column of
    ``(A, C*B)``, added per column, then per channel.

    Blocks keep each column's chain of roundings short; four rows a sweep when
    ``four`` (``x`` in cache, or float32).
    """
    na, nk = x.shape
    kp = _widen(pivot, nb)
    st = np.zeros((6, nk))
    st[1, :] = kp
    t, p, k = np.empty(nk), np.empty(nk), np.empty(nk)
    for lo in range(0, na, rows):
        hi = min(lo + rows, na)
        if mask is None:
            _col_shifted(x, lo, hi, kp, t, p, four)
            k[:] = hi - lo
        else:
            t[:] = 0.0
            p[:] = 0.0
            k[:] = 0.0
            for a in range(lo, hi):
                for j in range(nk):
                    if mask[a, j]:
                        d = x[a, j] - kp[j]
                        t[j] += d
                        p[j] += d * d
                        k[j] += 1.0
        for j in range(nk):
            st[0, j] += k[j]
            _add(st, 2, j, t[j])
            _add(st, 3, j, p[j])
    if nb == 1:
        return _finish(st)
    channels = np.zeros((6, nk // nb))
    channels[1, :] = pivot  # every column of a channel has the channel's pivot: sums add
    for c in range(nk // nb):
        for j in range(c * nb, (c + 1) * nb):  # (no j // nb: an integer division each)
            channels[0, c] += st[0, j]
            for row in (2, 3):
                _add(channels, row, c, st[row, j])
                channels[row + 2, c] += st[row + 2, j]
    return _finish(channels)


@_jit_sum
def _col_shifted(x, lo, hi, kp, t, p, four):
    """``t[j] = sum (x[lo:hi, j] - kp[j])`` and ``p[j] = sum (x[lo:hi, j] - kp[j])^2``.

    Four rows a sweep when ``four``: in cache, a sweep per row is bound by the
    loads and stores of ``t`` and ``p``.
    """
    t[:] = 0.0
    p[:] = 0.0
    a = lo
    while four and a + 4 <= hi:
        for j in range(x.shape[1]):
            m = kp[j]
            d0, d1, d2, d3 = x[a, j] - m, x[a + 1, j] - m, x[a + 2, j] - m, x[a + 3, j] - m
            t[j] += (d0 + d1) + (d2 + d3)
            p[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        a += 4
    _add_shifted_rows(x, a, hi, kp, t, p)


@_jit_sum
def _add_shifted_rows(x, lo, hi, kp, t, p):
    """:func:`_col_shifted`'s sums, a sweep per row.

    A function of its own: the same loop after the four-row sweeps read ``x``
    from memory at two thirds of the speed (float64).
    """
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            d = x[i, j] - kp[j]
            t[j] += d
            p[j] += d * d


@_jit
def _sample_mean_rows(x, mask):
    """Per channel, the mean of up to ``_SAMPLE`` valid values spread over ``(A, B)``.

    0 where there is none or the mean is not finite (Inf/NaN in the sample).
    """
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
        m = s / max(k, 1)
        out[c] = m if abs(m) < np.inf else 0.0
    return out


@_jit
def _sample_mean_cols(x, mask, nb):
    """Per channel of ``(A, C*B)``, the mean of its valid values in up to ``_SAMPLE``
    spread rows (0 where there is none or it is not finite)."""
    na, nk = x.shape
    step = max(1, na // _SAMPLE)
    cs, ck = np.zeros(nk), np.zeros(nk)  # per column first: a loop that vectorizes
    for a in range(0, na, step):
        for j in range(nk):
            if mask is None or mask[a, j]:
                cs[j] += x[a, j]
                ck[j] += 1.0
    s = np.zeros(nk // nb)
    for c in range(s.size):
        total, k = 0.0, 0.0
        for j in range(c * nb, (c + 1) * nb):
            total += cs[j]
            k += ck[j]
        m = total / max(k, 1.0)
        s[c] = m if abs(m) < np.inf else 0.0
    return s


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
    """``sa[j] += sum dy[lo:hi, j]``, ``sb[j] += sum dy * (x - m)[lo:hi, j]``, a sweep per row (see :func:`_add_shifted_rows`)."""
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            g = np.float64(dy[i, j])
            sa[j] += g
            sb[j] += g * (x[i, j] - m[j])


@_jit
def _fold(u, v, nb):
    """Per-channel sums of ``u`` and ``v`` over each channel's ``nb`` consecutive columns, in order."""
    fu, fv = np.zeros(u.size // nb), np.zeros(v.size // nb)
    for c in range(fu.size):
        for j in range(c * nb, (c + 1) * nb):
            fu[c] += u[j]
            fv[c] += v[j]
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
