"""SimulatedWorld, LocalComm and process-group rules."""

from __future__ import annotations

import numpy as np
import pytest

from refsyncbn.comm import (
    TIMEOUT_ENV,
    CollectiveTimeout,
    Communicator,
    LocalComm,
    RankError,
    SimulatedWorld,
    group_comm,
    simulated,
    validate_process_groups,
)
from refsyncbn.comm.simulated import PeerAborted


def _allreduce(comm, value):
    return comm.allreduce_sum(np.array([value]), xp=np)


class TestSimulatedWorld:
    def test_sums_in_rank_order_identically_on_every_rank(self):
        # Left to right: (1e16 + 1) rounds to 1e16 (ulp 2), then - 1e16 gives 0. Any other
        # order that adds 1 last would give 1.
        for _ in range(5):
            out = SimulatedWorld(3).run(_allreduce, [1e16, 1.0, -1e16])
            assert [float(o[0]) for o in out] == [0.0, 0.0, 0.0]

    def test_runs_without_shards_and_returns_results_by_rank(self):
        out = SimulatedWorld(4).run(lambda comm: (comm.rank, comm.size))
        assert out == [(0, 4), (1, 4), (2, 4), (3, 4)]

    def test_comms_implement_the_protocol(self):
        assert all(SimulatedWorld(2).run(lambda comm: isinstance(comm, Communicator)))
        assert isinstance(LocalComm(), Communicator)

    @pytest.mark.parametrize("size", [0, -1, 1.5, True, "2"])
    def test_size_must_be_a_positive_int(self, size):
        with pytest.raises(ValueError, match=r"size is .*; expected an int >= 1"):
            SimulatedWorld(size)

    def test_one_shard_per_rank(self):
        with pytest.raises(ValueError, match=r"shards has 2 entries; expected one per rank \(3\)"):
            SimulatedWorld(3).run(_allreduce, [1.0, 2.0])

    def test_buffers_of_different_shapes_raise_on_every_rank(self):
        def body(comm, n):
            return comm.allreduce_sum(np.zeros(n), xp=np)

        with pytest.raises(RankError) as info:
            SimulatedWorld(2).run(body, [2, 3])
        assert sorted(info.value.errors) == [0, 1]
        assert "buffers differ in shape (rank 0: (2,), rank 1: (3,))" in str(info.value)


class TestSplit:
    def test_colors_group_ranks_ordered_by_key_then_rank(self):
        colors, keys = [0, 1, 0, None, 0], [5, 0, 1, 0, 1]

        def body(comm, _):
            sub = comm.split(colors[comm.rank], keys[comm.rank])
            if sub is None:
                return None
            # Each member writes its world rank at its new rank: reveals the order.
            buf = np.zeros(sub.size)
            buf[sub.rank] = comm.rank
            return sub.size, sub.rank, list(sub.allreduce_sum(buf, xp=np))

        out = SimulatedWorld(5).run(body, [None] * 5)
        # color 0: world ranks 0 (key 5), 2 (key 1), 4 (key 1): keys, ties by rank -> 2, 4, 0
        assert out[2] == (3, 0, [2.0, 4.0, 0.0])
        assert out[4] == (3, 1, [2.0, 4.0, 0.0])
        assert out[0] == (3, 2, [2.0, 4.0, 0.0])
        assert out[1] == (1, 0, [1.0])
        assert out[3] is None

    def test_groups_reduce_independently_and_can_split_again(self):
        def body(comm, _):
            sub = comm.split(comm.rank % 2, comm.rank)
            subsub = sub.split(0, -sub.rank)  # reversed order
            return float(_allreduce(sub, comm.rank)[0]), subsub.rank

        out = SimulatedWorld(4).run(body, [None] * 4)
        assert [o[0] for o in out] == [2.0, 4.0, 2.0, 4.0]
        assert [o[1] for o in out] == [1, 1, 0, 0]


