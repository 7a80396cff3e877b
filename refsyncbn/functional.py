"""Functional SyncBatchNorm: ``forward`` and its hand-derived ``backward``.

The only caller of communicator collectives. Per channel, with ``m`` the global
element count of the group:

* each rank packs ``[n_r, c_r, s_r, q_r]`` (count, weight, sum, sum of squares,
  scaled by the convention's weighting) into ONE buffer and all-reduces it;
* ``mean = S / Cnt``, ``var = max(Q / Cnt - mean^2, 0)`` (biased),
  ``invstd = 1 / sqrt(var + eps)``, ``y = (x - mean) * invstd * weight + bias``;
* backward all-reduces ONE buffer ``[sum dy, sum dy * x_hat]`` and returns
  ``dx = weight * invstd * (dy - omega_r * (A + x_hat * B))`` where ``omega_r``
  is the weight of one of this rank's elements in the statistics (``1 / m``
  for count weighting, ``1 / (R n_r)`` for equal weighting over ``R``
  non-empty ranks).

Every pass (training or eval, forward or backward) starts with the agreement
(``_signature``, ``comm.agreement``): every rank validates its own inputs and
the group compares operation, call number, call signature and validation
outcome with one tiny integer all-reduce, so a bad input or a different call
on one rank raises a clear exception on every rank.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _moments
from ._signature import FLOAT_NAMES as _FLOAT_NAMES
from ._signature import agree_backward, agree_forward, reject
from ._signature import dtype_code as _dtype_code
from ._xp import namespace
from .comm.local import LocalComm
from .conventions import REFERENCE, Convention, get_convention
from .layouts import Layout, get_layout

__all__ = ["VARIANCE_ALGORITHMS", "ForwardResult", "Grads", "Saved", "backward", "forward"]

VARIANCE_ALGORITHMS = ("sumsq", "two_pass")
_PARAM_GRADS = ("local", "sum", "mean")


@dataclass(frozen=True, eq=False)
class Saved:
    """What :func:`backward` needs from :func:`forward` (treat as opaque).

    ``mean``, ``var`` and ``invstd`` are the float64 per-channel statistics
    used to normalize (batch statistics in training, running ones in eval);
    ``count`` is the group's element count per channel (this rank's in eval);
    ``omega`` the weight of one of this rank's elements in the statistics.
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
    count: int
    omega: float
    training: bool
    convention: Convention
    comm: Any
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


def forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
            training=True, eps=None, momentum=None, data_format="NCHW",
            convention=REFERENCE, variance="sumsq", mask=None, comm=None, xp=None):
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
    variance : {"sumsq", "two_pass"}
        ``sumsq``: one all-reduce of ``[n, c, sum, sumsq]``; ``two_pass``: mean
        first, then ``sum (x - mean)^2``, two all-reduces.
    mask : bool array, optional
        Valid positions (shape of ``x`` without the channel axis): statistics
        use valid positions only; every position is normalized.
    comm : Communicator, optional
        Ranks to synchronize over; default a one-rank :class:`LocalComm`.
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
    in float64. New running statistics: ``r = r * (1 - w) + batch * w`` with
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

    error = _validate_forward(x, weight, bias, running_mean, running_var, mask, layout,
                              eps, momentum, training, variance, xp=xp)
    agree_forward(comm, error, x, weight, bias, running_mean, mask, layout, conv, eps, momentum,
                  variance, training, xp=xp)

    x3 = layout.view(x, xp=xp)
    mask3 = None if mask is None else layout.view_mask(mask, x.shape, xp=xp)
    if training:
        mean, var, m, omega, n = _batch_stats(x3, mask3, conv, variance, comm, xp=xp)
        new_rm, new_rv = _update_running(running_mean, running_var, mean, var, m, n,
                                         conv, momentum, xp=xp)
    else:
        mean = xp.astype(running_mean, xp.float64)
        var = xp.astype(running_var, xp.float64)
        m, omega = _moments.count(x3, mask3, xp=xp), 0.0
        new_rm, new_rv = running_mean, running_var
    invstd = 1.0 / xp.sqrt(var + eps)
    scale = invstd if weight is None else invstd * xp.astype(weight, xp.float64)
    shift = xp.zeros_like(mean) if bias is None else xp.astype(bias, xp.float64)
    y3 = _moments.normalize(x3, mean, scale, shift, xp=xp, dtype=x.dtype)
    saved = Saved(x3, mask3, tuple(x.shape), x.dtype, layout, weight, mean, var, invstd,
                  m, omega, bool(training), conv, comm, xp)
    return ForwardResult(xp.reshape(y3, x.shape), saved, new_rm, new_rv)


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

    dy3 = s.layout.view(dy, xp=xp)
    a, b = _moments.grad_sums(dy3, s.x3, s.mean, xp=xp)
    b = b * s.invstd  # sum dy * x_hat
    if s.training or reduce_params:
        total = s.comm.combine(xp.stack([a, b]), ordered_sum, xp=xp)
        a_sum, b_sum = total[0, :], total[1, :]
    w = xp.ones_like(s.invstd) if not affine else xp.astype(s.weight, xp.float64)
    k_dy = w * s.invstd
    zeros = xp.zeros_like(k_dy)
    if s.training:
        k_x, k_0 = k_dy * s.invstd * b_sum * s.omega, k_dy * a_sum * s.omega
    else:
        k_x, k_0 = zeros, zeros
    dx3 = _moments.grad_input(dy3, s.x3, s.mean, k_dy, k_x, k_0, s.mask3, xp=xp, dtype=s.dtype)
    dx = xp.reshape(dx3, s.shape)
    if not affine:
        return Grads(dx, None, None)
    if pg == "local":
        dw, db = b, a
    elif pg == "sum":
        dw, db = b_sum, a_sum
    else:
        dw, db = b_sum / s.comm.size, a_sum / s.comm.size
    return Grads(dx, xp.astype(dw, s.weight.dtype), xp.astype(db, s.weight.dtype))


