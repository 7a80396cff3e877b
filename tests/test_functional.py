"""SimulatedWorld(1..4) runs of the functional core == the float64 global-batch oracle.

The oracle (:func:`refsyncbn.testing.oracle.expected_outputs`) concatenates each
group's shards and computes batch norm the textbook way in float64; the code
under test runs one thread per rank with packed all-reduces. Cases come from
:func:`refsyncbn.testing.strategies.cases`: every data format, dtype,
convention, uneven splits with empty ranks, ragged and non-contiguous groups,
masks, affine on/off, training and eval.

Tolerance rule (derived here once, used for every quantity)
-------------------------------------------------------------
The code converts its inputs exactly to float64, computes in float64 and
rounds once to the output dtype. So ``|got - want| <= rounding + float64 error``:

* rounding into the output dtype ``d``: ``u_d * |want| + s_d``, with ``u_d`` the
  unit roundoff (``finfo.eps / 2``: 2**-11 for float16, 2**-24 float32, 2**-53
  float64) and ``s_d`` the smallest subnormal, which covers results in the
  subnormal range;
* float64 error of the group statistics: with ``M`` the group's positions per
  channel, ``gamma = M * u_64`` bounds a sum of ``M`` terms (recursive
  summation, Higham 2002 eq. 3.5). With ``R = max |x|`` over the group (and
  ``|mean|``), the sums give ``|d mean| <= gamma R`` and ``|d var| <= 3 gamma
  R**2`` (``E[x^2] - mean**2``: ``gamma R**2`` from the sum of squares, ``2 |mean|
  |d mean| <= 2 gamma R**2``), so ``|d sigma| / sigma <= 1.5 gamma kappa**2``
  with ``sigma = sqrt(var + eps)`` and the channel condition ``kappa = 1 + R /
  sigma``; hence ``|d x_hat| <= 2 gamma kappa**2 (1 + |x_hat|)``.
* every output is then a short float64 expression of ``x_hat``, the sums and
  the parameters; propagating the errors above bounds it by ``gamma kappa**2``
  times a magnitude ``S`` of the terms that the expression combines (listed in
  :func:`_scales`), with a constant below 6 (sum of the coefficients: 1.5 from
  ``sigma``, 2 from ``x_hat``, 1 from the sums, plus a few roundings ``u_64``).
  We use ``K = 8``, doubled because the oracle carries an error of the same
  form (it is more accurate: two-pass variance).

So ``tol = u_d |want| + s_d + 2 K gamma kappa**2 S``. For generic float64 data
(``M`` <= a few hundred, ``|mean| / std`` <= 100) this is ~1e-10 relative; for
float32/float16 the rounding term dominates (6e-8, 4.9e-4 relative). A
float32 accumulator or a wrong formula misses it by orders of magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest
from _simrun import run_case
from hypothesis import given, settings
from hypothesis import strategies as st

from refsyncbn import SimulatedWorld, backward, forward
from refsyncbn.cases import Case
from refsyncbn.conventions import get_convention
from refsyncbn.functional import VARIANCE_ALGORITHMS, combine_moments
from refsyncbn.layouts import get_layout
from refsyncbn.testing.oracle import expected_outputs
from refsyncbn.testing.strategies import cases, hard_cases

U64 = np.finfo(np.float64).eps / 2
K = 8.0
PARAM_GRADS = st.sampled_from([None, "local", "sum", "mean"])
PER_ELEMENT = ("y", "dx")
PER_CHANNEL = ("mean", "var", "running_mean", "running_var", "dweight", "dbias")


def _rows(a, axis):
    """``a`` as float64 ``(positions, C)``."""
    moved = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _scales(case, want, group):
    """Per world rank of ``group``: ``(gamma kappa**2, {quantity: magnitude S})``.

    ``S`` per quantity (``W`` = m * the weight of one of the rank's elements in
    the statistics, 1 for count weighting; ``D = max |dy|``, ``X = max |x_hat|``):
    y: ``|w| (1 + |x_hat|) + |b|``; dx: ``|w| / sigma (|dy| + W D (1 + X)**2)``;
    dweight: ``sum |dy| (1 + X)``; dbias: ``sum |dy|``; mean: ``R``; var: ``R**2``;
    running_mean: ``R + |rm|``; running_var: ``2 R**2 + |rv|`` (the unbiased
    correction is at most 2).
    """
    layout = get_layout(case.data_format)
    axis = layout.channel_axis
    shards = [case.shard(r) for r in group]
    xs = [_rows(s["x"], axis) for s in shards]
    x_all = np.concatenate(xs)
    ref = want[group[0]]
    mean, var = ref["mean"], ref["var"]
    sigma = np.sqrt(var + case.eps)
    big_r = np.maximum(np.abs(x_all).max(axis=0), np.abs(mean))
    kappa2 = (1.0 + big_r / sigma) ** 2
    gamma = x_all.shape[0] * U64
    c = x_all.shape[1]
    w = np.ones(c) if case.weight is None else np.abs(case.weight.astype(np.float64))
    b = np.zeros(c) if case.bias is None else np.abs(case.bias.astype(np.float64))
    counts = [
        len(x) if "mask" not in s else int(s["mask"].sum()) for x, s in zip(xs, shards, strict=True)
    ]
    m = sum(counts)
    if get_convention(case.convention).weighting == "count":
        big_w = 1.0
    else:
        ranks = sum(n > 0 for n in counts)
        big_w = max(m / (ranks * n) for n in counts if n)
    xhat_all = np.abs(x_all - mean) / sigma
    big_x = xhat_all.max(axis=0)
    rm0 = np.abs(case.running_mean.astype(np.float64))
    rv0 = np.abs(case.running_var.astype(np.float64))
    out = {}
    for r, x in zip(group, xs, strict=True):
        s = {
            "y": w * (1 + np.abs(x - mean) / sigma) + b,
            "mean": big_r,
            "var": big_r**2,
            "running_mean": big_r + rm0,
            "running_var": 2 * big_r**2 + rv0,
        }
        if case.dy is not None:
            dy_all = np.concatenate([_rows(sh["dy"], axis) for sh in shards])
            dy_r = _rows(case.shard(r)["dy"], axis)
            big_d = np.abs(dy_all).max(axis=0)
            s["dx"] = w / sigma * (np.abs(dy_r) + big_w * big_d * (1 + big_x) ** 2)
            s["dweight"] = np.abs(dy_all).sum(axis=0) * (1 + big_x)
            s["dbias"] = np.abs(dy_all).sum(axis=0)
        out[r] = (gamma * kappa2, s)
    return out


def assert_matches_oracle(case, got, want):
    """Every rank's outputs within the tolerance rule of the module docstring."""
    layout = get_layout(case.data_format)
    dtype = case.x.dtype
    for group in case.groups or [list(range(case.world_size))]:
        for r, (gk2, scale) in _scales(case, want, group).items():
            for key, ref in want[r].items():
                value = got[r][key]
                if ref is None:
                    assert value is None, f"rank {r}: {key} should be None without affine"
                    continue
                stat = key in ("mean", "var")
                expected_dtype = np.float64 if stat else dtype
                assert value.dtype == expected_dtype, (
                    f"rank {r}: {key} has dtype {value.dtype}; expected {expected_dtype}"
                )
                if key in PER_ELEMENT:
                    assert value.shape == case.shard(r)["x"].shape, f"rank {r}: {key} shape"
                    value, ref = _rows(value, layout.channel_axis), _rows(ref, layout.channel_axis)
                value = np.asarray(value, dtype=np.float64)
                fi = np.finfo(np.float64 if stat else dtype)
                tol = fi.eps / 2 * np.abs(ref) + fi.smallest_subnormal + 2 * K * gk2 * scale[key]
                err = np.abs(value - ref)
                bad = ~(err <= tol)
                assert not bad.any(), (
                    f"rank {r} (group {group}): {key} off by {err[bad].max():.3g} where the "
                    f"bound is {tol[bad].min():.3g}; got {value[bad][:4]}, want {ref[bad][:4]}"
                )


