"""The algorithm zoo calibrates the error model (docs/conformance.md).

Every LEGITIMATE SyncBN algorithm (float32 accumulation, naive/pairwise/
Welford sums, per-rank statistics merged by count or equally in float32 or
float64, PyTorch's and the Flax/Keras formulas) passes on hard cases; every
WRONG one (convention bugs, no synchronization, a wrong eps, float16
accumulation, ``E[x^2] - E[x]^2`` held to the stable bound) fails by at least
10x; and the worst legitimate error is within 10x of each bound and of each
term of the model, so a 10x-looser constant fails a test.

The truth is the float64 global-batch oracle (``expected_outputs``); the
term-level tests compare with exact rational statistics (``fractions``).
"""

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
from _candidates import zoo_candidate

from refsyncbn.cases import Case
from refsyncbn.conventions import CONVENTIONS, REFERENCE, TORCH
from refsyncbn.testing import expected_outputs
from refsyncbn.testing.checker import reference_candidate, run_candidate
from refsyncbn.testing.tolerances import ErrorModel, compare_outputs

F32, F16 = np.float32, np.float16
STABLE, NAIVE, RECURSIVE = (
    ErrorModel(),
    ErrorModel(variance="naive"),
    ErrorModel(summation="recursive"),
)


def _case(
    mean, std, splits, *, apart=0.0, dtype=F32, channels=2, eps=1e-5, seed=0, convention="reference"
):
    """NC data: rank r's values ~ mean + std * (N(0, 1) + (-1)^(r+1) apart)."""
    rng = np.random.default_rng(seed)
    shift = np.concatenate([np.full(n, apart * (1 if r % 2 else -1)) for r, n in enumerate(splits)])
    x = mean + std * (rng.standard_normal((sum(splits), channels)) + shift[:, None])
    conv = CONVENTIONS[convention]
    return Case(
        x=x.astype(dtype),
        splits=tuple(splits),
        data_format="NC",
        convention=convention,
        running_mean=rng.uniform(-1, 1, channels).astype(dtype),
        running_var=rng.uniform(0.5, 2, channels).astype(dtype),
        weight=rng.uniform(0.5, 2, channels).astype(dtype),
        bias=rng.uniform(-1, 1, channels).astype(dtype),
        dy=rng.standard_normal(x.shape).astype(dtype),
        eps=eps,
        momentum=conv.momentum,
    )


def _tie_case(*, same_way, centre=8200.0, apart=3.0, spread=0.125):
    """Two ranks of two float32 values whose exact means lie half an ulp off the float32 grid.

    Every algorithm that stores a float32 rank mean rounds it by half an ulp
    (ties to even): both upwards (``same_way``: the worst case of the mean
    term) or rank 0 down and rank 1 up (the worst case of the merge term
    ``2 std d_mean``, rank 0's mean being the lower one).
    """
    q = 2.0**-10  # ulp of float32 in [8192, 16384)
    lo, hi = centre - apart + same_way * q, centre + apart + q  # odd multiples round up
    x = np.array([[lo - spread], [lo + spread + q], [hi - spread], [hi + spread + q]], F32)
    return Case(
        x=x,
        splits=(2, 2),
        data_format="NC",
        running_mean=np.zeros(1, F32),
        running_var=np.zeros(1, F32),
        weight=np.ones(1, F32),
        bias=np.zeros(1, F32),
        dy=np.array([[0.5], [-1.0], [0.25], [1.0]], F32),
        momentum=0.0,
    )


HARD = {
    "offset_1e3_rank_means_apart": _case(1e3, 1.0, (100, 156), apart=3),
    "offset_1e4_three_ranks_apart": _case(1e4, 1.0, (40, 50, 38), apart=3),
    "offset_1e4_same_rank_means": _case(1e4, 1.0, (64, 64)),
    "tiny_variance": _case(1.0, 1e-4, (30, 40), channels=1),
    "huge_count": _case(5.0, 1.0, (8192, 8192), channels=1),
    "float16": _case(3.0, 1.0, (60, 70), dtype=F16),
    "float16_large": _case(300.0, 30.0, (60, 70), dtype=F16),
    "empty_rank": _case(2.0, 1.0, (0, 50, 30)),
    "batch_one_ranks": _case(-4.0, 2.0, (1, 1, 6), apart=1),
    "half_ulp_rank_means": _tie_case(same_way=False),
    "half_ulp_rank_means_same_way": _tie_case(same_way=True),
}

