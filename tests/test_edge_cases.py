"""Edge cases the reference defines, bad input, and error agreement across ranks."""

from __future__ import annotations

import numpy as np
import pytest
from _simrun import run_case
from test_functional import assert_matches_oracle

from refsyncbn import RankError, SimulatedWorld, backward, forward
from refsyncbn.cases import Case, run_rank
from refsyncbn.comm.counting import CountingComm
from refsyncbn.conventions import CONVENTIONS
from refsyncbn.testing.oracle import expected_outputs


def _train(comm, x, dy, **kwargs):
    """Forward + backward on one rank with affine parameters of 2 channels."""
    res = forward(
        x,
        np.array([1.5, -0.5]),
        np.array([0.25, 0.0]),
        running_mean=np.zeros(2),
        running_var=np.ones(2),
        data_format="NC",
        comm=comm,
        **kwargs,
    )
    g = backward(dy, res.saved)
    return res, g


class TestEmptyLocalBatch:
    @pytest.mark.parametrize(
        "convention", [n for n, c in CONVENTIONS.items() if c.empty_rank == "skip"]
    )  # flax: NaN
    def test_an_empty_rank_joins_every_collective_and_contributes_zeros(self, convention):
        rng = np.random.default_rng(1)
        x, dy = rng.normal(size=(5, 2)) + np.array([3.0, -1.0]), rng.normal(size=(5, 2))
        shards = [(x[:2], dy[:2]), (x[:0], dy[:0]), (x[2:], dy[2:])]

        def body(comm, shard):
            counting = CountingComm(comm)
            res, g = _train(counting, *shard, convention=convention)
            return res, g, sum(counting.tally.calls.values())

        with_empty = SimulatedWorld(3).run(body, shards)
        without = SimulatedWorld(2).run(body, [shards[0], shards[2]])
        # The empty rank made the same collectives as the others ...
        assert [calls for _, _, calls in with_empty] == [4, 4, 4]
        # ... and adding its zeros changed no bit of anyone's result.
        for (res, g, _), (ref, gref, _) in zip(
            [with_empty[0], with_empty[2]], without, strict=True
        ):
            np.testing.assert_array_equal(res.y, ref.y)
            np.testing.assert_array_equal(g.dx, gref.dx)
            np.testing.assert_array_equal(res.running_mean, ref.running_mean)
        res, g, _ = with_empty[1]
        assert res.y.shape == (0, 2) and g.dx.shape == (0, 2)
        np.testing.assert_array_equal(res.saved.mean, without[0][0].saved.mean)
        if CONVENTIONS[convention].param_grads == "local":
            np.testing.assert_array_equal(g.dweight, [0.0, 0.0])
            np.testing.assert_array_equal(g.dbias, [0.0, 0.0])

    def test_a_group_with_no_element_raises_value_error_on_every_rank(self):
        x = np.zeros((0, 3))
        with pytest.raises(RankError) as info:
            SimulatedWorld(3).run(
                lambda comm, s: forward(s, data_format="NC", comm=comm), [x, x, x]
            )
        errors = info.value.errors
        assert sorted(errors) == [0, 1, 2]
        for e in errors.values():
            assert isinstance(e, ValueError) and "every rank of the group passed an empty" in str(e)

    def test_only_the_empty_group_raises(self):
        rng = np.random.default_rng(2)
        case = Case(
            x=rng.normal(size=(3, 2)),
            running_mean=np.zeros(2),
            running_var=np.ones(2),
            splits=(3, 0, 0),
            data_format="NC",
            groups=[[0], [1, 2]],
        )
        with pytest.raises(RankError) as info:
            run_case(case)
        assert sorted(info.value.errors) == [1, 2]
        assert all(isinstance(e, ValueError) for e in info.value.errors.values())


