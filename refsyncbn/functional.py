"""Functional SyncBatchNorm: ``forward`` and its hand-derived ``backward``.

The only caller of communicator collectives. Per channel, with ``m`` the global
element count of the group:

* each rank computes its record ``[n_r, mean_r, M2_r, e_r]`` with the kernels
  (cancellation-free, float64; ``e_r`` a power-of-two exponent, 0 unless the
  squares overflow) and the ranks' records are combined EXACTLY, in rank
  order, by :func:`combine_moments` inside ONE ``comm.combine``;
* ``invstd = 1 / sqrt(var + eps)``, ``y = (x - mean) * invstd * weight + bias``
  in float64, rounded once to the input dtype;
* backward combines ONE buffer ``[sum dy, sum dy * x_hat]`` and returns
  ``dx = weight * invstd * (dy - omega_r * (A + x_hat * B))`` where ``omega_r``
  is the weight of one of this rank's elements in the statistics (``1 / m``
  for count weighting, ``1 / (R n_r)`` for equal weighting over ``R``
  non-empty ranks).

Every pass (training or eval, forward or backward) starts with the agreement
(``_signature``, ``comm.agreement``): every rank validates its own inputs and
the group compares operation, call number, call signature and validation
outcome with one tiny integer all-reduce, so a bad input or a different call
on one rank raises a clear exception on every rank. The accuracy
contract and the math: ``docs/numerics.md``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import kernels
from ._signature import FLOAT_NAMES as _FLOAT_NAMES
from ._signature import agree_backward, agree_forward, reject
from ._signature import dtype_code as _dtype_code
from ._xp import astype, namespace, reshape
from .comm.local import LocalComm
from .conventions import REFERENCE, Convention, get_convention
from .layouts import Layout, get_layout

__all__ = [
    "VARIANCE_ALGORITHMS",
    "ForwardResult",
    "Grads",
    "Saved",
    "backward",
    "combine_moments",
    "forward",
    "ordered_sum",
]

VARIANCE_ALGORITHMS = ("stable", "naive")
_PARAM_GRADS = ("local", "sum", "mean")


@dataclass(eq=False, slots=True)
class Saved:
    """What :func:`backward` needs from :func:`forward` (treat as opaque and read-only;
    not frozen, which would cost 2 us a call).

    ``mean``, ``var`` and ``invstd`` are the float64 per-channel statistics
    used to normalize (batch statistics in training, running ones in eval);
    ``kernels`` is the kernel backend module (its name: ``kernels.NAME``).
    The kernels see ``x3``, ``kmean`` and ``kinvstd``: ``x``, ``mean`` and
    ``invstd`` themselves, or, where squares of ``x`` would overflow, ``x`` and
    ``mean`` divided and ``invstd`` multiplied by an exact power of two per
    channel (see ``docs/numerics.md``);
    ``count`` is the group's element count per channel (this rank's in eval);
    ``omega`` the weight of one of this rank's elements in the statistics;
    ``k_dy`` is ``weight * invstd``, the factor of ``dy`` in ``dx``.
    """

    x3: Any
    mask3: Any
    shape: tuple
    dtype: Any
    layout: Layout
    weight: Any
    mean: Any
    var: Any
    invstd: Any
    kmean: Any
    kinvstd: Any
    k_dy: Any
    count: int
    omega: float
    training: bool
    convention: Convention
    comm: Any
    kernels: Any
    xp: Any


@dataclass(frozen=True, eq=False)
class ForwardResult:
    """Output of :func:`forward`: ``y`` and the NEW running statistics."""

    y: Any
    saved: Saved
    running_mean: Any
    running_var: Any


@dataclass(frozen=True, eq=False)
class Grads:
    """Output of :func:`backward`; ``dweight``/``dbias`` are ``None`` without affine."""

    dx: Any
    dweight: Any
    dbias: Any


def forward(
    x,
    weight=None,
    bias=None,
    *,
    running_mean=None,
    running_var=None,
    training=True,
    eps=None,
    momentum=None,
    data_format="NCHW",
    convention=REFERENCE,
    variance="stable",
    mask=None,
    comm=None,
    backend=None,
    xp=None,
):
    """Synchronized batch-norm forward pass over the ranks of ``comm``.

    Parameters
    ----------
    x : array
        This rank's shard of the batch, laid out as ``data_format``; the local
        batch may be empty (it still joins every collective).
    weight, bias : array of shape (C,), optional
        Affine parameters; ``None`` means 1 and 0 (and no parameter gradients).
    running_mean, running_var : array of shape (C,), optional
        Running statistics; never modified. Both or neither.
    training : bool
        Normalize with batch statistics synchronized over ``comm`` and update
        the running statistics; otherwise normalize with the running statistics
        and move no data (the ranks still agree on the call).
    eps, momentum : float, optional
        Default to the convention's; ``momentum`` in the convention's meaning.
    data_format : str
        One of ``NC, NCL, NLC, NCHW, NHWC, NCDHW, NDHWC``.
    convention : Convention or str
        Weighting, running-variance and momentum rules (see ``conventions``).
    variance : {"stable", "naive"}
        ``stable``: per-rank ``(n, mean, M2)`` combined exactly (Chan), no
        cancellation; ``naive``: emulates ``E[x^2] - E[x]^2`` (Keras, Flax),
        which loses ``2 log10(|mean| / std)`` digits. Both: ONE collective.
    mask : bool array, optional
        Valid positions (shape of ``x`` without the channel axis): statistics
        use valid positions only; every position is normalized.
    comm : Communicator, optional
        Ranks to synchronize over; default a one-rank :class:`LocalComm`.
    backend : {"numpy", "numba", "cupy"}, optional
        Kernel backend (also used by :func:`backward`); default the
        ``REFSYNCBN_BACKEND`` environment variable, else chosen from ``x``
        (see :mod:`refsyncbn.kernels`).
    xp : namespace, optional
        Array namespace; resolved from the arrays when omitted.

    Returns
    -------
    ForwardResult
        ``y`` (input dtype), ``saved`` for :func:`backward`, and the new
        ``running_mean``/``running_var`` (``None`` when none were given).

    Raises
    ------
    ValueError, TypeError
        For invalid arguments, on every rank of ``comm`` (naming the rank at
        fault); ``ValueError`` when the whole group holds no element, or for the
        ``torch`` convention when it holds a single value per channel.

    Notes
    -----
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, statistics accumulated
    in float64; float64 outputs within a small multiple of ``u (1 + |mean| /
    std)`` of exact, lower-precision ``y`` correctly rounded, finite ``x`` of
    any magnitude handled by exact power-of-two scaling (the running variance
    is ``inf`` when the true one exceeds float64; ``weight / sqrt(var + eps)``
    must stay within float64, see ``docs/numerics.md``). New running
    statistics: ``r = r * (1 - w) + batch * w`` with
    ``w = momentum`` (``update``) or ``1 - momentum`` (``retain``); the batch
    variance fed to it is biased or unbiased as the convention says. With
    ``eps=0`` a channel whose variance is exactly 0 gives NaN (0 * inf), as in
    every framework.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> res = forward(x, running_mean=np.zeros(2), running_var=np.ones(2), data_format="NC")
    >>> np.round(res.y, 4)
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> res.running_mean
    array([0.2, 2. ])
    """
    comm = LocalComm() if comm is None else comm
    try:
        xp = xp or namespace(x, weight, bias, running_mean, running_var, mask)
        conv, layout = get_convention(convention), get_layout(data_format)
    except (TypeError, ValueError) as exc:
        reject(comm, exc, "forward(training=True)" if training else "forward(training=False)")
    eps = conv.eps if eps is None else eps
    momentum = conv.momentum if momentum is None else momentum

    error = _validate_forward(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        mask,
        layout,
        eps,
        momentum,
        training,
        variance,
        xp=xp,
    )
    kern = None
    if error is None:
        try:
            kern = kernels.select(x, backend)
        except (ValueError, TypeError) as err:
            error = err
    agree_forward(
        comm,
        error,
        x,
        weight,
        bias,
        running_mean,
        mask,
        layout,
        conv,
        eps,
        momentum,
        variance,
        training,
        xp=xp,
    )

    shape3 = layout.canonical_shape(x.shape)
    x3 = reshape(x, shape3, xp)
    mask3 = None if mask is None else reshape(mask, (shape3[0], 1, shape3[2]), xp)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # documented NaN/Inf
        if training:
            mean, var_s, pow2, m, omega, n = _batch_stats(
                x3, mask3, conv, variance, comm, kern, xp=xp
            )
            var = var_s if pow2 is None else var_s * pow2 * pow2  # may overflow: documented
            new_rm, new_rv = _update_running(
                running_mean, running_var, mean, var, m, n, conv, momentum, xp=xp
            )
        else:
            mean = astype(running_mean, xp.float64, xp)
            var, pow2 = astype(running_var, xp.float64, xp), None
            m, omega = kern.count(x3, mask3, xp=xp), 0.0
            new_rm, new_rv = running_mean, running_var
        if pow2 is None:  # weight * invstd is also backward's factor of dy
            kx3, kmean = x3, mean
            invstd, scale, shift = kern.scales(var, eps, weight, bias, xp=xp)
            kinvstd, k_dy = invstd, scale
        else:  # x / 2^E, mean / 2^E, invstd * 2^E: exact power-of-two scaling
            kx3 = astype(x3, xp.float64, xp) / reshape(pow2, (1, -1, 1), xp)
            kmean = mean / pow2
            kinvstd = 1.0 / xp.sqrt(var_s + eps / (pow2 * pow2))
            invstd = xp.where(xp.isfinite(var), 1.0 / xp.sqrt(var + eps), kinvstd / pow2)
            if eps > 0:  # var_s = 0: x - mean is 0 (M2 = 0), keep 0 * kinvstd finite
                kinvstd = xp.minimum(kinvstd, xp.full_like(kinvstd, np.finfo(np.float64).max))
            w64 = None if weight is None else astype(weight, xp.float64, xp)
            scale, k_dy = (kinvstd, invstd) if w64 is None else (kinvstd * w64, w64 * invstd)
            shift = xp.zeros_like(mean) if bias is None else astype(bias, xp.float64, xp)
    y3 = kern.normalize(kx3, kmean, scale, shift, xp=xp, dtype=x.dtype)
    saved = Saved(
        kx3,
        mask3,
        tuple(x.shape),
        x.dtype,
        layout,
        weight,
        mean,
        var,
        invstd,
        kmean,
        kinvstd,
        k_dy,
        m,
        omega,
        bool(training),
        conv,
        comm,
        kern,
        xp,
    )
    return ForwardResult(reshape(y3, x.shape, xp), saved, new_rm, new_rv)


def backward(dy, saved: Saved, *, param_grads=None):
    """Gradients of :func:`forward` with respect to ``x``, ``weight`` and ``bias``.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to ``y``, the shape of ``x``.
    saved : Saved
        ``forward(...).saved`` of this rank.
    param_grads : {"local", "sum", "mean"}, optional
        Reduction of ``dweight``/``dbias`` over the group (default: the
        convention's): this rank's contribution, the group sum, or the group
        sum divided by the number of ranks.

    Returns
    -------
    Grads
        ``dx`` in the dtype of ``x``; ``dweight``/``dbias`` in the dtype of
        ``weight`` (``None`` without affine parameters).

    Notes
    -----
    Training: ONE all-reduce of ``[sum dy, sum dy * x_hat]`` (``A``, ``B``) and
    ``dx = weight * invstd * (dy - omega * (A + x_hat * B))`` at valid
    positions (``dx = weight * invstd * dy`` at masked-out ones). Eval:
    ``dx = weight * dy / sqrt(running_var + eps)``, no communication unless the
    parameter gradients are reduced.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0], [2.0], [4.0]])
    >>> res = forward(x, data_format="NC")
    >>> g = backward(np.ones_like(x), res.saved)
    >>> float(abs(g.dx).max()) < 1e-12      # a constant dy carries no gradient to x
    True
    """
    s = saved
    xp = s.xp
    pg = s.convention.param_grads if param_grads is None else param_grads
    affine = s.weight is not None
    error = _validate_backward(dy, s, pg, xp=xp)
    reduce_params = affine and pg != "local"
    agree_backward(s.comm, error, dy, s, pg, xp=xp)

    dy3 = reshape(dy, s.x3.shape, xp)  # = s.layout.view(dy)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf statistics propagate
        a, b = s.kernels.grad_sums(dy3, s.x3, s.kmean, s.kinvstd, xp=xp)  # sum dy, sum dy x_hat
        if math.prod(s.shape) == 0:  # empty sums are 0, even with NaN statistics (Flax)
            b = xp.zeros_like(a)
        if s.comm.size == 1:  # one rank: its sums are the group's, no collective
            a_sum, b_sum = a, b
        elif s.training or reduce_params:
            total = s.comm.combine(xp.stack([a, b]), ordered_sum, xp=xp)
            a_sum, b_sum = total[0, :], total[1, :]
        if s.training:  # x_hat * B = (x3 - kmean) * kinvstd * B
            k_x, k_0 = s.kernels.coefficients(s.k_dy, s.kinvstd, a_sum, b_sum, s.omega, xp=xp)
        else:
            k_x = k_0 = xp.zeros_like(s.k_dy)
    dx3 = s.kernels.grad_input(dy3, s.x3, s.kmean, s.k_dy, k_x, k_0, s.mask3, xp=xp, dtype=s.dtype)
    dx = reshape(dx3, s.shape, xp)
    if not affine:
        return Grads(dx, None, None)
    if pg == "local":
        dw, db = b, a
    elif pg == "sum":
        dw, db = b_sum, a_sum
    else:
        dw, db = b_sum / s.comm.size, a_sum / s.comm.size
    return Grads(dx, astype(dw, s.weight.dtype, xp), astype(db, s.weight.dtype, xp))


def ordered_sum(records, *, xp):
    """Sum of ``records`` over its first axis (the ranks), in rank order (a ``combine`` fn)."""
    total = records[0, ...]
    for r in range(1, records.shape[0]):
        total = total + records[r, ...]
    return total


def combine_moments(records, *, xp, weighting="count"):
    """Combine the ranks' ``(n, mean, M2, e)`` records EXACTLY, in rank order.

    A ``Communicator.combine`` fn: ``records`` is the ``(P, 4, c)`` stack of
    the ranks' records, rows ``n_r`` (count), ``mean_r``, ``M2_r / 4^e_r``
    and ``e_r`` (a power-of-two exponent, 0 unless the rank's squares
    overflowed; see :func:`forward`), per channel. Returns ``(5, c)``: rows
    ``m`` (total count), ``R`` (non-empty ranks), ``mean``, ``var / 4^E`` and
    ``E`` (0 unless the combination needed scaling).

    Parameters
    ----------
    records : array of shape (P, 4, c), float64
        The ranks' records in rank order.
    xp : namespace
        Array namespace of ``records``.
    weighting : {"count", "equal"}
        ``count``: the exact global-batch statistics (Chan's parallel
        combination); ``equal``: each non-empty rank weighs the same.

    Returns
    -------
    array of shape (5, c), float64

    Notes
    -----
    With weights ``w_r = n_r`` and ``W = m`` (count) or ``w_r = [n_r > 0]``
    and ``W = R`` (equal), and ``q_r = M2_r`` (count) or ``M2_r / n_r``
    (equal)::

        mean = sum_r (w_r / W) mean_r
        var  = (sum_r q_r + sum_r w_r (mean_r - mean)^2) / W

    No difference of large sums is formed, so there is no cancellation; the
    equal weighting gives the value of "mean over ranks of E[x^2] minus
    mean^2" without forming it. Every sum runs over the ranks in rank order,
    element-wise per channel. When an exponent is non-zero or the result
    overflows (finite data near the float64 range), that channel's terms are
    divided by ``2^E`` (``4^E`` for squares), ``E`` from the magnitudes of its
    records: exact, so the scaled result is the unscaled one divided by
    ``2^E`` (``4^E``). Every channel is decided on its own records alone.

    Examples
    --------
    >>> import numpy as np
    >>> rank0 = [[2, 2], [1.0, 5.0], [2.0, 0.0], [0, 0]]    # x = {0, 2} and {5, 5}
    >>> rank1 = [[1, 1], [4.0, 5.0], [0.0, 0.0], [0, 0]]    # x = {4} and {5}
    >>> combine_moments(np.array([rank0, rank1]), xp=np)[:4]
    array([[3.        , 3.        ],
           [2.        , 2.        ],
           [2.        , 5.        ],
           [2.66666667, 0.        ]])
    """
    n, mu, m2, e = (records[:, i, :] for i in range(4))
    nonempty = astype(n > 0, xp.float64, xp)
    m, r = ordered_sum(n, xp=xp), ordered_sum(nonempty, xp=xp)
    if weighting == "count":
        w, big_w, q = n, m, m2
    else:
        w, big_w, q = nonempty, r, m2 / xp.where(n > 0, n, xp.ones_like(n))
    big_w = xp.where(big_w > 0, big_w, xp.ones_like(big_w))  # an empty group raises later
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: rescaled; NaN propagates
        mean, var = _chan(w, mu, q, big_w, xp=xp)
        exp = xp.zeros_like(mean)
        # per channel (so any channel slice gives the same bytes): scale where a
        # rank scaled or the plain result overflowed; elsewhere E = 0 is exact
        need = xp.any(e != 0, axis=0) | ~xp.isfinite(mean + var)
        if bool(xp.any(need)):
            exp = xp.max(
                xp.maximum(xp.maximum(e, _log2(xp.abs(mu), xp=xp)), _log2(m2, xp=xp) / 2 + e),
                axis=0,
            )
            exp = xp.where(need, xp.clip(xp.ceil(exp), 0, 1023), xp.zeros_like(exp))
            down = _pow2(-exp, xp=xp)
            mean_s, var = _chan(w, mu * down, q * _pow2(2 * (e - exp), xp=xp), big_w, xp=xp)
            mean = mean_s / down
    return xp.stack([m, r, mean, var, exp])


def _chan(w, mu, q, big_w, *, xp):
    """Weighted mean and variance of the ranks' records (see :func:`combine_moments`)."""
    mean = ordered_sum(w / big_w * mu, xp=xp)  # = mean_r exactly for one non-empty rank
    d = mu - mean
    return mean, (ordered_sum(q, xp=xp) + ordered_sum(w * d * d, xp=xp)) / big_w