# name: (zoo_candidate keywords, convention, model of its arithmetic)
LEGIT = {
    "two_pass_global": ({"stats": "two_pass", "merge": "global"}, "reference", STABLE),
    "two_pass_global_recursive": (
        {"stats": "two_pass", "merge": "global", "summation": "recursive"},
        "reference",
        RECURSIVE,
    ),
    "two_pass_per_rank_count_merge": ({"stats": "two_pass", "merge": "count"}, "reference", STABLE),
    "two_pass_per_rank_float64_merge": (
        {"stats": "two_pass", "merge": "count", "merge_dtype": "float64"},
        "reference",
        STABLE,
    ),
    "welford_count_merge": ({"stats": "welford", "merge": "count"}, "reference", STABLE),
    "torch_per_rank_stats_count_merge": (
        {"stats": "two_pass", "merge": "count", "stats_dtype": "float64", "convention": "torch"},
        "torch",
        STABLE,
    ),
    "welford_equal_merge": ({"stats": "welford", "merge": "equal", "empty": "nan"}, "flax", STABLE),
    "two_pass_equal_float64_merge": (
        {"stats": "two_pass", "merge": "equal", "empty": "nan", "merge_dtype": "float64"},
        "flax",
        STABLE,
    ),
    "keras_sums_and_squares": ({"stats": "naive", "merge": "count"}, "keras", NAIVE),
    "flax_pmean_of_moments": ({"stats": "naive", "merge": "equal", "empty": "nan"}, "flax", NAIVE),
}


def _as(case, convention):
    """``case`` expecting ``convention`` with its default momentum.

    A case of momentum 0 keeps batch weight 1: its running statistics are
    the batch statistics (momentum 1 in PyTorch's meaning).
    """
    conv = CONVENTIONS[convention]
    momentum = conv.momentum if case.momentum else 1.0 - conv.batch_weight(0.0)
    return dataclasses.replace(case, convention=convention, momentum=momentum)


def _ratios(candidate, case, model):
    """Worst error/bound ratio per output over the ranks."""
    expected = expected_outputs(case)
    checks = compare_outputs(
        run_candidate(candidate, case),
        expected,
        model.bounds(case, expected),
        data_format=case.data_format,
    )
    worst: dict = {}
    for c in checks:
        worst[c.quantity] = max(worst.get(c.quantity, 0.0), c.ratio)
    return worst


_RESULTS: dict = {}


def _legit(name, case_name):
    """Cached ratios of a legitimate algorithm on a hard case."""
    if (name, case_name) not in _RESULTS:
        kwargs, conv, model = LEGIT[name]
        _RESULTS[name, case_name] = _ratios(
            zoo_candidate(**kwargs), _as(HARD[case_name], conv), model
        )
    return _RESULTS[name, case_name]


class TestLegitimateAlgorithmsPass:
    @pytest.mark.parametrize("case_name", list(HARD))
    @pytest.mark.parametrize("name", list(LEGIT))
    def test_inside_the_bound_of_their_arithmetic(self, name, case_name):
        ratios = _legit(name, case_name)
        assert max(ratios.values()) <= 1.0, ratios

    def test_the_old_two_pass_bound_rejected_pytorch(self):
        # per-rank float32 statistics merged by count: linear in |mean|/std
        kwargs, conv, _ = LEGIT["torch_per_rank_stats_count_merge"]
        case = _as(HARD["half_ulp_rank_means"], conv)
        ratios = _ratios(zoo_candidate(**kwargs), case, ErrorModel(variance="two_pass"))
        assert ratios["running_var"] > 10


WRONG = {
    # name: (candidate, expected convention, model)
    "unsynchronized": (zoo_candidate(sync=False), "reference", STABLE),
    "wrong_eps": (zoo_candidate(eps=1e-3), "reference", STABLE),
    "float16_accumulation": (zoo_candidate(acc="float16"), "reference", STABLE),
    "naive_variance_held_to_the_stable_bound": (zoo_candidate(stats="naive"), "keras", STABLE),
    "equal_weighting_where_count_expected": (zoo_candidate(merge="equal"), "reference", STABLE),
    "count_weighting_where_equal_expected": (zoo_candidate(merge="count"), "flax", STABLE),
    "biased_running_var_for_torch": (
        reference_candidate(dataclasses.replace(TORCH, running_var="biased")),
        "torch",
        STABLE,
    ),
    "local_correction_for_torch": (
        reference_candidate(dataclasses.replace(TORCH, running_var="unbiased_local")),
        "torch",
        STABLE,
    ),
    "update_meaning_for_retain": (
        reference_candidate(dataclasses.replace(REFERENCE, momentum_meaning="update")),
        "reference",
        STABLE,
    ),
    "summed_param_grads_for_local": (
        reference_candidate(dataclasses.replace(REFERENCE, param_grads="sum")),
        "reference",
        STABLE,
    ),
}


class TestWrongAlgorithmsFail:
    @pytest.mark.parametrize("name", list(WRONG))
    def test_by_at_least_10x_on_some_hard_case(self, name):
        candidate, conv, model = WRONG[name]
        worst = {}
        for case_name, case in HARD.items():
            if conv == "torch" and min(n for n in case.splits if n) < 2 <= case.world_size:
                continue
            with np.errstate(all="ignore"):
                worst[case_name] = max(_ratios(candidate, _as(case, conv), model).values())
        assert max(worst.values()) >= 10, worst


class TestBoundsAreTight:
    """The worst legitimate error reaches a tenth of every output's bound."""

    @pytest.mark.parametrize(
        "quantity", ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
    )
    def test_worst_legitimate_error_is_within_10x_of_the_bound(self, quantity):
        worst = max(
            _legit(name, case_name).get(quantity, 0.0) for name in LEGIT for case_name in HARD
        )
        assert worst >= 0.1