class TestMatchesTheFloat64GlobalBatchOracle:
    @given(case=cases(), variance=st.sampled_from(VARIANCE_ALGORITHMS), param_grads=PARAM_GRADS)
    def test_every_rank_matches_on_random_cases(self, case, variance, param_grads):
        # The main property: uses the profile's example count (200 in CI).
        got = run_case(case, variance=variance, param_grads=param_grads)
        assert_matches_oracle(case, got, expected_outputs(case, param_grads=param_grads))

    @settings(max_examples=40)
    @given(case=hard_cases(), variance=st.sampled_from(VARIANCE_ALGORITHMS))
    def test_every_rank_matches_in_hard_regimes(self, case, variance):
        got = run_case(case, variance=variance)
        assert_matches_oracle(case, got, expected_outputs(case))


class TestVarianceAlgorithms:
    @settings(max_examples=30)
    @given(case=cases(dtypes=["float64"], training=True))
    def test_stable_and_naive_agree(self, case):
        one, two = run_case(case, variance="stable"), run_case(case, variance="naive")
        # Both are within the rule of the oracle, so within twice the rule of each other.
        assert_matches_oracle(case, one, two)

    def test_stable_is_exact_where_the_naive_sum_of_squares_cancels(self):
        # mean 1e8, variance 1.25 + spread of the two local means: E[x^2] ~ 1e16 has
        # an ulp of 2, so E[x^2] - mean^2 is off by O(1); stable combines (n, mean, M2).
        x = 1e8 + np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
        mean = x.mean()
        var = float(((x - mean) ** 2).mean())

        def body(variance):
            return lambda comm, shard: (
                forward(shard, data_format="NC", variance=variance, comm=comm).saved
            )

        for s in SimulatedWorld(2).run(body("stable"), [x[:2], x[2:]]):
            assert abs(float(s.mean[0]) - mean) <= 4 * U64 * mean
            assert abs(float(s.var[0]) - var) <= 1e-15 * var
        for s in SimulatedWorld(2).run(body("naive"), [x[:2], x[2:]]):  # the emulated flaw
            assert abs(float(s.var[0]) - var) > 1e-3 * var