def _log2(v, *, xp):
    """``log2(v)`` for finite ``v > 0``; -1022 for 0 and tiny values, 0 for Inf/NaN."""
    tiny = xp.full_like(v, 2.0**-1022)
    return xp.where(xp.isfinite(v), xp.log2(xp.maximum(v, tiny)), xp.zeros_like(v))


def _pow2(e, *, xp):
    """``2.0 ** e`` for integer-valued float64 ``e`` (exact)."""
    return xp.pow(xp.full_like(e, 2.0), e)


def _local_record(x3, mask3, kern, *, xp):
    """This rank's count ``n`` and per-channel ``mean``, ``M2 / 4^e`` and ``e`` (float64).

    Where a channel's data are finite but its moments are not (squares or sums
    beyond the float64 range), the moments are those of ``x / 2^e`` with
    ``e = floor(log2 max |x|)``: exact scaling, no overflow. ``e`` is ``None``
    (all zeros) when no channel needed it. :func:`_record` stacks the record.
    """
    n = kern.count(x3, mask3, xp=xp)
    mean, m2 = kern.moments(x3, mask3, xp=xp)
    # Values of at most 4 bytes (float32 and narrower: |x| < 3.5e38) cannot
    # overflow float64 sums of squares, so only float64 input needs the check.
    if getattr(x3.dtype, "itemsize", 8) < 8 or bool(xp.all(xp.isfinite(mean + m2))):
        return n, mean, m2, None
    x = xp.abs(astype(x3, xp.float64, xp))
    if mask3 is not None:
        x = xp.where(mask3, x, xp.zeros_like(x))
    top = xp.max(x, axis=(0, 2))
    bad = xp.isfinite(top) & ~(xp.isfinite(mean) & xp.isfinite(m2))
    e = xp.where(bad, xp.floor(_log2(top, xp=xp)), xp.zeros_like(mean))
    down = _pow2(-e, xp=xp)
    mean_s, m2_s = kern.moments(
        astype(x3, xp.float64, xp) * reshape(down, (1, -1, 1), xp), mask3, xp=xp
    )
    mean, m2 = xp.where(bad, mean_s / down, mean), xp.where(bad, m2_s, m2)
    return n, mean, m2, e


