"""Invariants of synchronized batch norm, and the negative controls.

Each invariant compares two runs of the code under test on related problems;
both runs are within the tolerance rule of ``test_functional`` of the exact
answer, so they are compared with that rule (``assert_matches_oracle`` with
one run standing for the truth: its K = 8 already carries a factor 2 for an
inexact reference).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from _simrun import run_case
from hypothesis import given, settings
from hypothesis import strategies as st
from test_functional import U64, K, _rows, _scales, assert_matches_oracle

from refsyncbn import LocalComm, forward
from refsyncbn.cases import Case
from refsyncbn.conventions import CONVENTIONS
from refsyncbn.layouts import get_layout
from refsyncbn.testing.oracle import expected_outputs
from refsyncbn.testing.strategies import cases

COUNT_WEIGHTED = [n for n, c in CONVENTIONS.items() if c.weighting == "count"]
EQUAL_WEIGHTED = [n for n, c in CONVENTIONS.items() if c.weighting == "equal"]
F64 = ["float64"]


def _concat(outs, key):
    return np.concatenate([o[key] for o in outs])


class TestPermutationInvariance:
    @settings(max_examples=25)
    @given(
        case=cases(dtypes=F64, conventions=COUNT_WEIGHTED, groups=False, dy=True), data=st.data()
    )
    def test_shuffling_the_global_batch_permutes_y_and_dx(self, case, data):
        # Count weighting: the statistics are those of the global batch, so moving a
        # sample to another rank changes nothing but where its outputs appear.
        perm = np.array(data.draw(st.permutations(range(case.x.shape[0]))), dtype=np.intp)
        self._check(case, perm)

    @settings(max_examples=25)
    @given(case=cases(dtypes=F64, dy=True), data=st.data())
    def test_shuffling_within_each_rank_permutes_y_and_dx(self, case, data):
        # Any convention (equal weighting and groups included): a rank's statistics
        # do not depend on the order of its own samples.
        starts = np.cumsum([0, *case.splits])
        perm = np.concatenate(
            [
                lo + np.array(data.draw(st.permutations(range(hi - lo))), dtype=np.intp)
                for lo, hi in itertools.pairwise(starts)
            ]
        )
        self._check(case, perm)

    @staticmethod
    def _check(case, perm):
        shuffled = dataclasses.replace(
            case,
            x=case.x[perm],
            dy=case.dy[perm],
            mask=None if case.mask is None else case.mask[perm],
        )
        inverse = np.argsort(perm)
        got = run_case(shuffled, param_grads="sum")
        want = run_case(case, param_grads="sum")
        # Undo the permutation on y and dx, and compare on the original case's split.
        y, dx = _concat(got, "y")[inverse], _concat(got, "dx")[inverse]
        restored = []
        for r, o in enumerate(got):
            lo, hi = case.bounds(r)
            restored.append({**o, "y": y[lo:hi], "dx": dx[lo:hi]})
        assert_matches_oracle(case, restored, want)


class TestSplitInvariance:
    @settings(max_examples=25)
    @given(
        case=cases(dtypes=F64, conventions=COUNT_WEIGHTED, groups=False, dy=True), data=st.data()
    )
    def test_any_split_of_the_batch_gives_the_same_result(self, case, data):
        n = case.x.shape[0]
        world = data.draw(st.integers(1, 4))
        cuts = sorted(
            data.draw(st.lists(st.integers(0, n), min_size=world - 1, max_size=world - 1))
        )
        splits = tuple(int(b - a) for a, b in zip([0, *cuts], [*cuts, n], strict=True))
        other = dataclasses.replace(case, splits=splits)
        got, want = run_case(other, param_grads="sum"), run_case(case, param_grads="sum")
        # Compare rank by rank on the original split: same global y/dx, same statistics.
        y, dx = _concat(got, "y"), _concat(got, "dx")
        restored = []
        for r in range(case.world_size):
            lo, hi = case.bounds(r)
            restored.append({**got[0], "y": y[lo:hi], "dx": dx[lo:hi]})
        assert_matches_oracle(case, restored, want)


class TestGradientSums:
    @settings(max_examples=30)
    @given(case=cases(dtypes=F64, dy=True, training=True))
    def test_dx_sums_to_zero_over_each_group_and_channel(self, case):
        # y is unchanged when a constant is added to a channel of the whole group
        # (mean shifts with it, var does not), so the derivative of any loss along
        # that direction, sum of dx over the group's positions, is 0. Bound: the
        # rule's per-element error summed, plus the summation error M u sum |dx|.
        layout = get_layout(case.data_format)
        got = run_case(case)
        want = expected_outputs(case)
        for group in case.groups or [list(range(case.world_size))]:
            dx = np.concatenate([_rows(got[r]["dx"], layout.channel_axis) for r in group])
            scales = _scales(case, want, group)
            bound = sum((2 * K * scales[r][0] * scales[r][1]["dx"]).sum(axis=0) for r in group)
            bound = bound + dx.shape[0] * U64 * np.abs(dx).sum(axis=0)
            total = dx.sum(axis=0)
            assert np.all(np.abs(total) <= bound), (group, total, bound)


class TestAffineEquivariance:
    @settings(max_examples=25)
    @given(
        case=cases(dtypes=F64, dy=True),
        a=st.sampled_from([0.25, 3.0, 1e3]),
        b=st.sampled_from([-7.0, 0.0, 50.0]),
    )
    def test_x_to_a_x_plus_b_leaves_y_unchanged(self, case, a, b):
        # With a > 0 and eps scaled by a**2 (and the running statistics mapped the same
        # way), every normalized quantity is unchanged: y, dweight, dbias; dx scales by
        # 1/a; mean and var and the running statistics map as a*m + b and a**2 v.
        moved = dataclasses.replace(
            case,
            x=a * case.x + b,
            eps=case.eps * a * a,
            running_mean=a * case.running_mean + b,
            running_var=a * a * case.running_var,
        )
        base = run_case(case)
        mapped = [
            {
                **o,
                "dx": o["dx"] / a,
                "mean": a * o["mean"] + b,
                "var": a * a * o["var"],
                "running_mean": a * o["running_mean"] + b,
                "running_var": a * a * o["running_var"],
            }
            for o in base
        ]
        assert_matches_oracle(moved, run_case(moved), mapped)


def _uneven_case(convention, splits=(3, 5)):
    """Two ranks whose shards come from different distributions (mean 0 vs 5)."""
    rng = np.random.default_rng(11)
    parts = [rng.normal(5.0 * r, 1.0 + r, size=(n, 2, 3)) for r, n in enumerate(splits)]
    x = np.concatenate(parts)
    return Case(
        x=x,
        dy=rng.normal(size=x.shape),
        weight=np.array([1.0, 2.0]),
        bias=np.array([0.0, -1.0]),
        running_mean=np.zeros(2),
        running_var=np.ones(2),
        splits=splits,
        data_format="NCL",
        convention=convention,
        eps=CONVENTIONS[convention].eps,
        momentum=CONVENTIONS[convention].momentum,
    )


class TestNegativeControls:
    """The comparisons above can fail: plausible wrong answers are caught."""

    @pytest.mark.parametrize("convention", list(CONVENTIONS))
    def test_per_rank_plain_batch_norm_differs_from_the_synchronized_result(self, convention):
        case = _uneven_case(convention)
        synced = run_case(case)
        want = expected_outputs(case)
        assert_matches_oracle(case, synced, want)
        plain = []
        for r in range(case.world_size):
            res = forward(
                case.shard(r)["x"],
                case.weight,
                case.bias,
                running_mean=case.running_mean,
                running_var=case.running_var,
                data_format="NCL",
                convention=convention,
                comm=LocalComm(),
            )
            plain.append({**synced[r], "y": res.y})
        gap = max(float(np.abs(p["y"] - s["y"]).max()) for p, s in zip(plain, synced, strict=True))
        assert gap > 0.5, f"plain per-rank BN is only {gap:.3g} away from SyncBN"
        with pytest.raises(AssertionError, match="y off by"):
            assert_matches_oracle(case, plain, want)

    @pytest.mark.parametrize("equal", EQUAL_WEIGHTED)
    def test_equal_weighting_differs_from_count_weighting_on_uneven_splits(self, equal):
        count = run_case(_uneven_case("reference"))
        other = run_case(_uneven_case(equal))
        # By hand for channel 0: count weighting gives (3 m0 + 5 m1) / 8, equal
        # weighting (m0 + m1) / 2, with m_r the local means.
        x = _uneven_case("reference").x
        m0, m1 = x[:3, 0].mean(), x[3:, 0].mean()
        np.testing.assert_allclose(count[0]["mean"][0], (3 * m0 + 5 * m1) / 8, rtol=1e-13)
        np.testing.assert_allclose(other[0]["mean"][0], (m0 + m1) / 2, rtol=1e-13)
        assert abs(count[0]["mean"][0] - other[0]["mean"][0]) > 0.5

    @pytest.mark.parametrize("equal", EQUAL_WEIGHTED)
    def test_equal_weighting_equals_count_weighting_on_even_splits(self, equal):
        count = run_case(_uneven_case("reference", splits=(4, 4)))
        other = run_case(dataclasses.replace(_uneven_case(equal, splits=(4, 4)), eps=1e-5))
        for c, o in zip(count, other, strict=True):
            np.testing.assert_allclose(o["mean"], c["mean"], rtol=1e-13)
            np.testing.assert_allclose(o["var"], c["var"], rtol=1e-12)
            np.testing.assert_allclose(o["dx"], c["dx"], rtol=1e-9, atol=1e-12)