def _exact_statistics(x):
    """Exact mean and biased variance of float values (rational arithmetic)."""
    vals = [Fraction(float(v)) for v in x]
    mean = sum(vals) / len(vals)
    return mean, sum((v - mean) ** 2 for v in vals) / len(vals)


def _term_ratios(name, case, model):
    """Errors of an algorithm's batch (mean, var) over ``model.statistics_error``.

    The case's running statistics become the batch statistics (batch weight
    1); the truth is exact rational arithmetic.
    """
    kwargs, conv, _ = LEGIT[name]
    case = _as(dataclasses.replace(case, momentum=0.0), conv)
    out = run_candidate(zoo_candidate(**kwargs), case)[0]
    x = case.x[:, 0]
    mean, var = _exact_statistics(x)
    xd = x.astype(np.float64)
    d_mean, d_var = model.statistics_error(
        np.abs(xd).mean(), (xd * xd).mean(), float(mean), float(var), len(x), u=model.unit(x.dtype)
    )
    err_mean = abs(Fraction(float(out["running_mean"][0])) - mean)
    correction = Fraction(len(x), len(x) - 1) if conv == "torch" else 1
    err_var = abs(Fraction(float(out["running_var"][0])) - var * correction) / correction
    return float(err_mean) / d_mean, float(err_var) / d_var


class TestModelTermsAreTight:
    """Each term of ``statistics_error`` is reached within 10x by a legitimate algorithm."""

    def test_mean_term(self):
        ratios = [
            _term_ratios(name, HARD["half_ulp_rank_means_same_way"], STABLE)[0] for name in LEGIT
        ]
        assert 0.1 <= max(ratios) <= 1

    def test_stable_variance_with_its_merge_term(self):
        ratios = [
            _term_ratios(name, HARD["half_ulp_rank_means"], STABLE)[1]
            for name in LEGIT
            if LEGIT[name][2].variance == "stable"
        ]
        assert 0.1 <= max(ratios) <= 1

    def test_two_pass_variance(self):
        # squares of 1 + 2049 * 2**-23 round by almost u: the worst case of sum (x - mean)^2
        a = 1 + 2049 * 2.0**-23
        case = dataclasses.replace(
            HARD["half_ulp_rank_means"], x=np.array([[-a], [a], [-a], [a]], F32)
        )
        ratios = [
            _term_ratios(name, case, ErrorModel(variance="two_pass"))[1]
            for name in ("two_pass_global", "two_pass_per_rank_count_merge")
        ]
        assert 0.1 <= max(ratios) <= 1

    def test_naive_variance(self):
        ratios = [
            _term_ratios(name, _case(3e3, 1.0, (16, 16), channels=1, seed=s), NAIVE)[1]
            for name in ("keras_sums_and_squares", "flax_pmean_of_moments")
            for s in range(5)
        ]
        assert 0.1 <= max(ratios) <= 1


def _sums_case(dy):
    """1024 float32 values N(0, 1) on ranks of 500 and 524, with ``dy = dy(x)``."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1024, 1)).astype(F32)
    return dataclasses.replace(
        _case(0.0, 1.0, (500, 524), channels=1), x=x, dy=dy(x.astype(np.float64)).astype(F32)
    )


def _centred(x):
    return x - x.mean()


def _near_one(x):
    return 1 + 0.1 * x


# planted error location: (dy as a function of x, the output it shows in, k)
_SUMS = {
    "A": (_near_one, "dx", 8),
    "B": (_centred, "dx", 25),
    "dweight": (_centred, "dweight", 20),
    "dbias": (_near_one, "dbias", 5),
}


class TestGradientTermsAreTight:
    """A planted error a few times a sum's error term fails; one of ``u`` passes.

    ``dy ~ x_hat`` makes ``B = sum dy x_hat`` and ``dweight`` free of
    cancellation, ``dy ~ 1`` makes ``A = sum dy`` and ``dbias`` so: their
    error terms (``gamma u sum |.|``) then dominate the bound, and the planted
    error (``k gamma u``, ``k`` chosen so that it fails by 2-3x) would pass a
    bound whose term is 10x looser.
    """

    def _ratio(self, where, error):
        dy, output, _ = _SUMS[where]
        return _ratios(
            zoo_candidate(merge="global", planted={where: error}), _sums_case(dy), STABLE
        )[output]

    @pytest.mark.parametrize("where", ["A", "B", "dweight", "dbias"])
    def test_an_error_of_a_few_gamma_u_fails(self, where):
        n = 1024 if where in ("A", "B") else 500  # group sums; rank 0's local sums
        k = _SUMS[where][2]
        assert self._ratio(where, k * STABLE.growth(n) * STABLE.unit(F32)) > 1

    @pytest.mark.parametrize("where", ["A", "B", "dweight", "dbias"])
    def test_an_error_of_u_passes(self, where):
        assert self._ratio(where, STABLE.unit(F32)) <= 1
