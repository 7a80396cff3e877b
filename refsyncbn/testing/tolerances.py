r"""Tolerances you can defend: a first-order error model of SyncBatchNorm.

:class:`ErrorModel` bounds, element by element, how far a correct
implementation's ``y``, ``dx``, ``dweight``, ``dbias``, ``running_mean`` and
``running_var`` may lie from the exact (float64 oracle) values, given

* the output dtypes (unit roundoff ``u_out`` of ``x``'s dtype for ``y``/``dx``,
  of ``weight``'s for the parameter gradients, of the running statistics' own),
* the group count ``m`` (elements per channel over the group),
* the channel's condition ``kappa = |mean| / std``,
* the implementation's accumulation precision ``u`` (``accumulation=``:
  float64, float32, bfloat16 or float16 sums AND arithmetic; by default the
  data's own precision, at least float32: what every framework accumulates in),
* its variance algorithm (``variance=``): ``"stable"`` (the default: any
  cancellation-free algorithm, including per-rank or per-block statistics
  merged by count or equally, Welford, in float32 or float64 merges),
  ``"two_pass"`` (only ``sum (x - mean)^2`` about one global mean) or
  ``"naive"`` (``E[x^2] - E[x]^2``, an allowance for frameworks that use it),
* its summation order (``summation=``): ``"pairwise"`` (tree or blocked
  reductions, what GPUs and NumPy do) or ``"recursive"`` (one running sum).

Derivation (per channel; ``w`` weight, ``b`` bias; ``omega_i`` the weight of
element ``i`` in the statistics: ``1/m`` for count weighting, ``1/(R n_r)``
for equal weighting over ``R`` non-empty ranks).

1. Summation. A sum of ``n`` terms computed with unit roundoff ``u`` is off
   by at most ``gamma(n) * u * sum |terms|`` with ``gamma(n) = ceil(log2 n) + 1``
   for pairwise and ``gamma(n) = n`` for recursive summation (Higham,
   *Accuracy and Stability of Numerical Algorithms*, 4.2 and 4.6: worst-case
   bounds; typical errors are smaller by about ``sqrt(gamma)``).
2. Mean. ``d_mean = (gamma(m) + 2) u S1`` with ``S1 = sum omega_i |x_i| <=
   sqrt(mean^2 + var)``; relative to the std that is ``~ gamma u sqrt(1 + kappa^2)``:
   no algorithm escapes the rounding of ``mean`` itself.
3. Variance. ``naive`` subtracts two nearly equal numbers:
   ``d_var = (gamma(m) + 4) u S2 + 2 |mean| d_mean`` with ``S2 = sum omega_i x_i^2
   = mean^2 + var``, i.e. a relative error ``~ 3 gamma u (1 + kappa^2)``: the
   ``kappa^2`` CANCELLATION AMPLIFICATION (float32 data with mean 1000 and std
   2, ``kappa = 500``, loses ``log10(2.5e5 * 3 * gamma) ~ 7`` of float32's 7
   digits). ``two_pass`` sums squares of already-centred values:
   ``d_var = (gamma(m) + 4) u var + d_mean^2`` (a wrong centre only adds its
   square), relative error ``~ gamma u`` independent of ``kappa``.
   ``stable`` adds the MERGE term ``2 std d_mean``: per-rank (or per-block,
   or Welford's running) means carry their own rounding ``d_mean_r``, and the
   between-rank term ``sum_r n_r (mean_r - mean)^2`` of the Chan merge is off
   by ``2 sum_r n_r |mean_r - mean| d_mean_r <= 2 m std d_mean``: a relative
   error ``~ 2 gamma u kappa``, linear in ``kappa`` (Chan, Golub & LeVeque
   1983: updating algorithms). PyTorch's SyncBatchNorm (float32 per-rank
   statistics merged by count) lives here; the ``two_pass`` bound rejects it
   by 36x at ``kappa ~ 1e3``.
4. Normalizer. ``rho = d_var / (var + eps) + 2u`` bounds the relative error of
   ``var + eps`` (plus the square root and the division); ``invstd`` is then
   off by ``rho / 2`` relative. The model is first order: where
   ``rho >= 1/2`` (the declared algorithm cannot resolve the channel) the
   bounds of everything that depends on ``invstd`` are infinite.
5. ``x_hat = (x - mean) invstd`` is off by
   ``d_xhat = d_mean invstd + |x_hat| rho / 2 + 2u (|x| + |mean|) invstd``
   (the last term also covers the folded form ``x * scale + shift`` that
   inference kernels use, whose rounding is relative to ``|x|``, not
   ``|x - mean|``), and
   ``y = w x_hat + b`` by ``|w| d_xhat + 2u (|w x_hat| + |b|) + 2 u_out |y|``:
   the last term is the rounding of BOTH the candidate's and the reference's
   output to the output dtype (the expected values may be the float64 oracle
   or the reference's own rounded output).
6. Backward. ``dx = w invstd (dy - omega (A + x_hat B))`` with group sums
   ``A = sum dy``, ``B = sum dy x_hat`` over ``M`` positions:
   ``d_A = gamma(M) u sum |dy|``, ``d_B = gamma(M) u sum |dy x_hat| + sum |dy| d_xhat``,
   and ``d_dx = |dx| (rho/2 + u) + |w| invstd [omega (d_A + |x_hat| d_B + |B| d_xhat)
   + 3u (|dy| + omega |A| + omega |x_hat B|)] + 2 u_out |dx|``.
   ``dbias = sum dy`` and ``dweight = sum dy x_hat`` over this rank (or the
   group for summed / averaged parameter gradients): ``gamma u sum |dy|`` and
   ``gamma u sum |dy x_hat| + sum |dy| d_xhat``, plus output rounding.
7. Running statistics with batch weight ``a`` (``1 - momentum`` for
   "retain", ``momentum`` for "update") and correction ``k`` (1, ``m/(m-1)``
   or ``n/(n-1)``): ``a d_mean`` and ``a k d_var``, plus ``2 (u + u_rs)`` times
   the magnitudes of the two terms of the update.
8. Eval mode normalizes with the given running statistics: ``d_mean = d_var = 0``.
9. The expected values are float64 computations too (the oracle's sums
   round like a float64 implementation's), so every ``u`` above is the
   candidate's unit roundoff plus 2**-53: negligible for float32 candidates,
   a factor 2 for float64 ones.

Every bound is multiplied by ``safety`` (default 2) for the second-order terms
and constants the first-order analysis drops, and floored at the smallest
subnormal of the output dtype. Expected values that are not finite (NaN from
``eps = 0`` and zero variance, or NaN padding under a mask) must be matched
exactly: NaN by NaN, an infinity by the same infinity.

The model is calibrated against an algorithm zoo in ``tests/test_zoo.py``:
every legitimate algorithm passes on hard cases, every wrong one fails by at
least 10x, and the worst legitimate error is within 10x of each bound
(docs/conformance.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .._xp import to_numpy
from ..cases import RESULT_KEYS
from ..conventions import get_convention
from ..layouts import get_layout
from .oracle import _group_rows, _rows, _unrows, expected_outputs

__all__ = [
    "ErrorModel",
    "QuantityCheck",
    "assert_output_close",
    "assert_sync_batch_norm_close",
    "compare_outputs",
    "unit_roundoff",
]

_UNIT_ROUNDOFF = {
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float32": 2.0**-24,
    "float64": 2.0**-53,
}
_VARIANCES = ("stable", "two_pass", "naive")
_SUMMATIONS = ("pairwise", "recursive")
_CHANNEL_VECTORS = ("dweight", "dbias", "running_mean", "running_var")


def unit_roundoff(dtype) -> float:
    """Unit roundoff ``u`` (half the machine epsilon) of a floating dtype or its name.

    Examples
    --------
    >>> unit_roundoff("float32") == 2.0**-24
    True
    >>> unit_roundoff(np.float16)
    0.00048828125
    """
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _UNIT_ROUNDOFF:
        msg = f"dtype is {dtype!r}; expected one of {tuple(_UNIT_ROUNDOFF)}"
        raise ValueError(msg)
    return _UNIT_ROUNDOFF[name]


def _expected(case, param_grads):
    """The oracle's outputs; NaN from ``eps = 0`` and zero variance is expected, not warned."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return expected_outputs(case, param_grads=param_grads)