def _record(n, mean, m2, e, *, xp):
    """The ``(4, C)`` record ``[n, mean, M2 / 4^e, e]`` of :func:`combine_moments`."""
    e = xp.zeros_like(mean) if e is None else e
    return xp.stack([xp.full_like(mean, float(n)), mean, m2, e])


def _naive_record(n, record, conv, *, xp):
    """``[n, weight, S, Q]`` of the ``naive`` emulation (``E[x^2] - E[x]^2``)."""
    mean, m2 = record[1, :], record[2, :]
    weight_r, scale_r = (
        (float(n), 1.0) if conv.weighting == "count" else (float(n > 0), 1.0 / n if n else 0.0)
    )
    s = mean * n
    return xp.stack(
        [record[0, :], xp.full_like(mean, weight_r), s * scale_r, (m2 + s * mean) * scale_r]
    )


def _batch_stats(x3, mask3, conv, variance, comm, kern, *, xp):
    """Synchronized (mean, var / 4^E, 2^E or None, global count m, omega, local count n)."""
    n, mean, m2, e = _local_record(x3, mask3, kern, xp=xp)
    total = None
    if comm.size == 1 and variance != "naive":  # one rank: nothing to combine, no collective
        m, big_w = n, float(n > 0)
    else:
        record = _record(n, mean, m2, e, xp=xp)
        if variance == "naive":
            total = comm.combine(_naive_record(n, record, conv, xp=xp), ordered_sum, xp=xp)
        elif conv.weighting == "count":
            total = comm.combine(record, combine_moments, xp=xp)
        else:
            total = comm.combine(record, _combine_equal, xp=xp)
        # Counts are integer-valued float64 sums, exact below 2**53: identical on
        # every rank, so branching on them cannot split the group.
        m, big_w = int(total[0, 0]), float(total[1, 0])
    if m == 0:
        msg = (
            "forward: every rank of the group passed an empty batch; batch statistics "
            "of zero elements are undefined"
        )
        raise ValueError(msg)
    if m == 1 and (
        conv.single_value == "raise" or (conv.single_value == "raise_alone" and comm.size < 2)
    ):
        msg = (
            f"Expected more than 1 value per channel when training, got a global count "
            f"of 1 per channel (convention {conv.name!r})"
        )
        raise ValueError(msg)
    omega = 1.0 / m if conv.weighting == "count" else 1.0 / (n * big_w) if n else 0.0
    if conv.weighting == "equal" and conv.empty_rank == "nan" and big_w < comm.size:
        nan = xp.full_like(total[2, :], math.nan)  # Flax: an empty device's mean is NaN
        return nan, nan, None, m, omega, n
    if variance == "naive":
        mean = total[2, :] / big_w
        var = total[3, :] / big_w - mean * mean
        return mean, xp.where(var < 0, xp.zeros_like(var), var), None, m, omega, n
    if total is None:  # one rank: what combine_moments gives one record (tests pin it)
        var, exp = m2 / n, e
    else:
        mean, var, exp = total[2, :], total[3, :], total[4, :]
    # E is identical on every rank (a combined value), so is this branch.
    pow2 = _pow2(exp, xp=xp) if exp is not None and bool(xp.any(exp > 0)) else None
    return mean, var, pow2, m, omega, n


