"""refsyncbn.testing.strategies keeps its promises (drawn cases are valid and on target)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from refsyncbn.conventions import CONVENTIONS
from refsyncbn.layouts import get_layout
from refsyncbn.testing.strategies import REGIMES, cases, hard_cases, process_groups


def _group_counts(case):
    """Values per channel in each group (valid mask positions only)."""
    layout = get_layout(case.data_format)
    inner = case.x.size // max(case.x.shape[0], 1) // layout.channels(case.x.shape)
    out = []
    for group in case.groups or [list(range(case.world_size))]:
        if case.mask is None:
            out.append(sum(case.splits[r] for r in group) * inner)
        else:
            out.append(sum(int(case.shard(r)["mask"].sum()) for r in group))
    return out


def _stats(case):
    layout = get_layout(case.data_format)
    rows = np.moveaxis(case.x.astype(np.float64), layout.channel_axis, -1)
    rows = rows.reshape(-1, rows.shape[-1])
    return rows.mean(axis=0), rows.std(axis=0)


class TestCases:
    @settings(max_examples=60)
    @given(case=cases())
    def test_every_group_holds_data_and_torch_two_values(self, case):
        counts = _group_counts(case)
        assert min(counts) >= (2 if case.convention == "torch" else 1)
        if case.groups is not None:
            assert sorted(r for g in case.groups for r in g) == list(range(case.world_size))
        assert case.eps == CONVENTIONS[case.convention].eps

    @settings(max_examples=30)
    @given(
        case=cases(
            world_sizes=[3],
            data_formats=["NHWC"],
            dtypes=["float16"],
            conventions=["flax"],
            affine=True,
            training=False,
            dy=False,
            mask=True,
            groups=False,
            empty_ranks=False,
            max_channels=2,
            max_local_batch=2,
            max_spatial=4,
        )
    )
    def test_every_dimension_can_be_pinned(self, case):
        assert case.world_size == 3 and case.data_format == "NHWC"
        assert case.x.dtype == np.float16 and case.weight.dtype == np.float16
        assert case.convention == "flax" and not case.training
        assert case.dy is None and case.mask is not None and case.groups is None
        assert min(case.splits) >= 1 and max(case.splits) <= 2
        assert case.x.shape[3] <= 2 and case.x.shape[1] * case.x.shape[2] <= 4

    @settings(max_examples=20)
    @given(case=cases(regime="one_sample"))
    def test_one_sample_means_one_value_per_group_and_no_torch_or_flax(self, case):
        assert set(_group_counts(case)) == {1}
        assert case.convention not in ("torch", "flax")  # a raise or NaN there

    @settings(max_examples=30)
    @given(case=cases(conventions=["flax"], world_sizes=[2, 3]))
    def test_flax_cases_have_a_valid_element_on_every_rank(self, case):
        for r in range(case.world_size):
            shard = case.shard(r)
            assert len(shard["x"]) > 0
            assert "mask" not in shard or shard["mask"].any()

    @settings(max_examples=20)
    @given(case=cases(regime="cancellation", dtypes=["float32"]))
    def test_cancellation_has_a_large_mean_to_std_ratio(self, case):
        mean, std = _stats(case)
        assert np.all(np.abs(mean) >= 30 * std)

    @settings(max_examples=20)
    @given(case=cases(regime="float16_overflow"))
    def test_float16_overflow_squares_overflow_float16(self, case):
        assert case.x.dtype == np.float16
        assert np.all(case.x.astype(np.float64) ** 2 > np.finfo(np.float16).max)

    @settings(max_examples=20)
    @given(case=cases(regime="tiny_variance", dtypes=["float64"]))
    def test_tiny_variance_is_at_most_eps(self, case):
        _, std = _stats(case)
        assert np.all(std**2 <= 4 * case.eps)

    @settings(max_examples=10)
    @given(case=cases(regime="huge_count"))
    def test_huge_count_has_thousands_of_values_per_channel_in_every_group(self, case):
        if case.mask is None:
            assert min(_group_counts(case)) >= 4096
        assert case.x.size <= 2 * 4 * 20000  # C <= 2; rounding up over <= 4 ranks

    @settings(max_examples=30)
    @given(case=hard_cases(dtypes=["float32"]))
    def test_hard_cases_respect_the_dtypes(self, case):
        assert case.x.dtype == np.float32

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"regime": "wild"}, "regime is"),
            ({"data_formats": ["NCWH"]}, "data_formats is"),
            ({"dtypes": "float32"}, "dtypes is 'float32'"),
            ({"conventions": []}, "conventions is"),
            ({"world_sizes": [0]}, "world_sizes is"),
            ({"max_channels": 0}, "max_channels is 0"),
            ({"mask": 1}, "on/off option"),
            ({"regime": "float16_overflow", "dtypes": ["float32"]}, "needs 'float16' in dtypes"),
        ],
    )
    def test_bad_parameters_are_named(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            cases(**kwargs)


class TestProcessGroups:
    @settings(max_examples=60)
    @given(groups=process_groups(4))
    def test_partitions_the_ranks(self, groups):
        if groups is not None:
            assert sorted(r for g in groups for r in g) == [0, 1, 2, 3]
            assert all(groups)

    def test_reaches_ragged_and_non_contiguous_partitions(self):
        seen = []

        @settings(max_examples=300, database=None)
        @given(groups=process_groups(4))
        def collect(groups):
            if groups is not None:
                seen.append(sorted(sorted(g) for g in groups))

        collect()
        assert [[0, 2], [1, 3]] in seen
        assert [[0], [1, 2, 3]] in seen

    def test_world_size_is_checked(self):
        with pytest.raises(ValueError, match="world_size is 0"):
            process_groups(0)


def test_regime_names():
    assert REGIMES[0] == "generic" and len(set(REGIMES)) == len(REGIMES)