def _tiny(dtype) -> float:
    return float(np.finfo(dtype).smallest_subnormal)


@dataclass(frozen=True)
class ErrorModel:
    """Error bounds of a correct implementation with the given arithmetic.

    Parameters
    ----------
    accumulation : {"float64", "float32", "bfloat16", "float16"}, optional
        Precision of the implementation's sums and arithmetic. Default: the
        data's dtype, at least float32 (float64 for float64 data; float32 for
        float32, float16 and bfloat16 data, as every framework accumulates).
    variance : {"stable", "two_pass", "naive"}
        ``"stable"`` (default): every cancellation-free algorithm, per-rank or
        per-block statistics merged by count or equally and Welford included
        (relative variance error ``~ gamma u |mean| / std``); ``"two_pass"``:
        only ``sum (x - mean)^2`` about one global mean (``~ gamma u``);
        ``"naive"``: an allowance for ``E[x^2] - E[x]^2`` (Flax, Keras,
        Paddle), whose error grows like ``(|mean| / std)^2``.
    summation : {"pairwise", "recursive"}
        Growth of summation error with the count ``n``: ``ceil(log2 n) + 1``
        or ``n``.
    safety : float
        Factor applied to every first-order bound.

    Notes
    -----
    The module docstring derives the bounds; ``tests/test_zoo.py`` calibrates
    them (every legitimate algorithm within, every wrong one 10x beyond, the
    worst legitimate one within 10x of the bound).

    Examples
    --------
    >>> from refsyncbn.cases import Case
    >>> x = np.array([[1000.0], [1002.0], [1004.0], [1006.0]], dtype=np.float32)
    >>> case = Case(x=x, running_mean=np.zeros(1, np.float32),
    ...             running_var=np.ones(1, np.float32), splits=(2, 2), data_format="NC")
    >>> stable = ErrorModel().bounds(case)[0]["running_var"]
    >>> naive = ErrorModel(variance="naive").bounds(case)[0]["running_var"]
    >>> bool(naive[0] > 100 * stable[0])          # |mean|/std ~ 450: cancellation
    True
    """

    accumulation: str | None = None
    variance: str = "stable"
    summation: str = "pairwise"
    safety: float = 2.0

    def __post_init__(self):
        if self.accumulation is not None:
            unit_roundoff(self.accumulation)
        for name, allowed in (("variance", _VARIANCES), ("summation", _SUMMATIONS)):
            if getattr(self, name) not in allowed:
                msg = f"ErrorModel.{name} is {getattr(self, name)!r}; expected one of {allowed}"
                raise ValueError(msg)
        if not self.safety >= 1:
            msg = f"ErrorModel.safety is {self.safety!r}; expected a float >= 1"
            raise ValueError(msg)

    def growth(self, n: int) -> float:
        """Summation error growth ``gamma(n)`` for ``n`` terms."""
        n = max(int(n), 1)
        return float(math.ceil(math.log2(n)) + 1) if self.summation == "pairwise" else float(n)

    def unit(self, dtype) -> float:
        """The candidate's unit roundoff on ``dtype`` data plus the float64 oracle's (item 9)."""
        acc = self.accumulation
        if acc is None:
            acc = "float64" if np.dtype(dtype) == np.float64 else "float32"
        return unit_roundoff(acc) + _UNIT_ROUNDOFF["float64"]

    def statistics_error(self, s1, s2, mean, var, m, *, u):
        """First-order bounds ``(d_mean, d_var)`` on a group's mean and biased variance.

        ``s1 = sum omega_i |x_i|`` and ``s2 = sum omega_i x_i^2`` over the ``m``
        elements of the group, ``u`` from :meth:`unit` (items 2 and 3 of the
        module docstring); no safety factor.
        """
        g = self.growth(m)
        d_mean = (g + 2) * u * s1
        if self.variance == "naive":
            return d_mean, (g + 4) * u * s2 + 2 * np.abs(mean) * d_mean
        d_var = (g + 4) * u * var + d_mean**2
        if self.variance == "stable":
            d_var = d_var + 2 * np.sqrt(var) * d_mean
        return d_mean, d_var

    def bounds(self, case, expected=None, *, param_grads=None) -> list[dict]:
        """Per world rank, the error bound of every output of ``case``.

        Parameters
        ----------
        case : refsyncbn.cases.Case
            The problem.
        expected : list of dict, optional
            ``refsyncbn.testing.expected_outputs(case, param_grads=...)``,
            computed when omitted.
        param_grads : {"local", "sum", "mean"}, optional
            Reduction of the parameter gradients (default: the convention's).

        Returns
        -------
        list of dict
            Keys of :data:`refsyncbn.cases.RESULT_KEYS`; each bound is a
            float64 array the shape of the output (``None`` where the output
            is absent), ``inf`` where the model promises nothing.
        """
        conv = get_convention(case.convention)
        pg = conv.param_grads if param_grads is None else param_grads
        if expected is None:
            expected = _expected(case, pg)
        axis = get_layout(case.data_format).channel_axis
        u = self.unit(case.x.dtype)
        u_out, tiny_out = unit_roundoff(case.x.dtype), _tiny(case.x.dtype)
        u_rs, tiny_rs = unit_roundoff(case.running_mean.dtype), _tiny(case.running_mean.dtype)
        affine = case.weight is not None
        w = np.abs(np.asarray(case.weight, np.float64)) if affine else 1.0
        b = np.abs(np.asarray(case.bias, np.float64)) if affine else 0.0
        out: list = [None] * case.world_size
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for group in case.groups or [list(range(case.world_size))]:
                self._group_bounds(
                    case,
                    conv,
                    pg,
                    group,
                    expected,
                    out,
                    axis=axis,
                    u=u,
                    u_out=u_out,
                    tiny_out=tiny_out,
                    u_rs=u_rs,
                    tiny_rs=tiny_rs,
                    w=w,
                    b=b,
                )
        # 0 * inf (an exact zero times a term the model cannot bound) is NaN:
        # it means "no promise", like inf.
        return [
            {k: None if v is None else np.where(np.isnan(v), np.inf, v) for k, v in res.items()}
            for res in out
        ]

    def _group_bounds(
        self, case, conv, pg, group, expected, out, *, axis, u, u_out, tiny_out, u_rs, tiny_rs, w, b
    ):
        """Fill ``out[r]`` for every rank ``r`` of ``group`` (see the module docstring)."""
        shards, xs, valid, counts, omegas = _group_rows(case, conv, group, axis)
        m, positions = sum(counts), sum(len(x) for x in xs)
        ref = expected[group[0]]
        mean, var = np.asarray(ref["mean"], np.float64), np.asarray(ref["var"], np.float64)
        zero = np.zeros_like(mean)
        if case.training:
            absx = [np.where(v[:, None], np.abs(x), 0.0) for x, v in zip(xs, valid, strict=True)]
            s1 = sum(om * a.sum(0) for om, a in zip(omegas, absx, strict=True))
            s2 = sum(om * (a * a).sum(0) for om, a in zip(omegas, absx, strict=True))
            d_mean, d_var = self.statistics_error(s1, s2, mean, var, m, u=u)
        else:
            d_mean, d_var = zero, zero
        denom = var + case.eps
        invstd = 1.0 / np.sqrt(denom)
        rho = d_var / denom + 2 * u
        rho = np.where(rho < 0.5, rho, np.inf)  # NaN (0/0) also means "no bound"
        xhats = [(x - mean) * invstd for x in xs]
        d_xhats = [
            d_mean * invstd + np.abs(xh) * rho / 2 + 2 * u * (np.abs(x) + np.abs(mean)) * invstd
            for x, xh in zip(xs, xhats, strict=True)
        ]
        s = self.safety
        for r, shard, xh, dxh in zip(group, shards, xhats, d_xhats, strict=True):
            y = _rows(expected[r]["y"], axis)
            bound = w * dxh + 2 * u * (w * np.abs(xh) + b) + 2 * u_out * np.abs(y)
            out[r] = {"y": _unrows(s * bound + tiny_out, shard["x"].shape, axis)}
            out[r].update(
                self._running_bounds(
                    case,
                    conv,
                    r,
                    mean,
                    var,
                    d_mean,
                    d_var,
                    m,
                    counts[group.index(r)],
                    expected,
                    u=u,
                    u_rs=u_rs,
                    tiny=tiny_rs,
                )
            )
        if case.dy is None:
            for r in group:
                out[r].update(dx=None, dweight=None, dbias=None)
            return
        dys = [_rows(sh["dy"], axis) for sh in shards]
        dys_xh = [dy * xh for dy, xh in zip(dys, xhats, strict=True)]
        a_sum, b_sum = sum(dy.sum(0) for dy in dys), sum(p.sum(0) for p in dys_xh)
        abs_dy = [np.abs(dy).sum(0) for dy in dys]
        abs_dy_xh = [np.abs(p).sum(0) for p in dys_xh]
        dy_dxh = [(np.abs(dy) * dxh).sum(0) for dy, dxh in zip(dys, d_xhats, strict=True)]
        gp = self.growth(positions)
        d_a = gp * u * sum(abs_dy)
        d_b = gp * u * sum(abs_dy_xh) + sum(dy_dxh)
        for i, r in enumerate(group):
            om = (omegas[i] * valid[i][:, None]) if case.training else 0.0
            dy, xh, dxh = dys[i], xhats[i], d_xhats[i]
            dx = np.abs(_rows(expected[r]["dx"], axis))
            inner = om * (d_a + np.abs(xh) * d_b + np.abs(b_sum) * dxh) + 3 * u * (
                np.abs(dy) + om * (np.abs(a_sum) + np.abs(xh * b_sum))
            )
            bound = dx * (rho / 2 + u) + w * invstd * inner + 2 * u_out * dx
            out[r]["dx"] = _unrows(s * bound + tiny_out, shards[i]["x"].shape, axis)
            if case.weight is None:
                out[r].update(dweight=None, dbias=None)
                continue
            if pg == "local":
                gr = self.growth(len(dy))
                d_dw, d_db = gr * u * abs_dy_xh[i] + dy_dxh[i], gr * u * abs_dy[i]
            else:
                share = 1.0 if pg == "sum" else 1.0 / len(group)
                d_dw = share * (gp * u * sum(abs_dy_xh) + sum(dy_dxh))
                d_db = share * d_a
            u_p, tiny_p = unit_roundoff(case.weight.dtype), _tiny(case.weight.dtype)
            for key, d in (("dweight", d_dw), ("dbias", d_db)):
                mag = np.abs(np.asarray(expected[r][key], np.float64))
                out[r][key] = s * (d + 2 * u_p * mag) + tiny_p

    def _running_bounds(
        self, case, conv, r, mean, var, d_mean, d_var, m, n, expected, *, u, u_rs, tiny
    ) -> dict:
        """Bounds of rank ``r``'s new running statistics (item 7 of the model)."""
        rm0 = np.abs(np.asarray(case.running_mean, np.float64))
        rv0 = np.abs(np.asarray(case.running_var, np.float64))
        if not case.training:
            return {"running_mean": 2 * u_rs * rm0 + tiny, "running_var": 2 * u_rs * rv0 + tiny}
        a = conv.batch_weight(case.momentum)
        if conv.running_var == "biased":
            k = 1.0
        else:
            cnt = m if conv.running_var == "unbiased_global" else n
            k = cnt / (cnt - 1) if cnt > 1 else 1.0
        rnd = 2 * (u + u_rs)
        bm = a * d_mean + rnd * ((1 - a) * rm0 + a * np.abs(mean))
        bv = a * k * d_var + rnd * ((1 - a) * rv0 + a * k * var)
        return {"running_mean": self.safety * bm + tiny, "running_var": self.safety * bv + tiny}