def _combine_equal(records, *, xp):
    """:func:`combine_moments` with equal weighting of the non-empty ranks."""
    return combine_moments(records, xp=xp, weighting="equal")


def _update_running(running_mean, running_var, mean, var, m, n, conv, momentum, *, xp):
    """New running statistics (``None`` when there are none) in their own dtype."""
    if running_mean is None:
        return None, None
    if conv.running_var == "biased":
        k = 1
    else:
        k = m if conv.running_var == "unbiased_global" else n
    correction = k / max(k - 1, 1) if k else 1.0
    if k == 1 and conv.running_var != "biased" and conv.single_value == "raise_alone":
        correction = math.nan  # PyTorch: M2 / (count - 1) = 0 / 0
    w = conv.batch_weight(momentum)
    rm = astype(running_mean, xp.float64, xp) * (1.0 - w) + mean * w
    rv = astype(running_var, xp.float64, xp) * (1.0 - w) + var * (correction * w)
    return astype(rm, running_mean.dtype, xp), astype(rv, running_var.dtype, xp)


def _validate_forward(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    mask,
    layout,
    eps,
    momentum,
    training,
    variance,
    *,
    xp,
):
    """This rank's first problem with its forward arguments, or None."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return TypeError(f"x is a {type(x).__name__}; expected an array")
    if x.ndim != layout.ndim:
        return ValueError(
            f"x has shape {tuple(x.shape)} ({x.ndim}-D); expected a "
            f"{layout.ndim}-D array for data_format {layout.data_format!r}"
        )
    if _dtype_code(x.dtype, xp) < 0:
        return TypeError(
            f"x has dtype {x.dtype}; expected a real floating dtype ({', '.join(_FLOAT_NAMES)})"
        )
    c = layout.channels(x.shape)
    if c < 1:
        return ValueError(
            f"x has shape {tuple(x.shape)}; expected at least one channel on "
            f"axis {layout.channel_axis} of data_format {layout.data_format!r}"
        )
    for name, v in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if v is not None and tuple(v.shape) != (c,):
            return ValueError(
                f"{name} has shape {tuple(v.shape)}; expected ({c},) for {c} "
                f"channels on axis {layout.channel_axis} of data_format "
                f"{layout.data_format!r}"
            )
    if (running_mean is None) != (running_var is None):
        return ValueError("running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        return ValueError(
            "training is False but running_mean/running_var are None; eval "
            "normalizes with running statistics, so pass them"
        )
    if mask is not None:
        expected = layout.mask_shape(x.shape)
        if tuple(mask.shape) != expected or mask.dtype != xp.bool:
            return ValueError(
                f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                f"expected a bool array of shape {expected} (x without its "
                f"channel axis)"
            )
    scalar_error = eps_error(eps) or momentum_error(momentum)
    if scalar_error is not None:
        return scalar_error
    if variance not in VARIANCE_ALGORITHMS:
        return ValueError(f"variance is {variance!r}; expected one of {VARIANCE_ALGORITHMS}")
    return None


def _validate_backward(dy, s, param_grads, *, xp):
    """This rank's first problem with its backward arguments, or None."""
    if param_grads not in _PARAM_GRADS:
        return ValueError(f"param_grads is {param_grads!r}; expected one of {_PARAM_GRADS}")
    if not hasattr(dy, "shape") or tuple(dy.shape) != s.shape:
        shape = tuple(dy.shape) if hasattr(dy, "shape") else type(dy).__name__
        return ValueError(f"dy has shape {shape}; expected {s.shape}, the shape of x")
    if _dtype_code(dy.dtype, xp) < 0:
        return TypeError(f"dy has dtype {dy.dtype}; expected a real floating dtype")
    return None


def _is_real(v) -> bool:
    """A real Python or NumPy scalar (bool excluded)."""
    if type(v) is float:  # the common case, without the ABC check
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def eps_error(eps):
    """The ValueError an invalid ``eps`` gets (also raised by the layers), or None."""
    if _is_real(eps) and eps >= 0:
        return None
    return ValueError(f"eps is {eps!r}; expected a float >= 0")


def momentum_error(momentum):
    """The ValueError an invalid ``momentum`` gets (also raised by the layers), or None."""
    if _is_real(momentum) and 0 <= momentum <= 1:
        return None
    return ValueError(f"momentum is {momentum!r}; expected a float in [0, 1]")