class TestFailures:
    @pytest.mark.timeout(60)
    def test_an_exception_on_one_rank_does_not_hang_the_others(self):
        def body(comm, _):
            if comm.rank == 1:
                raise KeyError("boom")
            return _allreduce(comm, 1.0)

        with pytest.raises(RankError) as info:
            SimulatedWorld(3).run(body, [None] * 3)
        errors = info.value.errors
        assert list(errors) == [0, 1, 2]
        assert isinstance(errors[1], KeyError)
        assert isinstance(errors[0], PeerAborted) and isinstance(errors[2], PeerAborted)
        assert info.value.__cause__ is errors[1]
        assert "rank 1: KeyError: 'boom'" in str(info.value)
        assert "rank 0: PeerAborted: rank 0 left a collective because another rank raised" in (
            str(info.value)
        )

    def test_a_failure_after_a_finished_collective_leaves_the_others_alone(self):
        def body(comm, _):
            total = _allreduce(comm, 1.0)
            if comm.rank == 2:
                raise ValueError("late")
            return total

        with pytest.raises(RankError) as info:
            SimulatedWorld(3).run(body, [None] * 3)
        assert list(info.value.errors) == [2]

    def test_a_rank_that_never_joins_times_the_others_out_naming_it(self):
        def body(comm, _):
            return None if comm.rank == 1 else _allreduce(comm, 1.0)

        with pytest.raises(RankError) as info:
            SimulatedWorld(3, timeout=0.2).run(body, [None] * 3)
        assert list(info.value.errors) == [0, 2]
        timed_out = [e for e in info.value.errors.values() if isinstance(e, CollectiveTimeout)]
        assert len(timed_out) >= 1 and isinstance(timed_out[0], TimeoutError)
        assert all(
            isinstance(e, (CollectiveTimeout, PeerAborted)) for e in info.value.errors.values()
        )
        assert "rank(s) [1] never arrived" in str(timed_out[0])
        assert "within 0.2 s on the simulated world" in str(timed_out[0])

    def test_the_deadline_comes_from_the_environment_and_is_checked(self, monkeypatch):
        assert SimulatedWorld(2).timeout == simulated.DEFAULT_TIMEOUT_S
        monkeypatch.setenv(TIMEOUT_ENV, "2.5")
        assert SimulatedWorld(2).timeout == 2.5
        assert SimulatedWorld(2, timeout=7).timeout == 7.0
        monkeypatch.setenv(TIMEOUT_ENV, "soon")
        with pytest.raises(
            ValueError,
            match="SimulatedWorld: REFSYNCBN_TIMEOUT is 'soon'; expected a number of seconds > 0",
        ):
            SimulatedWorld(2)
        for bad in (0, -1.0, float("nan"), True, "5"):
            with pytest.raises(ValueError, match=r"SimulatedWorld: timeout is .*; expected a "):
                SimulatedWorld(2, timeout=bad)


class TestLocalComm:
    def test_is_a_one_rank_identity(self):
        comm = LocalComm()
        assert (comm.rank, comm.size) == (0, 1)
        buf = np.array([1.0, 2.0])
        np.testing.assert_array_equal(comm.allreduce_sum(buf, xp=np), buf)
        assert comm.split(0, 0) is comm
        assert comm.split(None, 0) is None


class TestValidateProcessGroups:
    def test_accepts_ragged_and_non_contiguous_groups_and_numpy_ints(self):
        assert validate_process_groups([[0, 2], [1, 3]], 4) == [[0, 2], [1, 3]]
        assert validate_process_groups([[0], [1, 2, 3]], 4) == [[0], [1, 2, 3]]
        out = validate_process_groups([[np.int64(1), 0]], 2)
        assert out == [[1, 0]] and all(type(r) is int for r in out[0])

    @pytest.mark.parametrize(
        ("groups", "match"),
        [
            (((0, 1),), "process_groups is a tuple; expected a list of lists"),
            ([(0, 1)], r"process_groups\[0\] is a tuple; expected a list of int ranks"),
            ([[0], "12"], r"process_groups\[1\] is a str"),
            ([[0, 1.0]], r"process_groups\[0\] holds 1.0; expected int ranks"),
            ([[True]], r"process_groups\[0\] holds True; expected int ranks"),
        ],
    )
    def test_type_errors(self, groups, match):
        with pytest.raises(TypeError, match=match):
            validate_process_groups(groups, 4)

    @pytest.mark.parametrize(
        ("groups", "match"),
        [
            ([[0, 4]], r"process_groups\[0\] holds rank 4; expected ranks in \[0, 4\)"),
            ([[-1]], r"holds rank -1; expected ranks in \[0, 4\)"),
            ([[0, 1], [1, 2]], "rank 1 is in group 0 and group 1; each rank may appear once only"),
            ([[2, 2]], "rank 2 is twice in group 0"),
            ([[0], []], r"process_groups\[1\] is empty; every group needs at least one rank"),
        ],
    )
    def test_value_errors(self, groups, match):
        with pytest.raises(ValueError, match=match):
            validate_process_groups(groups, 4)