@dataclass(frozen=True)
class QuantityCheck:
    """One output of one rank compared with its expected value under a bound.

    ``ratio`` is the largest ``|actual - expected| / bound`` over the
    elements (``inf`` for a missing output, a wrong shape or a non-finite
    mismatch); ``error``, ``bound``, ``index`` and ``channel`` describe the
    element where it is reached; ``problem`` says what is wrong beyond size.
    """

    rank: int
    quantity: str
    ratio: float
    error: float
    bound: float
    index: tuple
    channel: int | None
    problem: str = ""

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0

    def describe(self) -> str:
        """One line: what failed (or passed), where, by how much."""
        where = f"rank {self.rank}, {self.quantity}"
        if self.channel is not None:
            where += f", channel {self.channel}"
        if self.problem:
            return f"{where}: {self.problem}"
        return (
            f"{where}: |error| {self.error:.3g} at index {self.index} is "
            f"{self.ratio:.3g} x the bound {self.bound:.3g}"
        )


def compare_outputs(actual, expected, bounds, *, data_format) -> list[QuantityCheck]:
    """Compare every rank's outputs with the expected ones under per-element bounds.

    Parameters
    ----------
    actual : sequence of mapping
        Per world rank, the implementation's outputs (any array namespace).
    expected, bounds : sequence of dict
        :func:`refsyncbn.testing.expected_outputs` and
        :meth:`ErrorModel.bounds` of the same case.
    data_format : str
        Where the channel axis of ``y``/``dx`` is (for reporting).

    Returns
    -------
    list of QuantityCheck
        One per rank and expected output (:data:`refsyncbn.cases.RESULT_KEYS`).
    """
    axis = get_layout(data_format).channel_axis
    checks = []
    for r, (act, exp, bnd) in enumerate(zip(actual, expected, bounds, strict=True)):
        for key in RESULT_KEYS:
            if exp.get(key) is not None:
                checks.append(
                    _compare_one(
                        r,
                        key,
                        act.get(key),
                        exp[key],
                        bnd[key],
                        0 if key in _CHANNEL_VECTORS else axis,
                    )
                )
    return checks