class TestParamGrads:
    @settings(max_examples=30)
    @given(case=cases(dtypes=["float64"], affine=True, dy=True, world_sizes=[2, 3, 4]))
    def test_sum_and_mean_reduce_the_local_contributions_over_the_group(self, case):
        local = run_case(case, param_grads="local")
        summed = run_case(case, param_grads="sum")
        mean = run_case(case, param_grads="mean")
        for group in case.groups or [list(range(case.world_size))]:
            for key in ("dweight", "dbias"):
                total = sum(local[r][key] for r in group)
                scale = sum(np.abs(local[r][key]) for r in group) + 1.0
                for r in group:
                    assert np.all(np.abs(summed[r][key] - total) <= 1e-12 * scale)
                    assert np.all(np.abs(mean[r][key] - total / len(group)) <= 1e-12 * scale)
                    # dx does not depend on how the parameter gradients are reduced.
                    np.testing.assert_array_equal(summed[r]["dx"], local[r]["dx"])

    def test_defaults_follow_the_convention(self):
        rng = np.random.default_rng(3)
        x, dy = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
        w, b = np.array([1.5, -0.5]), np.array([0.1, 0.2])
        for name, factor in (("reference", None), ("mindspore", 1.0), ("chainermn", 0.5)):
            case = Case(
                x=x,
                dy=dy,
                weight=w,
                bias=b,
                running_mean=np.zeros(2),
                running_var=np.ones(2),
                splits=(2, 4),
                data_format="NC",
                convention=name,
            )
            got = run_case(case)
            for r, (lo, hi) in enumerate(((0, 2), (2, 6))):
                own = dy[lo:hi].sum(axis=0)
                expected = own if factor is None else dy.sum(axis=0) * factor
                np.testing.assert_allclose(got[r]["dbias"], expected, rtol=1e-13, atol=1e-13)


class _NoCollectives:
    """A two-rank communicator whose data collectives fail: proves a path moves no data."""

    rank, size = 0, 2

    def allreduce_min(self, buf, /, *, what):
        return buf  # the agreement of a one-rank-like world: every rank made this call

    def allreduce_sum(self, buf, /, *, xp):
        raise AssertionError("this path must not communicate")

    def combine(self, record, fn, /, *, xp):
        raise AssertionError("this path must not communicate")

    def split(self, color, key):
        raise AssertionError("this path must not communicate")


