"""Candidate SyncBatchNorm implementations for the checker and tolerance tests.

Each follows the candidate protocol of :mod:`refsyncbn.testing.checker`:
``candidate(x, dy, weight, bias, running_mean, running_var, *, eps, momentum,
training, data_format, comm) -> dict``.
"""

from __future__ import annotations

import numpy as np

from refsyncbn.layouts import get_layout


def _sum(rows, summation):
    """Column sums of ``(n, C)`` rows in their dtype: NumPy's pairwise or one running sum."""
    if summation == "pairwise":
        return np.ascontiguousarray(rows.T).sum(1)
    out = np.zeros(rows.shape[1], rows.dtype)
    for row in rows:
        out = out + row
    return out


def _welford(rows, block=8):
    """Blocked Welford in ``rows.dtype``: one running (n, mean, M2) per block, Chan-merged."""
    acc = rows.dtype.type
    recs = []
    for start in range(0, len(rows), block):
        n, mean, m2 = (
            acc(0),
            np.zeros(rows.shape[1], rows.dtype),
            np.zeros(rows.shape[1], rows.dtype),
        )
        for row in rows[start : start + block]:
            n = n + acc(1)
            delta = row - mean
            mean = mean + delta / n
            m2 = m2 + delta * (row - mean)
        recs.append((n, mean, m2))
    while len(recs) > 1:
        recs = [
            _chan(*recs[i : i + 2]) if i + 1 < len(recs) else recs[i]
            for i in range(0, len(recs), 2)
        ]
    return (
        recs[0]
        if recs
        else (acc(0), np.zeros(rows.shape[1], rows.dtype), np.zeros(rows.shape[1], rows.dtype))
    )


def _chan(a, b):
    """Chan's pairwise merge of two (n, mean, M2) records, in their dtype."""
    (na, ma, qa), (nb, mb, qb) = a, b
    n = na + nb
    if n == 0:
        return a
    delta = mb - ma
    return n, ma + delta * (nb / n), qa + qb + delta * delta * (na * nb / n)