class TestOneValuePerChannel:
    @pytest.mark.parametrize(
        "convention", [n for n, c in CONVENTIONS.items() if n != "torch" and c.empty_rank == "skip"]
    )
    def test_variance_is_zero_and_unbiased_corrections_fall_back(self, convention):
        conv = CONVENTIONS[convention]
        x, dy = np.array([[2.0, -4.0]]), np.array([[0.5, 3.0]])
        out = SimulatedWorld(2).run(
            lambda comm, s: _train(comm, *s, convention=convention), [(x, dy), (x[:0], dy[:0])]
        )
        for res, _ in out:
            np.testing.assert_array_equal(res.saved.mean, [2.0, -4.0])
            np.testing.assert_array_equal(res.saved.var, [0.0, 0.0])
            # Batch weight in the running average, written out per convention by hand.
            w = 1 - conv.momentum  # every preset but torch "retains" its momentum
            np.testing.assert_allclose(res.running_mean, [2.0 * w, -4.0 * w], rtol=1e-15)
            np.testing.assert_allclose(res.running_var, [1 - w, 1 - w], rtol=1e-15)
        res, g = out[0]
        np.testing.assert_array_equal(res.y, [[0.25, 0.0]])  # x_hat = 0 -> y = bias
        np.testing.assert_array_equal(g.dx, [[0.0, 0.0]])

    def test_torch_in_a_group_of_two_gives_a_nan_running_var_like_torch(self):
        # PyTorch raises only when world_size < 2; then M2 / (count - 1) = 0 / 0
        x, dy = np.array([[2.0, -4.0]]), np.array([[0.5, 3.0]])
        out = SimulatedWorld(2).run(
            lambda comm, s: _train(comm, *s, convention="torch"), [(x, dy), (x[:0], dy[:0])]
        )
        for res, _ in out:
            assert np.isnan(res.running_var).all() and np.isfinite(res.running_mean).all()
        np.testing.assert_array_equal(out[0][0].y, [[0.25, 0.0]])  # x_hat = 0 -> y = bias

    def test_torch_counts_valid_mask_positions(self):
        x = np.array([[1.0], [2.0]])
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            forward(x, data_format="NC", convention="torch", mask=np.array([True, False]))


class TestNonFiniteValues:
    def test_zero_variance_with_eps_zero_gives_nan_in_that_channel_only(self):
        # 3.0 is exact: sum 9, sum of squares 27, mean 3, E[x^2] - mean^2 = 0 exactly.
        x = np.array([[3.0, 1.0], [3.0, 2.0], [3.0, 6.0]])

        def body(comm, shard):  # documented NaN: no RuntimeWarning (filterwarnings = error)
            return forward(shard, eps=0.0, data_format="NC", comm=comm)

        out = SimulatedWorld(2).run(body, [x[:1], x[1:]])
        for res in out:
            assert res.saved.var[0] == 0.0
            assert np.isnan(res.y[:, 0]).all()
            assert np.isfinite(res.y[:, 1]).all()
        ys = np.concatenate([res.y[:, 1] for res in out])
        np.testing.assert_allclose(ys, (x[:, 1] - 3.0) / np.sqrt(14 / 3), rtol=1e-14)

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_nan_and_inf_stay_in_their_channel(self, bad):
        rng = np.random.default_rng(4)
        x = rng.normal(size=(6, 3))
        x[4, 1] = bad  # on rank 1
        case = Case(
            x=x,
            dy=rng.normal(size=x.shape),
            weight=np.ones(3),
            bias=np.zeros(3),
            running_mean=np.zeros(3),
            running_var=np.ones(3),
            splits=(3, 3),
            data_format="NC",
        )
        with np.errstate(invalid="ignore"):  # inf - inf in the oracle
            want = expected_outputs(case)

        def body(comm):
            with np.errstate(invalid="ignore"):
                return run_rank(case, comm, param_grads=None)

        got = SimulatedWorld(2).run(body)
        for r in range(2):
            assert not np.isfinite(got[r]["y"][:, 1]).any()
            assert not np.isfinite(got[r]["dx"][:, 1]).any()
            for key in ("y", "dx"):
                np.testing.assert_allclose(
                    got[r][key][:, [0, 2]], want[r][key][:, [0, 2]], rtol=1e-12, atol=1e-12
                )
            np.testing.assert_allclose(
                got[r]["dweight"][[0, 2]], want[r]["dweight"][[0, 2]], rtol=1e-12
            )

    @pytest.mark.parametrize(
        "how", ["eval-eps-0", "inf-float32", "nan-masked-out", "nan-valid-masked", "empty-rank-nan"]
    )
    def test_documented_non_finite_results_raise_no_warning(self, how):
        # filterwarnings = error: any RuntimeWarning from the library fails here
        x = np.random.default_rng(11).normal(size=(6, 2, 3))
        kwargs, mask = {}, None
        if how == "eval-eps-0":
            kwargs = dict(
                training=False, eps=0.0, running_mean=np.zeros(2), running_var=np.array([0.0, 1.0])
            )
        elif how == "inf-float32":
            x = x.astype(np.float32)
            x[0, 0, 0], x[1, 0, 1] = np.inf, -np.inf
        else:
            mask = np.ones((6, 3), bool)
            mask[2] = False
            x[2, :, 0] = np.nan  # masked out: ignored by the statistics
            if how == "nan-valid-masked":
                x[3, 1, 1] = np.nan
        shards = [
            (x[:4], None if mask is None else mask[:4]),
            (x[4:], None if mask is None else mask[4:]),
        ]
        if how == "empty-rank-nan":
            x[0, 0, 0] = np.nan
            shards = [(x, mask), (x[:0], mask[:0])]

        def body(comm, shard):
            res = forward(
                shard[0],
                np.ones(2),
                np.zeros(2),
                data_format="NCL",
                mask=shard[1],
                comm=comm,
                **kwargs,
            )
            return res, backward(np.ones_like(shard[0]), res.saved)

        out = SimulatedWorld(2).run(body, shards)
        assert out[0][0].y.shape == shards[0][0].shape