def _compare_one(rank, key, actual, expected, bound, axis) -> QuantityCheck:
    """Check one array; see :class:`QuantityCheck`."""
    expected = np.asarray(expected, np.float64)
    if actual is None:
        return QuantityCheck(rank, key, math.inf, math.inf, 0.0, (), None, "missing")
    actual = np.asarray(to_numpy(actual), np.float64)
    if actual.shape != expected.shape:
        problem = f"shape {actual.shape}, expected {expected.shape}"
        return QuantityCheck(rank, key, math.inf, math.inf, 0.0, (), None, problem)
    if expected.size == 0:
        return QuantityCheck(rank, key, 0.0, 0.0, 0.0, (), None)
    finite = np.isfinite(expected)
    same_special = (np.isnan(expected) & np.isnan(actual)) | (~finite & (actual == expected))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.where(finite, np.abs(actual - expected), np.where(same_special, 0.0, np.inf))
        ratio = np.where(err == 0, 0.0, err / bound)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    flat = int(np.argmax(ratio))
    index = tuple(int(i) for i in np.unravel_index(flat, expected.shape))
    problem = ""
    if not np.isfinite(err.flat[flat]):
        problem = f"{actual.flat[flat]} at index {index} where {expected.flat[flat]} is expected"
    return QuantityCheck(
        rank,
        key,
        float(ratio.flat[flat]),
        float(err.flat[flat]),
        float(np.broadcast_to(bound, expected.shape).flat[flat]),
        index,
        index[axis],
        problem,
    )