def zoo_candidate(
    *,
    acc="float32",
    stats="two_pass",
    merge="count",
    stats_dtype=None,
    merge_dtype=None,
    summation="pairwise",
    convention="reference",
    sync=True,
    eps=None,
    planted=None,
    empty="skip",
):
    """One SyncBN algorithm of the zoo (tests/test_zoo.py), arithmetic in dtype ``acc``.

    ``stats``: this rank's statistics: ``"two_pass"`` (mean, then
    ``sum (x - mean)^2``), ``"welford"`` (blocked Welford), ``"naive"``
    (``sum x`` and ``sum x^2``). ``merge``: ``"global"`` (all-reduced sums,
    then ``sum (x - mean)^2`` about the global mean: a true two-pass),
    ``"count"`` (Chan merge of the ranks' (n, mean, M2) records in rank
    order, PyTorch's ``batch_norm_gather_stats_with_counts``), ``"equal"``
    (unweighted mean over the non-empty ranks' mean and ``E[(x - mean)^2]``,
    Flax's ``pmean``), in ``merge_dtype`` (default ``acc``). ``naive`` stats
    merge as sums: count-weighted ``E[x^2] - E[x]^2`` (Keras, ``merge="count"``)
    or the ``pmean`` of per-rank ``E[x]`` and ``E[x^2]`` (Flax,
    ``merge="equal"``). ``convention``: "reference"-like (retain, biased) or
    "torch" (update, unbiased with the group count). ``sync=False`` skips
    every all-reduce (an empty rank then has zero statistics); ``empty="nan"``
    makes an equal merge NaN when a rank is empty (Flax's ``pmean`` of an
    empty mean); ``eps`` overrides the given eps; ``planted`` maps
    ``"A"``, ``"B"`` (the all-reduced ``sum dy``, ``sum dy x_hat``),
    ``"dweight"`` or ``"dbias"`` to a relative error planted there.
    """
    planted = {} if planted is None else planted
    acc = np.dtype(acc)
    mdt = acc if merge_dtype is None else np.dtype(merge_dtype)
    sdt = acc if stats_dtype is None else np.dtype(stats_dtype)

    def records(rows, comm):
        """Every rank's (n, mean, M2) (or (n, sum, sumsq)) as float64 arrays, in rank order."""
        c = rows.shape[1]
        rows = rows.astype(sdt)
        if stats == "naive":
            rec = (sdt.type(len(rows)), _sum(rows, summation), _sum(rows * rows, summation))
        elif stats == "welford":
            rec = _welford(rows)
        else:
            n = sdt.type(len(rows))
            mean = _sum(rows, summation) / n if len(rows) else np.zeros(c, sdt)
            rec = (n, mean, _sum((rows - mean) ** 2, summation))
        size = comm.size if sync else 1
        buf = np.zeros((size, 1 + 2 * c))
        buf[comm.rank if sync else 0] = np.concatenate([[rec[0]], rec[1], rec[2]]).astype(acc)
        if sync:
            buf = comm.allreduce_sum(buf.reshape(-1), xp=np).reshape(size, -1)
        return [(r[0].astype(mdt), r[1 : 1 + c].astype(mdt), r[1 + c :].astype(mdt)) for r in buf]

    def statistics(rows, comm):
        c = rows.shape[1]
        if merge == "global":
            n = np.array([len(rows)], acc)
            tot = (
                comm.allreduce_sum(np.concatenate([n, _sum(rows, summation)]), xp=np)
                if sync
                else np.concatenate([n, _sum(rows, summation)])
            )
            m = acc.type(tot[0])
            mean = (tot[1:] / m).astype(acc)
            q = _sum((rows - mean) ** 2, summation)
            q = comm.allreduce_sum(q, xp=np) if sync else q
            return m, mean, (q / m).astype(acc), 1 / m
        recs = records(rows, comm)
        if merge == "equal" and empty == "nan" and min(r[0] for r in recs) == 0:
            nan = np.full(c, np.nan, acc)
            return acc.type(sum(r[0] for r in recs)), nan, nan, 0.0
        recs = [r for r in recs if r[0] > 0]
        if not recs:  # an empty rank that does not synchronize
            return acc.type(0), np.zeros(c, acc), np.zeros(c, acc), 0.0
        if stats == "naive":
            if merge == "count":
                m = sum(r[0] for r in recs)
                mean = sum(r[1] for r in recs) / m
                return m, mean, np.maximum(sum(r[2] for r in recs) / m - mean * mean, 0), 1 / m
            k = mdt.type(len(recs))
            mean = sum(r[1] / r[0] for r in recs) / k
            mean2 = sum(r[2] / r[0] for r in recs) / k
            return (
                sum(r[0] for r in recs),
                mean,
                np.maximum(mean2 - mean * mean, 0),
                1 / (k * max(len(rows), 1)),
            )
        if merge == "equal":
            k = mdt.type(len(recs))
            mean = sum(r[1] for r in recs) / k
            var = sum(r[2] / r[0] + (r[1] - mean) ** 2 for r in recs) / k
            return sum(r[0] for r in recs), mean, var, 1 / (k * max(len(rows), 1))
        total = recs[0]
        for rec in recs[1:]:
            total = _chan(total, rec)
        return total[0], total[1], total[2] / total[0], 1 / total[0]

    def candidate(
        x,
        dy,
        weight,
        bias,
        running_mean,
        running_var,
        *,
        eps,
        momentum,
        training,
        data_format,
        comm,
    ):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # float16 sums
            return body(
                x,
                dy,
                weight,
                bias,
                running_mean,
                running_var,
                eps=eps,
                momentum=momentum,
                training=training,
                data_format=data_format,
                comm=comm,
            )

    def body(
        x,
        dy,
        weight,
        bias,
        running_mean,
        running_var,
        *,
        eps,
        momentum,
        training,
        data_format,
        comm,
    ):
        axis = get_layout(data_format).channel_axis
        c = x.shape[axis]
        rows = np.moveaxis(x, axis, -1).reshape(-1, c).astype(acc)
        e = acc.type(eps if candidate_eps is None else candidate_eps)
        if training:
            m, mean, var, om = statistics(rows, comm)
            m, mean, var, om = acc.type(m), mean.astype(acc), var.astype(acc), acc.type(om)
        else:
            mean, var = running_mean.astype(acc), running_var.astype(acc)
        invstd = acc.type(1) / np.sqrt(var + e)
        w, b = weight.astype(acc), bias.astype(acc)
        xhat = (rows - mean) * invstd
        y = xhat * w + b
        rm, rv = running_mean.astype(acc), running_var.astype(acc)
        if training:
            keep = acc.type(1 - momentum if convention == "torch" else momentum)
            batch_var = var * (m / (m - 1)) if convention == "torch" else var
            rm, rv = rm * keep + mean * (1 - keep), rv * keep + batch_var * (1 - keep)
        dyr = np.moveaxis(dy, axis, -1).reshape(-1, c).astype(acc)
        a_loc, b_loc = _sum(dyr, summation), _sum(dyr * xhat, summation)
        dx = w * invstd * dyr
        if training:
            tot = np.concatenate([a_loc, b_loc])
            tot = comm.allreduce_sum(tot, xp=np).astype(acc) if sync else tot
            tot[:c] = tot[:c] * acc.type(1 + planted.get("A", 0.0))
            tot[c:] = tot[c:] * acc.type(1 + planted.get("B", 0.0))
            dx = w * invstd * (dyr - om * tot[:c] - xhat * (om * tot[c:]))

        def back(v):
            shape = [s for i, s in enumerate(x.shape) if i != axis] + [c]
            return np.moveaxis(v.reshape(shape), -1, axis).astype(x.dtype)

        dweight = b_loc * acc.type(1 + planted.get("dweight", 0.0))
        dbias = a_loc * acc.type(1 + planted.get("dbias", 0.0))
        return {
            "y": back(y),
            "dx": back(dx),
            "dweight": dweight.astype(weight.dtype),
            "dbias": dbias.astype(weight.dtype),
            "running_mean": rm.astype(running_mean.dtype),
            "running_var": rv.astype(running_var.dtype),
        }

    candidate_eps = eps
    return candidate