class TestGroupComm:
    def test_none_means_the_whole_communicator(self):
        comm = LocalComm()
        assert group_comm(comm, None) is comm

    def test_group_members_are_ordered_by_world_rank(self):
        def body(comm, _):
            sub = group_comm(comm, [[3, 1], [2, 0]])
            return sub.rank, sub.size, float(_allreduce(sub, 10.0**comm.rank)[0])

        out = SimulatedWorld(4).run(body, [None] * 4)
        assert out == [(0, 2, 101.0), (0, 2, 1010.0), (1, 2, 101.0), (1, 2, 1010.0)]

    def test_a_rank_in_no_group_raises_naming_itself_and_the_others_name_it(self):
        def body(comm, _):
            sub = group_comm(comm, [[0, 2]])
            return float(_allreduce(sub, 1.0)[0])

        with pytest.raises(RankError) as info:
            SimulatedWorld(3).run(body, [None] * 3)
        errors = info.value.errors
        assert sorted(errors) == [0, 1, 2]
        assert all(isinstance(e, ValueError) for e in errors.values())
        assert "rank 1 is in no group of process_groups=[[0, 2]]" in str(errors[1])
        for r in (0, 2):
            assert "group_comm: rank(s) [1] of the group rejected their own inputs" in (
                str(errors[r])
            )

    def test_specs_that_differ_between_ranks_raise_on_every_rank_before_the_split(self):
        specs = [[[0], [1, 2]], [[0, 1], [2]], [[0], [1, 2]]]

        def body(comm, _):
            return group_comm(comm, specs[comm.rank]).size

        with pytest.raises(RankError) as info:
            SimulatedWorld(3).run(body, [None] * 3)
        errors = info.value.errors
        assert sorted(errors) == [0, 1, 2]
        assert all(isinstance(e, ValueError) for e in errors.values())
        assert (
            "group_comm: rank 1 passed process_groups=[[0, 1], [2]], rank 0 passed "
            "another process_groups (digest "
        ) in str(errors[1])
        for r in (0, 2):
            assert ("group_comm: rank 1 passed another process_groups (digest 0x") in (
                str(errors[r])
            )
            assert "rank 0 passed process_groups=[[0], [1, 2]]" in str(errors[r])

    def test_none_on_one_rank_and_groups_on_the_others_raise_on_every_rank(self):
        def body(comm, _):
            return group_comm(comm, None if comm.rank == 2 else [[0, 1, 2]]).size

        with pytest.raises(RankError) as info:
            SimulatedWorld(3).run(body, [None] * 3)
        assert sorted(info.value.errors) == [0, 1, 2]
        assert "rank 2 passed process_groups=None" in str(info.value.errors[2])

    def test_equal_specs_pass(self):
        out = SimulatedWorld(3).run(lambda comm: group_comm(comm, [[0], [1, 2]]).size)
        assert out == [1, 2, 2]

    def test_invalid_groups_raise_on_every_rank(self):
        with pytest.raises(RankError) as info:
            SimulatedWorld(2).run(lambda comm, _: group_comm(comm, [[0, 5]]), [None] * 2)
        assert sorted(info.value.errors) == [0, 1]
        assert all(isinstance(e, ValueError) for e in info.value.errors.values())