def assert_sync_batch_norm_close(
    actual: Sequence[Mapping], case, *, model=None, expected=None, param_grads=None
) -> list[QuantityCheck]:
    """Assert that every rank's outputs are within the error model's bounds.

    Parameters
    ----------
    actual : sequence of mapping
        Per world rank ``r`` of ``case``, the implementation's outputs (keys of
        :data:`refsyncbn.cases.RESULT_KEYS`; ``y`` at least; ``dx``,
        ``dweight``, ``dbias`` are required when ``case.dy`` is given, the
        parameter gradients only with affine parameters).
    case : refsyncbn.cases.Case
        The problem, e.g. drawn from :func:`refsyncbn.testing.strategies.cases`.
    model : ErrorModel, optional
        The implementation's arithmetic (default ``ErrorModel()``: float32
        accumulation, cancellation-free variance, pairwise sums).
    expected : list of dict, optional
        ``expected_outputs(case, param_grads=param_grads)``, computed when omitted.
    param_grads : {"local", "sum", "mean"}, optional
        Reduction of the parameter gradients (default: the convention's).

    Returns
    -------
    list of QuantityCheck
        Every comparison (all passed).

    Raises
    ------
    AssertionError
        Listing each failing rank / quantity / channel with its error and its
        ratio to the bound, worst first.

    Examples
    --------
    >>> from refsyncbn.cases import Case
    >>> from refsyncbn.testing import expected_outputs
    >>> x = np.arange(8.0).reshape(4, 2)
    >>> case = Case(x=x, running_mean=np.zeros(2), running_var=np.ones(2), splits=(1, 3),
    ...             data_format="NC")
    >>> good = expected_outputs(case)
    >>> _ = assert_sync_batch_norm_close(good, case)
    >>> bad = [dict(o) for o in good]
    >>> bad[1]["y"] = bad[1]["y"] + 1e-3
    >>> assert_sync_batch_norm_close(bad, case)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    AssertionError: 1 of 6 output(s) of 2 rank(s) outside the error bound (ErrorModel(...
      rank 1, y, channel ...: |error| 0.001 at index ... is ... x the bound ...
    """
    if len(actual) != case.world_size:
        msg = f"actual has outputs of {len(actual)} rank(s); the case has {case.world_size}"
        raise AssertionError(msg)
    model = ErrorModel() if model is None else model
    if expected is None:
        expected = _expected(case, param_grads)
    bounds = model.bounds(case, expected, param_grads=param_grads)
    checks = compare_outputs(actual, expected, bounds, data_format=case.data_format)
    failed = sorted((c for c in checks if not c.passed), key=lambda c: -c.ratio)
    if failed:
        lines = [
            f"{len(failed)} of {len(checks)} output(s) of {case.world_size} rank(s) outside "
            f"the error bound ({model}):"
        ]
        lines += [f"  {c.describe()}" for c in failed]
        raise AssertionError("\n".join(lines))
    return checks