class TestWideAccumulator:
    def test_float16_whose_sum_of_squares_overflows_float16(self):
        rng = np.random.default_rng(5)
        x = (300.0 + 10.0 * rng.standard_normal((24, 2, 3))).astype(np.float16)
        # Premise: accumulated in float16 the squares overflow.
        with np.errstate(over="ignore"):
            assert np.isinf(np.sum(x * x, dtype=np.float16))
        case = Case(
            x=x,
            dy=rng.normal(size=x.shape).astype(np.float16),
            weight=np.ones(2, np.float16),
            bias=np.zeros(2, np.float16),
            running_mean=np.zeros(2, np.float16),
            running_var=np.ones(2, np.float16),
            splits=(10, 0, 14),
            data_format="NCL",
        )
        got = run_case(case)
        assert all(np.isfinite(g["y"]).all() for g in got)
        assert_matches_oracle(case, got, expected_outputs(case))

    def test_cancellation_float32_mean_1000_std_2(self):
        # Within 1e-5 of the float64 answer; E[x^2] - E[x]^2 in float32 errs by ~1e-2
        # here (the Keras and Flax defaults: 2.5e-2 and 5.8e-2).
        rng = np.random.default_rng(6)
        x = (1000.0 + 2.0 * rng.standard_normal((64, 4, 16))).astype(np.float32)
        x64 = x.astype(np.float64)
        mean, var = x64.mean(axis=(0, 2)), x64.var(axis=(0, 2))
        exact = (x64 - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
        naive_var = (x * x).mean(axis=(0, 2)) - x.mean(axis=(0, 2)) ** 2
        naive = (x - x.mean(axis=(0, 2))[:, None]) / np.sqrt(naive_var[:, None] + 1e-5)
        assert np.abs(naive - exact).max() > 1e-3  # premise: the regime is hard

        def body(comm, shard):
            return forward(shard, data_format="NCL", comm=comm).y

        for ys in (
            [forward(x, data_format="NCL").y],
            SimulatedWorld(3).run(body, [x[:5], x[5:5], x[5:]]),
        ):
            y = np.concatenate(ys)
            assert y.dtype == np.float32
            assert np.abs(y - exact).max() <= 1e-5


def _forward_nc(x, **kwargs):
    return forward(x, **{"data_format": "NC", **kwargs})


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"weight": np.ones(3)}, r"weight has shape \(3,\); expected \(2,\)"),
            ({"bias": np.ones((2, 1))}, r"bias has shape \(2, 1\); expected \(2,\)"),
            ({"running_mean": np.ones(3), "running_var": np.ones(2)}, "running_mean has shape"),
            ({"running_mean": np.ones(2)}, "running_mean and running_var must be given together"),
            ({"data_format": "NCHW"}, r"x has shape \(4, 2\) \(2-D\); expected a 4-D array"),
            ({"data_format": "NWHC"}, "data_format is 'NWHC'; expected one of NC, NCL"),
            ({"convention": "caffe"}, "convention is 'caffe'; expected a Convention or one of"),
            ({"variance": "welford"}, "variance is 'welford'; expected one of"),
            ({"eps": -1.0}, r"eps is -1.0; expected a float >= 0"),
            ({"momentum": 1.5}, r"momentum is 1.5; expected a float in \[0, 1\]"),
            ({"eps": True}, r"eps is True; expected a float >= 0"),
            (
                {"mask": np.ones((4, 2), bool)},
                r"mask has shape \(4, 2\).*expected a bool array "
                r"of shape \(4,\)",
            ),
            ({"mask": np.ones(4)}, "mask has shape .* dtype float64; expected a bool array"),
            ({"training": False}, "training is False but running_mean/running_var are None"),
        ],
    )
    def test_bad_forward_argument_is_named(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            _forward_nc(np.ones((4, 2)), **kwargs)

    def test_numpy_scalars_are_accepted_for_eps_and_momentum(self):
        x = np.arange(8.0).reshape(4, 2)
        want = _forward_nc(
            x, eps=1e-3, momentum=0.5, running_mean=np.zeros(2), running_var=np.ones(2)
        )
        got = _forward_nc(
            x,
            eps=np.float32(1e-3),
            momentum=np.float64(0.5),
            running_mean=np.zeros(2),
            running_var=np.ones(2),
        )
        np.testing.assert_allclose(got.y, want.y, rtol=1e-7)
        np.testing.assert_array_equal(got.running_var, want.running_var)

    def test_integer_input_is_a_type_error(self):
        with pytest.raises(TypeError, match="x has dtype int64; expected a real floating"):
            _forward_nc(np.ones((4, 2), dtype=np.int64))

    @pytest.mark.parametrize(
        ("dy", "kwargs", "match"),
        [
            (np.ones((4, 3)), {}, r"dy has shape \(4, 3\); expected \(4, 2\), the shape of x"),
            (np.ones((4, 2)), {"param_grads": "all"}, "param_grads is 'all'; expected one of"),
            (np.ones((4, 2), dtype=np.int32), {}, "dy has dtype int32"),
        ],
    )
    def test_bad_backward_argument_is_named(self, dy, kwargs, match):
        res = _forward_nc(np.arange(8.0).reshape(4, 2))
        with pytest.raises((ValueError, TypeError), match=match):
            backward(dy, res.saved, **kwargs)


class TestErrorAgreement:
    def test_a_bad_input_on_one_rank_raises_on_every_rank(self):
        good, bad = np.ones(2), np.ones(5)
        x = np.arange(8.0).reshape(4, 2)

        def body(comm, weight):
            return forward(x, weight, data_format="NC", comm=comm)

        with pytest.raises(RankError) as info:
            SimulatedWorld(3).run(body, [good, bad, good])
        errors = info.value.errors
        assert sorted(errors) == [0, 1, 2]
        assert "weight has shape (5,)" in str(errors[1])
        for r in (0, 2):
            assert isinstance(errors[r], ValueError)
            assert "rank(s) [1] of the group rejected their own inputs" in str(errors[r])

    def test_a_bad_dy_on_one_rank_raises_on_every_rank(self):
        x = np.arange(8.0).reshape(4, 2)

        def body(comm, dy_shape):
            res = forward(x, data_format="NC", comm=comm)
            return backward(np.ones(dy_shape), res.saved)

        with pytest.raises(RankError) as info:
            SimulatedWorld(2).run(body, [(4, 2), (4, 3)])
        assert sorted(info.value.errors) == [0, 1]
        assert "dy has shape (4, 3)" in str(info.value.errors[1])

    def test_a_channel_count_mismatch_names_the_rank(self):
        def body(comm, c):
            return forward(np.ones((2, c)), data_format="NC", comm=comm)

        with pytest.raises(RankError) as info:
            SimulatedWorld(3).run(body, [32, 32, 64])
        for e in info.value.errors.values():
            assert isinstance(e, ValueError)
            assert "rank 2 passed 64 channels, rank 0 passed 32" in str(e)

    def test_a_dtype_mismatch_names_the_rank(self):
        def body(comm, dtype):
            return forward(np.ones((2, 3), dtype=dtype), data_format="NC", comm=comm)

        with pytest.raises(RankError) as info:
            SimulatedWorld(2).run(body, [np.float64, np.float32])
        for e in info.value.errors.values():
            assert "rank 1 passed dtype float32, rank 0 passed dtype float64" in str(e)

    @pytest.mark.timeout(60)
    def test_affine_on_some_ranks_only_raises_on_every_rank_instead_of_hanging(self):
        # Eval with reduced parameter gradients: only affine ranks have something to
        # reduce; the eval forward's agreement already catches the difference.
        x = np.arange(8.0).reshape(4, 2)

        def body(comm, affine):
            ones = np.ones(2) if affine else None
            res = forward(
                x,
                ones,
                ones,
                running_mean=np.zeros(2),
                running_var=np.ones(2),
                training=False,
                data_format="NC",
                comm=comm,
            )
            return backward(np.ones_like(x), res.saved, param_grads="sum")

        with pytest.raises(RankError) as info:
            SimulatedWorld(2).run(body, [True, False])
        for e in info.value.errors.values():
            assert "forward: rank 1 passed weight None, rank 0 passed weight given" in str(e)
