"""The error model holds for correct arithmetic and is broken by weak arithmetic."""

import numpy as np
import pytest
from _candidates import lowprec_candidate
from hypothesis import given, settings

from refsyncbn import SimulatedWorld
from refsyncbn.cases import Case, run_rank
from refsyncbn.testing import expected_outputs, strategies
from refsyncbn.testing.checker import run_candidate
from refsyncbn.testing.tolerances import (
    ErrorModel,
    assert_output_close,
    assert_sync_batch_norm_close,
    compare_outputs,
    unit_roundoff,
)


def _reference(case):
    return SimulatedWorld(case.world_size).run(lambda comm: run_rank(case, comm))


def _worst(checks, quantity=None):
    return max(c.ratio for c in checks if quantity in (None, c.quantity))


def _mean_std_case(mean, std, n=256, splits=(100, 156), channels=2, seed=0):
    """NC float32 data with the given per-channel mean and std (reference convention)."""
    rng = np.random.default_rng(seed)
    x = (mean + std * rng.standard_normal((n, channels))).astype(np.float32)
    f32 = np.float32
    return Case(
        x=x,
        running_mean=np.zeros(channels, f32),
        running_var=np.ones(channels, f32),
        splits=splits,
        data_format="NC",
        weight=np.full(channels, 1.5, f32),
        bias=np.full(channels, 0.25, f32),
        dy=rng.standard_normal(x.shape).astype(f32),
    )


class TestErrorModelArguments:
    def test_rejects_unknown_accumulation_naming_it(self):
        with pytest.raises(ValueError, match="'int8'"):
            ErrorModel(accumulation="int8")

    @pytest.mark.parametrize("field", ["variance", "summation"])
    def test_rejects_unknown_algorithm_naming_the_field(self, field):
        with pytest.raises(ValueError, match=f"ErrorModel.{field}"):
            ErrorModel(**{field: "magic"})

    def test_rejects_safety_below_one(self):
        with pytest.raises(ValueError, match="safety"):
            ErrorModel(safety=0.5)

    def test_unit_roundoff_is_half_the_machine_epsilon(self):
        for dtype in (np.float16, np.float32, np.float64):
            assert unit_roundoff(dtype) == np.finfo(dtype).eps / 2


class TestReferenceInsideItsBound:
    """The reference vs the oracle (``run_rank`` returns local parameter gradients)."""

    @settings(max_examples=40)
    @given(strategies.cases() | strategies.hard_cases())
    def test_uses_under_half_the_float32_bound(self, case):
        checks = assert_sync_batch_norm_close(
            _reference(case), case, param_grads="local", model=ErrorModel("float32")
        )
        assert _worst(checks) <= 0.5

    @settings(max_examples=40)
    @given(strategies.cases(dtypes=("float64",)) | strategies.hard_cases(dtypes=("float64",)))
    def test_float64_is_inside_the_default_float64_bound(self, case):
        # the default model holds float64 data to float64 arithmetic
        assert_sync_batch_norm_close(_reference(case), case, param_grads="local")

    def test_a_constant_channel_gets_no_nan_bound(self):
        # var = 0 with |mean| = 1e4: the variance error dwarfs eps, so the model
        # promises nothing for x_hat = 0 * inf; that must read as inf, not NaN
        # (found by hypothesis through the README example).
        f16 = np.float16
        case = Case(
            x=np.full((2, 1), -1e4, f16),
            running_mean=np.full(1, -1e4, f16),
            running_var=np.full(1, 0.525, f16),
            splits=(2,),
            data_format="NC",
            convention="torch",
            momentum=0.1,
            dy=np.array([[-0.5356], [0.3616]], f16),
        )
        bounds = ErrorModel("float32").bounds(case)
        assert not any(np.isnan(v).any() for res in bounds for v in res.values() if v is not None)
        assert_sync_batch_norm_close(_reference(case), case, param_grads="local")


class TestResolution:
    """The bounds are finite exactly while the declared algorithm resolves the variance."""

    def test_finite_below_half_a_relative_variance_error_infinite_above(self):
        model = ErrorModel(variance="naive")
        seen = set()
        for mean in (100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0):
            case = _mean_std_case(mean, 1.0)
            x = case.x.astype(np.float64)
            u = model.unit(np.float32)
            _, d_var = model.statistics_error(
                np.abs(x).mean(0), (x * x).mean(0), x.mean(0), x.var(0), len(x), u=u
            )
            rho = d_var / (x.var(0) + case.eps) + 2 * u
            finite = np.isfinite(model.bounds(case)[0]["y"]).all(0)
            assert np.array_equal(finite, rho < 0.5)
            seen |= {
                "resolved, rho > 0.05" if 0.05 < r < 0.5 else "unresolved" if r >= 0.5 else "small"
                for r in rho
            }
        assert seen >= {"resolved, rho > 0.05", "unresolved"}


