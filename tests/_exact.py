"""Exact SyncBatchNorm in rational and 60-digit decimal arithmetic (independent of refsyncbn).

Inputs are per-rank arrays of rows ``(n_r, C)`` (channel last, every other axis
flattened). Every float input is converted exactly (``Fraction(float)``);
means and variances are exact fractions, straight from the definitions (no
algorithm: ``E[x^2] - E[x]^2`` is exact here); the square root and everything
after it is evaluated with 60 significant digits, far beyond float64's 17, so
the results below are "exact" for any comparison with float64 code.
"""

from __future__ import annotations

import decimal
from fractions import Fraction

import numpy as np

CTX = decimal.Context(prec=60, Emax=10**6, Emin=-(10**6))


def dec(q) -> decimal.Decimal:
    """A Fraction (or exact float) as a 60-digit Decimal."""
    q = Fraction(q)
    return CTX.divide(decimal.Decimal(q.numerator), decimal.Decimal(q.denominator))


def batch_norm(shards, dys=None, weight=None, bias=None, *, eps, weighting="count"):
    """Per-rank exact outputs of one training step.

    Parameters
    ----------
    shards, dys : list of float arrays of shape (n_r, C)
        Each rank's rows (``dys`` optional).
    weight, bias : float arrays of shape (C,), optional
    eps : float
    weighting : {"count", "equal"}
        ``count``: statistics of the concatenated batch; ``equal``: mean of the
        non-empty ranks' means, and mean of their ``E_r[x^2]`` minus mean^2.

    Returns
    -------
    dict
        ``mean``, ``var`` (lists of C Fractions), ``y`` and ``dx`` (per rank,
        object arrays of Decimals, shape (n_r, C)), ``dweight`` and ``dbias``
        (per rank, lists of C Decimals: the rank's local contribution).
    """
    c = shards[0].shape[1]
    rows = [[[Fraction(float(v)) for v in row] for row in s] for s in shards]
    drows = None if dys is None else [[[Fraction(float(v)) for v in row] for row in d] for d in dys]
    w = [Fraction(1)] * c if weight is None else [Fraction(float(v)) for v in weight]
    b = [Fraction(0)] * c if bias is None else [Fraction(float(v)) for v in bias]
    nonempty = [r for r in rows if r]
    mean, var, omega = [], [], []
    for j in range(c):
        if weighting == "count":
            vals = [row[j] for r in rows for row in r]
            m = len(vals)
            mu = sum(vals) / m
            mean.append(mu)
            var.append(sum((v - mu) ** 2 for v in vals) / m)
            omega.append([Fraction(1, m)] * len(rows))
        else:
            k = len(nonempty)
            mu = sum(sum(row[j] for row in r) / len(r) for r in nonempty) / k
            sq = sum(sum(row[j] ** 2 for row in r) / len(r) for r in nonempty) / k
            mean.append(mu)
            var.append(sq - mu * mu)
            omega.append([Fraction(1, k * len(r)) if r else Fraction(0) for r in rows])
    invstd = [1 / CTX.sqrt(dec(v + Fraction(float(eps)))) for v in var]
    xhat = [
        [[CTX.multiply(dec(row[j] - mean[j]), invstd[j]) for j in range(c)] for row in r]
        for r in rows
    ]
    out = {
        "mean": mean,
        "var": var,
        "y": [
            np.array(
                [[xh[j] * dec(w[j]) + dec(b[j]) for j in range(c)] for xh in xr], dtype=object
            ).reshape(len(xr), c)
            for xr in xhat
        ],
    }
    if drows is None:
        return out
    big_a = [sum(dec(row[j]) for d in drows for row in d) for j in range(c)]
    pairs = [
        (row, xh) for d, xr in zip(drows, xhat, strict=True) for row, xh in zip(d, xr, strict=True)
    ]
    big_b = [sum(dec(row[j]) * xh[j] for row, xh in pairs) for j in range(c)]
    out["dx"] = [
        np.array(
            [
                [
                    dec(w[j])
                    * invstd[j]
                    * (dec(row[j]) - dec(omega[j][r]) * (big_a[j] + xh[j] * big_b[j]))
                    for j in range(c)
                ]
                for row, xh in zip(d, xr, strict=True)
            ],
            dtype=object,
        ).reshape(len(d), c)
        for r, (d, xr) in enumerate(zip(drows, xhat, strict=True))
    ]
    out["dweight"] = [
        [
            sum((dec(row[j]) * xh[j] for row, xh in zip(d, xr, strict=True)), decimal.Decimal(0))
            for j in range(c)
        ]
        for d, xr in zip(drows, xhat, strict=True)
    ]
    out["dbias"] = [
        [sum((dec(row[j]) for row in d), decimal.Decimal(0)) for j in range(c)] for d in drows
    ]
    return out


def error(got, exact) -> np.ndarray:
    """``|got - exact|`` as float64, computed exactly from the float ``got``."""
    got = np.asarray(got, dtype=np.float64)
    exact = np.asarray(exact, dtype=object)
    flat = [abs(dec(float(g)) - e) for g, e in zip(got.ravel(), exact.ravel(), strict=True)]
    return np.array([float(v) for v in flat], dtype=np.float64).reshape(got.shape)


def ulp(exact, dtype) -> np.ndarray:
    """The spacing of ``dtype`` at each exact value (``dtype``'s ulp of the rounded value)."""
    v = np.abs(np.array([float(e) for e in np.asarray(exact, dtype=object).ravel()]))
    v = v.astype(dtype)
    fi = np.finfo(dtype)
    return np.maximum(np.spacing(v).astype(np.float64), float(fi.smallest_subnormal)).reshape(
        np.shape(exact)
    )