class TestEvalMode:
    def test_normalizes_with_running_statistics_and_communicates_nothing(self):
        x = np.array([[1.0, -2.0], [3.0, 4.0], [5.0, 0.5]])
        rm, rv = np.array([2.0, -1.0]), np.array([4.0, 0.25])
        w, b = np.array([2.0, 1.0]), np.array([0.5, -0.5])
        res = forward(
            x,
            w,
            b,
            running_mean=rm,
            running_var=rv,
            training=False,
            eps=0.0,
            data_format="NC",
            comm=_NoCollectives(),
        )
        # (x - rm) / sqrt(rv) * w + b by hand: channel 0 sqrt(4) = 2, channel 1 sqrt(.25) = .5
        expected = np.array([[-0.5, -2.5], [1.5, 9.5], [3.5, 2.5]])
        np.testing.assert_allclose(res.y, expected, rtol=0, atol=1e-15)
        assert res.running_mean is rm and res.running_var is rv
        g = backward(np.ones_like(x), res.saved)
        np.testing.assert_allclose(g.dx, np.ones_like(x) * [2.0 / 2, 1.0 / 0.5], atol=1e-15)
        np.testing.assert_allclose(g.dbias, [3.0, 3.0])

    def test_reduced_param_grads_still_communicate(self):
        x = np.ones((2, 1))
        res = forward(
            x,
            np.ones(1),
            np.zeros(1),
            running_mean=np.zeros(1),
            running_var=np.ones(1),
            training=False,
            data_format="NC",
            comm=_NoCollectives(),
        )
        with pytest.raises(AssertionError, match="must not communicate"):
            backward(np.ones_like(x), res.saved, param_grads="sum")


class TestMasks:
    @settings(max_examples=30)
    @given(case=cases(mask=True, dtypes=["float64"]), junk=st.sampled_from([1e6, -3e5]))
    def test_masked_out_values_do_not_touch_the_statistics(self, case, junk):
        moved = np.moveaxis(case.x, get_layout(case.data_format).channel_axis, -1).copy()
        moved[~case.mask] = junk
        x = np.moveaxis(moved, -1, get_layout(case.data_format).channel_axis)
        other = Case(**{**case.__dict__, "x": np.ascontiguousarray(x)})
        a, b = run_case(case), run_case(other)
        for r in range(case.world_size):
            for key in ("mean", "var", "running_mean", "running_var"):
                np.testing.assert_allclose(a[r][key], b[r][key], rtol=1e-9, atol=1e-12)
            valid = case.shard(r)["mask"]
            ya = np.moveaxis(a[r]["y"], get_layout(case.data_format).channel_axis, -1)[valid]
            yb = np.moveaxis(b[r]["y"], get_layout(case.data_format).channel_axis, -1)[valid]
            np.testing.assert_allclose(ya, yb, rtol=1e-9, atol=1e-9)

    def test_mask_statistics_by_hand(self):
        # Channel 0 valid values 1, 3 -> mean 2, var 1; position 1 (value 100) masked out
        # but still normalized: (100 - 2) / 1 = 98.
        x = np.array([[[1.0, 100.0, 3.0]]])  # NCL (1, 1, 3)
        mask = np.array([[True, False, True]])
        res = forward(x, eps=0.0, data_format="NCL", mask=mask)
        np.testing.assert_allclose(res.y, [[[-1.0, 98.0, 1.0]]], atol=1e-15)


def _records(rng, p, c, *, k=0):
    """Random ``(P, 4, c)`` records (n, mean, M2 / 4^k, e = k) with an empty rank."""
    n = rng.integers(0, 6, size=(p, 1)).astype(float) * np.ones((1, c))
    n[0] = 0.0
    n[-1] = np.maximum(n[-1], 2.0)
    mean = np.where(n > 0, rng.normal(0, 1, (p, c)) * 1e3 + 1e6, 0.0) * 2.0**k
    m2 = np.where(n > 1, rng.uniform(0, 1, (p, c)) * n, 0.0)
    return np.stack([n, mean, m2, np.full((p, c), float(k))], axis=1)


