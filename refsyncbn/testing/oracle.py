"""The float64 global-batch oracle: what every rank of a case should output.

Written independently of :mod:`refsyncbn.functional`: no communicator, no
packed buffers, no shared helpers. Each group's shards are concatenated into
one ``(elements, C)`` matrix and batch norm is computed the textbook way
(Ioffe & Szegedy's chain rule for the backward pass, generalised to per-element
statistic weights so that equal-per-rank weighting is covered too).
"""

from __future__ import annotations

import numpy as np

from ..conventions import get_convention
from ..layouts import get_layout

__all__ = ["expected_outputs"]


def _rows(a, axis):
    """``a`` with its channel axis moved last and flattened to ``(-1, C)``."""
    moved = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _unrows(rows, shape, axis):
    moved_shape = [s for i, s in enumerate(shape) if i != axis] + [shape[axis]]
    return np.moveaxis(rows.reshape(moved_shape), -1, axis)


def _group_rows(case, conv, group, axis):
    """A group's shards, their ``(rows, C)`` data, valid rows, counts, per-rank weights.

    The weight of one valid element of rank ``r`` in the batch statistics is
    ``1 / m`` (count weighting) or ``1 / (R n_r)`` over the ``R`` non-empty
    ranks (equal weighting); 0 on an empty rank.
    """
    shards = [case.shard(r) for r in group]
    xs = [_rows(s["x"], axis) for s in shards]
    valid = [
        np.ones(len(x), bool) if "mask" not in s else s["mask"].reshape(-1)
        for x, s in zip(xs, shards, strict=True)
    ]
    counts = [int(v.sum()) for v in valid]
    m, nonempty = sum(counts), sum(n > 0 for n in counts)
    if conv.weighting == "count":
        weights = [1.0 / m if m else 0.0 for _ in counts]
    else:
        weights = [1.0 / (nonempty * n) if n else 0.0 for n in counts]
    return shards, xs, valid, counts, weights


def expected_outputs(case, *, param_grads=None) -> list[dict]:
    """Float64 outputs every world rank of ``case`` should produce.

    Parameters
    ----------
    case : refsyncbn.cases.Case
        The problem (global batch, splits, groups, convention, ...).
    param_grads : {"local", "sum", "mean"}, optional
        Reduction of the parameter gradients (default: the convention's).

    Returns
    -------
    list of dict
        Per world rank: ``y``, ``mean``, ``var`` (biased, used to normalize),
        ``running_mean``, ``running_var``, and with ``case.dy``: ``dx``,
        ``dweight``, ``dbias`` (``None`` without affine).
    """
    conv = get_convention(case.convention)
    pg = conv.param_grads if param_grads is None else param_grads
    layout = get_layout(case.data_format)
    axis = layout.channel_axis
    c = layout.channels(case.x.shape)
    w = np.ones(c) if case.weight is None else np.asarray(case.weight, np.float64)
    b = np.zeros(c) if case.bias is None else np.asarray(case.bias, np.float64)
    rm0 = np.asarray(case.running_mean, np.float64)
    rv0 = np.asarray(case.running_var, np.float64)
    groups = case.groups or [list(range(case.world_size))]
    out: list = [None] * case.world_size
    for group in groups:
        shards, xs, valid, counts, weights = _group_rows(case, conv, group, axis)
        m = sum(counts)
        omega = [w * v for w, v in zip(weights, valid, strict=True)]  # statistic weights
        x_all, om_all = np.concatenate(xs), np.concatenate(omega)
        if case.training:  # masked-out positions (om = 0) may hold anything, NaN included
            x_stat = np.where(np.concatenate(valid)[:, None], x_all, 0.0)
            mean = (om_all[:, None] * x_stat).sum(0)
            var = (om_all[:, None] * (x_stat - mean) ** 2).sum(0)
            if conv.weighting == "equal" and conv.empty_rank == "nan" and 0 in counts:
                mean = var = np.full_like(mean, np.nan)  # Flax: pmean of an empty mean
        else:
            mean, var = rm0, rv0
        invstd = 1.0 / np.sqrt(var + case.eps)
        for r, x, n, shard in zip(group, xs, counts, shards, strict=True):
            xhat = (x - mean) * invstd
            res = {"mean": mean, "var": var, "y": _unrows(xhat * w + b, shard["x"].shape, axis)}
            res.update(_running(conv, case, rm0, rv0, mean, var, m, n))
            out[r] = res
        if case.dy is None:
            continue
        dys = [_rows(case.shard(r)["dy"], axis) for r in group]
        dy_all = np.concatenate(dys)
        # Ioffe-Szegedy chain rule with statistic weights om (d mean/dx_i = om_i).
        dxhat_all = dy_all * w
        dvar = (dxhat_all * (x_all - mean)).sum(0) * -0.5 * invstd**3
        dmean = (dxhat_all * -invstd).sum(0) + dvar * (
            -2.0 * (om_all[:, None] * (x_all - mean)).sum(0)
        )
        dw_group = (dy_all * (x_all - mean) * invstd).sum(0)
        db_group = dy_all.sum(0)
        for r, x, om, dy in zip(group, xs, omega, dys, strict=True):
            dx = dy * w * invstd
            if case.training:
                dx = dx + dvar * 2.0 * om[:, None] * (x - mean) + dmean * om[:, None]
            res = out[r]
            res["dx"] = _unrows(dx, case.shard(r)["x"].shape, axis)
            if case.weight is None:
                res["dweight"] = res["dbias"] = None
            elif pg == "local":
                res["dweight"], res["dbias"] = (dy * (x - mean) * invstd).sum(0), dy.sum(0)
            elif pg == "sum":
                res["dweight"], res["dbias"] = dw_group, db_group
            else:
                res["dweight"], res["dbias"] = dw_group / len(group), db_group / len(group)
    return out


def _running(conv, case, rm0, rv0, mean, var, m, n) -> dict:
    """New running statistics per the convention (unchanged in eval)."""
    if not case.training:
        return {"running_mean": rm0, "running_var": rv0}
    if conv.running_var == "biased":
        batch_var = var
    else:
        k = m if conv.running_var == "unbiased_global" else n
        if k == 1 and conv.single_value == "raise_alone":
            batch_var = np.full_like(var, np.nan)  # PyTorch: 0 / (count - 1)
        else:
            batch_var = var * (k / (k - 1)) if k > 1 else var
    keep = case.momentum if conv.momentum_meaning == "retain" else 1.0 - case.momentum
    return {
        "running_mean": keep * rm0 + (1.0 - keep) * mean,
        "running_var": keep * rv0 + (1.0 - keep) * batch_var,
    }