def lowprec_candidate(acc, variance):
    """A NumPy SyncBN doing every sum and operation in dtype ``acc``.

    ``variance`` is ``"sumsq"`` (``E[x^2] - E[x]^2``, one all-reduce) or
    ``"two_pass"`` (mean first, then ``sum (x - mean)^2``). Reference
    convention: retain momentum, biased running variance, count weighting,
    local parameter gradients.
    """
    acc = np.dtype(acc)

    def candidate(
        x,
        dy,
        weight,
        bias,
        running_mean,
        running_var,
        *,
        eps,
        momentum,
        training,
        data_format,
        comm,
    ):
        axis = get_layout(data_format).channel_axis
        rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(acc)
        c = rows.shape[1]
        n = np.full(1, len(rows), acc)
        if not training:
            m, mean, var = acc.type(0), running_mean.astype(acc), running_var.astype(acc)
        elif variance == "sumsq":
            tot = comm.allreduce_sum(np.concatenate([n, rows.sum(0), (rows * rows).sum(0)]), xp=np)
            m = tot[0]
            mean = tot[1 : 1 + c] / m
            var = np.maximum(tot[1 + c :] / m - mean * mean, acc.type(0))
        else:
            tot = comm.allreduce_sum(np.concatenate([n, rows.sum(0)]), xp=np)
            m = tot[0]
            mean = tot[1:] / m
            var = comm.allreduce_sum(((rows - mean) ** 2).sum(0), xp=np) / m
        invstd = acc.type(1) / np.sqrt(var + acc.type(eps))
        w, b = weight.astype(acc), bias.astype(acc)
        xhat = (rows - mean) * invstd
        y = xhat * w + b
        mom = acc.type(momentum)
        rm = running_mean.astype(acc) * mom + mean * (1 - mom) if training else running_mean
        rv = running_var.astype(acc) * mom + var * (1 - mom) if training else running_var
        dyr = np.moveaxis(dy, axis, -1).reshape(-1, c).astype(acc)
        a_loc, b_loc = dyr.sum(0), (dyr * xhat).sum(0)
        dx = w * invstd * dyr
        if training:
            tot = comm.allreduce_sum(np.concatenate([a_loc, b_loc]), xp=np)
            dx = w * invstd * (dyr - tot[:c] / m - xhat * tot[c:] / m)

        def back(v):
            shape = [s for i, s in enumerate(x.shape) if i != axis] + [c]
            return np.moveaxis(v.reshape(shape), -1, axis).astype(x.dtype)

        return {
            "y": back(y),
            "dx": back(dx),
            "dweight": b_loc.astype(weight.dtype),
            "dbias": a_loc.astype(weight.dtype),
            "running_mean": rm.astype(running_mean.dtype),
            "running_var": rv.astype(running_var.dtype),
        }

    return candidate


def torch_global_candidate(
    x, dy, weight, bias, running_mean, running_var, *, eps, momentum, training, data_format, comm
):
    """PyTorch's ``F.batch_norm`` on the whole batch + autograd (a global-batch candidate)."""
    import torch
    import torch.nn.functional as F

    axis = get_layout(data_format).channel_axis
    xt = torch.from_numpy(np.moveaxis(x, axis, 1).copy()).requires_grad_(True)
    wt = torch.from_numpy(weight.copy()).requires_grad_(True)
    bt = torch.from_numpy(bias.copy()).requires_grad_(True)
    rm, rv = torch.from_numpy(running_mean.copy()), torch.from_numpy(running_var.copy())
    y = F.batch_norm(xt, rm, rv, wt, bt, training=training, momentum=momentum, eps=eps)
    y.backward(torch.from_numpy(np.moveaxis(dy, axis, 1).copy()))
    return {
        "y": np.moveaxis(y.detach().numpy(), 1, axis),
        "dx": np.moveaxis(xt.grad.numpy(), 1, axis),
        "dweight": wt.grad.numpy(),
        "dbias": bt.grad.numpy(),
        "running_mean": rm.numpy(),
        "running_var": rv.numpy(),
    }