class TestCombineMoments:
    @pytest.mark.parametrize("weighting", ["count", "equal"])
    def test_matches_exact_rational_arithmetic(self, weighting):
        from fractions import Fraction

        rec = _records(np.random.default_rng(0), 4, 3)
        got = combine_moments(rec, xp=np, weighting=weighting)
        for j in range(3):
            rows = [(Fraction(int(r[0, j])), Fraction(r[1, j]), Fraction(r[2, j])) for r in rec]
            full = [(n, mu, m2) for n, mu, m2 in rows if n > 0]
            w = [n if weighting == "count" else 1 for n, _, _ in full]
            mean = sum(wi * mu for wi, (_, mu, _) in zip(w, full, strict=True)) / sum(w)
            q = [m2 if weighting == "count" else m2 / n for n, _, m2 in full]
            var = (
                sum(q) + sum(wi * (mu - mean) ** 2 for wi, (_, mu, _) in zip(w, full, strict=True))
            ) / sum(w)
            assert got[0, j] == sum(n for n, _, _ in rows) and got[1, j] == len(full)
            assert abs(Fraction(got[2, j]) - mean) <= 4 * U64 * abs(mean)
            assert abs(Fraction(got[3, j]) - var) <= 1e-9 * var  # kappa ~ 1e6 here
            assert got[4, j] == 0

    @pytest.mark.parametrize("overflow", [False, True])
    def test_any_channel_slice_gives_the_same_bytes(self, overflow):
        rec = _records(np.random.default_rng(1), 3, 5)
        if overflow:  # channel 3 combines ranks 1e300 apart, channel 1 carries e = 600
            rec[1:, 1, 3] = [1e300, -1e300]
            rec[:, 3, 1] = 600.0
        whole = combine_moments(rec, xp=np)
        for sl in (slice(0, 2), slice(2, 5), slice(4, 5)):
            assert combine_moments(rec[:, :, sl], xp=np).tobytes() == whole[:, sl].tobytes()

    @pytest.mark.parametrize("k", [1, 500, 1000])
    def test_power_of_two_scaling_is_exact(self, k):
        # records of data scaled by 2^k (M2 carried as M2 / 4^k, e = k): the same
        # bits, shifted in exponent, through the scaled path (E > 0); at k = 1000
        # the variance itself (~4^1000) is beyond float64
        base = combine_moments(_records(np.random.default_rng(2), 4, 3), xp=np)
        scaled = combine_moments(_records(np.random.default_rng(2), 4, 3, k=k), xp=np)
        assert (base[4] == 0).all() and (scaled[4] > 0).all()
        np.testing.assert_array_equal(scaled[2], base[2] * 2.0**k)
        np.testing.assert_array_equal(scaled[3] * 4.0 ** (scaled[4] - k), base[3])


@pytest.mark.parametrize(
    "data_format,shape",
    [("NC", (7, 3)), ("NCL", (4, 3, 5)), ("NCHW", (2, 3, 4, 9)), ("NHWC", (2, 3, 4, 5))],
)
@pytest.mark.parametrize("convention", ["reference", "torch"])
def test_one_rank_shortcut_equals_the_general_combination(data_format, shape, convention):
    """A one-rank call (no record, no combine) is bitwise a group whose other rank is empty.

    The two-rank group takes the general path (stacked records, Chan combination in
    ``combine_moments``, the backward sums all-reduced); with the second rank empty,
    exact arithmetic gives the one rank's own statistics, so every output must match
    to the bit. A shortcut dividing by the wrong count, or dropping a term, fails.
    """
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = get_layout(data_format).channels(shape)
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    mask = rng.random(get_layout(data_format).mask_shape(shape)) < 0.7

    def step(comm, x, dy, mask):
        res = forward(
            x,
            w,
            b,
            running_mean=np.zeros(c, np.float32),
            running_var=np.ones(c, np.float32),
            data_format=data_format,
            convention=convention,
            mask=mask,
            comm=comm,
        )
        g = backward(dy, res.saved, param_grads="sum")
        return [
            a.tobytes()
            for a in (res.y, res.running_mean, res.running_var, g.dx, g.dweight, g.dbias)
        ]

    empty = np.zeros((0, *shape[1:]), np.float32)
    for m in (None, mask):
        alone = step(None, x, dy, m)
        empty_mask = None if m is None else np.zeros((0, *m.shape[1:]), bool)
        shards = [(x, dy, m), (empty, empty, empty_mask)]
        group = SimulatedWorld(2).run(lambda comm, shards=shards: step(comm, *shards[comm.rank]))
        assert alone == group[0]


def test_forward_without_weight_is_bitwise_a_weight_of_ones():
    """``weight=None`` and ``weight=1`` give the same bits (backward reuses forward's scale)."""
    rng = np.random.default_rng(4)
    x, dy = rng.standard_normal((2, 3, 4, 9)), rng.standard_normal((2, 3, 4, 9))
    for kw in ({}, {"running_mean": np.ones(3), "running_var": np.full(3, 2.0), "training": False}):
        got = [forward(x, w, **kw) for w in (None, np.ones(3))]
        dx = [backward(dy, r.saved).dx for r in got]
        assert got[0].y.tobytes() == got[1].y.tobytes()
        assert dx[0].tobytes() == dx[1].tobytes()