def assert_output_close(
    actual, case, output="y", *, rank=0, model=None, param_grads=None
) -> QuantityCheck:
    """Assert that ONE output array of one rank is within the error model's bound.

    The one-array counterpart of :func:`assert_sync_batch_norm_close`, in the
    spirit of ``torch.testing.assert_close``: the expected value is the
    float64 oracle of ``case``, the tolerance the :class:`ErrorModel` bound.

    Parameters
    ----------
    actual : array
        The implementation's ``output`` on world rank ``rank`` (any array
        namespace; moved to NumPy).
    case : refsyncbn.cases.Case
        The problem.
    output : str
        One of :data:`refsyncbn.cases.RESULT_KEYS` (``"y"``, ``"dx"``,
        ``"dweight"``, ``"dbias"``, ``"running_mean"``, ``"running_var"``).
    rank : int
        The world rank that produced ``actual``.
    model : ErrorModel, optional
        The implementation's arithmetic (default ``ErrorModel()``).
    param_grads : {"local", "sum", "mean"}, optional
        Reduction of the parameter gradients (default: the convention's).

    Returns
    -------
    QuantityCheck
        The comparison (passed).

    Raises
    ------
    ValueError
        ``output`` or ``rank`` is not one of the case's.
    AssertionError
        Naming the rank, output, channel and element of the largest error
        and its ratio to the bound.

    Examples
    --------
    >>> from refsyncbn.cases import Case
    >>> x = np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]], np.float32)
    >>> case = Case(x=x, running_mean=np.zeros(2, np.float32),
    ...             running_var=np.ones(2, np.float32), splits=(1, 2), data_format="NC")
    >>> mean, var = x.mean(0), x.var(0)
    >>> y1 = (x[1:] - mean) / np.sqrt(var + 1e-5)           # rank 1's y, float32
    >>> assert_output_close(y1, case, "y", rank=1).passed
    True
    >>> assert_output_close(y1 * 1.001, case, "y", rank=1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    AssertionError: rank 1, y, channel ...: |error| ... x the bound ... (ErrorModel(...))
    """
    if output not in RESULT_KEYS:
        msg = f"output is {output!r}; expected one of {RESULT_KEYS}"
        raise ValueError(msg)
    if not 0 <= rank < case.world_size:
        msg = f"rank is {rank!r}; expected an int in [0, {case.world_size}) for this case"
        raise ValueError(msg)
    model = ErrorModel() if model is None else model
    expected = _expected(case, param_grads)
    if expected[rank].get(output) is None:
        msg = f"output is {output!r}, which this case does not produce (no dy or no affine)"
        raise ValueError(msg)
    bound = model.bounds(case, expected, param_grads=param_grads)[rank][output]
    axis = 0 if output in _CHANNEL_VECTORS else get_layout(case.data_format).channel_axis
    result = _compare_one(rank, output, actual, expected[rank][output], bound, axis)
    if not result.passed:
        msg = f"{result.describe()} ({model})"
        raise AssertionError(msg)
    return result