def ordered_sum(records, *, xp):
    """Sum of the ``(P, k, c)`` records over the ranks, in rank order (a ``combine`` fn)."""
    total = records[0, ...]
    for r in range(1, records.shape[0]):
        total = total + records[r, ...]
    return total


def _batch_stats(x3, mask3, conv, variance, comm, *, xp):
    """Synchronized (mean, biased var, global count m, omega, local count n)."""
    c = x3.shape[1]
    dev = x3.device
    n = _moments.count(x3, mask3, xp=xp)
    if conv.weighting == "count":
        weight_r, scale_r = float(n), 1.0
    else:
        weight_r, scale_r = float(n > 0), (1.0 / n if n else 0.0)
    s, m2 = _moments.sum_and_m2(x3, mask3, n, xp=xp)
    head = xp.full((c,), float(n), dtype=xp.float64, device=dev)
    rows = [head, xp.full((c,), weight_r, dtype=xp.float64, device=dev), s * scale_r]
    if variance == "sumsq":
        rows.append((m2 + s * s / n if n else m2) * scale_r)
    total = comm.combine(xp.stack(rows), ordered_sum, xp=xp)
    # Counts are integer-valued float64 sums, exact below 2**53: identical on
    # every rank, so branching on them cannot split the group.
    m, cnt = int(total[0, 0]), float(total[1, 0])
    if m == 0:
        msg = ("forward: every rank of the group passed an empty batch; batch statistics "
               "of zero elements are undefined")
        raise ValueError(msg)
    if m == 1 and conv.single_value == "raise":
        msg = (f"Expected more than 1 value per channel when training, got a global count "
               f"of 1 per channel (convention {conv.name!r})")
        raise ValueError(msg)
    mean = total[2, :] / cnt
    if variance == "sumsq":
        var = total[3, :] / cnt - mean * mean
        var = xp.where(var < 0, xp.zeros_like(var), var)
    else:
        local = _moments.sumsq_about(x3, mask3, mean, xp=xp) * scale_r
        var = comm.combine(xp.reshape(local, (1, c)), ordered_sum, xp=xp)[0, :] / cnt
    return mean, var, m, scale_r / cnt, n


def _update_running(running_mean, running_var, mean, var, m, n, conv, momentum, *, xp):
    """New running statistics (``None`` when there are none) in their own dtype."""
    if running_mean is None:
        return None, None
    if conv.running_var == "biased":
        k = 1
    else:
        k = m if conv.running_var == "unbiased_global" else n
    correction = k / max(k - 1, 1) if k else 1.0
    w = conv.batch_weight(momentum)
    rm = xp.astype(running_mean, xp.float64) * (1.0 - w) + mean * w
    rv = xp.astype(running_var, xp.float64) * (1.0 - w) + var * (correction * w)
    return xp.astype(rm, running_mean.dtype), xp.astype(rv, running_var.dtype)


def _validate_forward(x, weight, bias, running_mean, running_var, mask, layout, eps,
                      momentum, training, variance, *, xp):
    """This rank's first problem with its forward arguments, or None."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return TypeError(f"x is a {type(x).__name__}; expected an array")
    if x.ndim != layout.ndim:
        return ValueError(f"x has shape {tuple(x.shape)} ({x.ndim}-D); expected a "
                          f"{layout.ndim}-D array for data_format {layout.data_format!r}")
    if _dtype_code(x.dtype, xp) < 0:
        return TypeError(f"x has dtype {x.dtype}; expected a real floating dtype "
                         f"({', '.join(_FLOAT_NAMES)})")
    c = layout.channels(x.shape)
    if c < 1:
        return ValueError(f"x has shape {tuple(x.shape)}; expected at least one channel on "
                          f"axis {layout.channel_axis} of data_format {layout.data_format!r}")
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if v is not None and tuple(v.shape) != (c,):
            return ValueError(f"{name} has shape {tuple(v.shape)}; expected ({c},) for {c} "
                              f"channels on axis {layout.channel_axis} of data_format "
                              f"{layout.data_format!r}")
    if (running_mean is None) != (running_var is None):
        return ValueError("running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        return ValueError("training is False but running_mean/running_var are None; eval "
                          "normalizes with running statistics, so pass them")
    if mask is not None:
        expected = layout.mask_shape(x.shape)
        if tuple(mask.shape) != expected or mask.dtype != xp.bool:
            return ValueError(f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                              f"expected a bool array of shape {expected} (x without its "
                              f"channel axis)")
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