class TestLowPrecisionArithmetic:
    """Emulated float32 implementations against the model of their own arithmetic."""

    @pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1000.0, 2.0), (1e4, 1.0)])
    def test_float32_two_pass_is_inside_the_float32_two_pass_bound(self, mean, std):
        case = _mean_std_case(mean, std)
        actual = run_candidate(lowprec_candidate("float32", "two_pass"), case)
        assert_sync_batch_norm_close(actual, case, model=ErrorModel("float32", "two_pass"))

    def test_float32_sumsq_is_inside_the_float32_naive_bound(self):
        case = _mean_std_case(1000.0, 2.0)
        actual = run_candidate(lowprec_candidate("float32", "sumsq"), case)
        checks = assert_sync_batch_norm_close(actual, case, model=ErrorModel("float32", "naive"))
        # the (|mean|/std)^2 term is real: the measured error is of the bound's order
        assert _worst(checks, "running_var") > 1e-3

    def test_float32_sumsq_breaks_the_stable_bound_on_mean_1000_std_2(self):
        case = _mean_std_case(1000.0, 2.0)
        actual = run_candidate(lowprec_candidate("float32", "sumsq"), case)
        with pytest.raises(AssertionError, match=r"rank \d, running_var, channel \d") as info:
            assert_sync_batch_norm_close(actual, case)
        assert "x the bound" in str(info.value)

    def test_float32_two_pass_breaks_the_float64_bound(self):
        case = _mean_std_case(1000.0, 2.0)
        actual = run_candidate(lowprec_candidate("float32", "two_pass"), case)
        with pytest.raises(AssertionError):
            assert_sync_batch_norm_close(actual, case, model=ErrorModel("float64"))

    def test_cancellation_amplifies_the_sumsq_bound_quadratically(self):
        def bound(mean):
            case = _mean_std_case(mean, 1.0)
            return ErrorModel(variance="naive").bounds(case)[0]["running_var"][0]

        ratio = bound(1000.0) / bound(100.0)
        assert 50 < ratio < 200  # (1000/100)^2 = 100


class TestAssertionMessages:
    def setup_method(self):
        rng = np.random.default_rng(3)
        x = rng.standard_normal((6, 3, 2))
        self.case = Case(
            x=x,
            running_mean=np.zeros(3),
            running_var=np.ones(3),
            splits=(2, 4),
            data_format="NCL",
            weight=np.ones(3),
            bias=np.zeros(3),
            dy=rng.standard_normal(x.shape),
        )
        self.good = expected_outputs(self.case)

    def test_exact_outputs_pass(self):
        checks = assert_sync_batch_norm_close(self.good, self.case)
        assert len(checks) == 2 * 6 and _worst(checks) == 0

    def test_names_rank_quantity_channel_and_ratio(self):
        bad = [dict(o) for o in self.good]
        bad[1]["dx"] = bad[1]["dx"].copy()
        bad[1]["dx"][3, 2, 1] += 1e-2
        with pytest.raises(AssertionError) as info:
            assert_sync_batch_norm_close(bad, self.case)
        text = str(info.value)
        assert "1 of 12 output(s)" in text
        assert "rank 1, dx, channel 2: |error| 0.01 at index (3, 2, 1)" in text

    def test_reports_missing_output_wrong_shape_and_nan(self):
        bad = [dict(o) for o in self.good]
        del bad[0]["dbias"]
        bad[0]["dweight"] = np.zeros(4)
        bad[1]["y"] = np.full_like(bad[1]["y"], np.nan)
        with pytest.raises(AssertionError) as info:
            assert_sync_batch_norm_close(bad, self.case)
        text = str(info.value)
        assert "rank 0, dbias: missing" in text
        assert "rank 0, dweight: shape (4,), expected (3,)" in text
        assert "rank 1, y, channel 0: nan at index (0, 0, 0) where" in text

    @pytest.mark.filterwarnings(
        "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
    )
    def test_nan_expected_must_be_nan(self):
        x = np.ones((4, 1))
        case = Case(
            x=x,
            running_mean=np.zeros(1),
            running_var=np.ones(1),
            splits=(2, 2),
            data_format="NC",
            eps=0.0,
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = expected_outputs(case)
        assert np.isnan(expected[0]["y"]).all()
        assert_sync_batch_norm_close(_reference(case), case)
        finite = [dict(o, y=np.zeros_like(o["y"])) for o in expected]
        with pytest.raises(AssertionError, match="where nan is expected"):
            assert_sync_batch_norm_close(finite, case)

    def test_wrong_number_of_ranks(self):
        with pytest.raises(AssertionError, match="outputs of 1 rank"):
            assert_sync_batch_norm_close(self.good[:1], self.case)

    def test_compare_outputs_reports_every_quantity(self):
        bounds = ErrorModel().bounds(self.case, self.good)
        checks = compare_outputs(self.good, self.good, bounds, data_format="NCL")
        assert {(c.rank, c.quantity) for c in checks} == {
            (r, k)
            for r in (0, 1)
            for k in ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
        }


class TestAssertOutputClose:
    """One array of one rank against the oracle, on both sides of its bound."""

    def setup_method(self):
        self.case = _mean_std_case(3.0, 2.0)
        self.expected = expected_outputs(self.case)
        self.bounds = ErrorModel().bounds(self.case, self.expected)

    @pytest.mark.parametrize("output", ["y", "dx", "running_var"])
    def test_a_third_of_the_bound_passes_three_times_fails(self, output):
        exp, bnd = self.expected[1][output], self.bounds[1][output]
        check = assert_output_close((exp + bnd / 3).astype(np.float64), self.case, output, rank=1)
        assert 0.3 <= check.ratio <= 0.34
        with pytest.raises(AssertionError, match=rf"rank 1, {output}, channel \d: .* is 3 x"):
            assert_output_close(exp + 3 * bnd, self.case, output, rank=1)

    def test_names_a_wrong_output_or_rank(self):
        with pytest.raises(ValueError, match="output is 'z'; expected one of"):
            assert_output_close(self.expected[0]["y"], self.case, "z")
        with pytest.raises(ValueError, match=r"rank is 2; expected an int in \[0, 2\)"):
            assert_output_close(self.expected[0]["y"], self.case, rank=2)
