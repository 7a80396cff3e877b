"""Candidate SyncBatchNorm implementations for the checker and tolerance tests.

Each follows the candidate protocol of :mod:`refsyncbn.testing.checker`:
``candidate(x, dy, weight, bias, running_mean, running_var, *, eps, momentum,
training, data_format, comm) -> dict``.
"""

from __future__ import annotations

import numpy as np

from refsyncbn.layouts import get_layout


def lowprec_candidate(acc, variance):
    """A NumPy SyncBN doing every sum and operation in dtype ``acc``.

    ``variance`` is ``"sumsq"`` (``E[x^2] - E[x]^2``, one all-reduce) or
    ``"two_pass"`` (mean first, then ``sum (x - mean)^2``). Reference
    convention: retain momentum, biased running variance, count weighting,
    local parameter gradients.
    """
    acc = np.dtype(acc)

    def candidate(x, dy, weight, bias, running_mean, running_var, *, eps, momentum, training,
                  data_format, comm):
        axis = get_layout(data_format).channel_axis
        rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(acc)
        c = rows.shape[1]
        n = np.full(1, len(rows), acc)
        if not training:
            m, mean, var = acc.type(0), running_mean.astype(acc), running_var.astype(acc)
        elif variance == "sumsq":
            tot = comm.allreduce_sum(np.concatenate([n, rows.sum(0), (rows * rows).sum(0)]), xp=np)
            m = tot[0]
            mean = tot[1:1 + c] / m
            var = np.maximum(tot[1 + c:] / m - mean * mean, acc.type(0))
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

        return {"y": back(y), "dx": back(dx), "dweight": b_loc.astype(weight.dtype),
                "dbias": a_loc.astype(weight.dtype), "running_mean": rm.astype(running_mean.dtype),
                "running_var": rv.astype(running_var.dtype)}

    return candidate


def torch_global_candidate(x, dy, weight, bias, running_mean, running_var, *, eps, momentum,
                           training, data_format, comm):
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
    return {"y": np.moveaxis(y.detach().numpy(), 1, axis),
            "dx": np.moveaxis(xt.grad.numpy(), 1, axis), "dweight": wt.grad.numpy(), "dbias": bt.grad.numpy(), "running_mean": rm.numpy(),
            "running_var": rv.numpy()}
