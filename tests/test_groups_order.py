"""Process groups become sub-communicators ranked in WORLD-RANK order.

``group_comm`` splits with ``key = world rank`` (MPI_Comm_split's rule), so
within a group the sub-rank of a world rank is its position in the SORTED
group, however the user listed it: ``[[3, 1], [2, 0]]`` gives world rank 1
sub-rank 0 and world rank 3 sub-rank 1. Checked on SimulatedWorld and under
real ``mpiexec``; the expectations are written in terms of the world size.
"""

from __future__ import annotations

import numpy as np
import pytest

from refsyncbn import SimulatedWorld
from refsyncbn.comm import group_comm
from tests._mpirun import mpirun


def world_groups(size: int) -> list[list[int]]:
    """Groups listed in DESCENDING rank order: odd ranks, then even ranks."""
    odd = sorted(range(1, size, 2), reverse=True)
    even = sorted(range(0, size, 2), reverse=True)
    return [g for g in (odd, even) if g]


def check_group_comm(comm) -> list[str]:
    """This rank's failed expectations for ``group_comm(comm, world_groups(comm.size))``."""
    groups = world_groups(comm.size)
    group = next(g for g in groups if comm.rank in g)
    want_rank = sorted(group).index(comm.rank)
    sub = group_comm(comm, groups)
    failures = []
    if (sub.rank, sub.size) != (want_rank, len(group)):
        failures.append(
            f"world rank {comm.rank} in group {group}: sub-communicator rank "
            f"{sub.rank} of {sub.size}; expected {want_rank} of {len(group)}"
        )
    # Each rank contributes a one-hot vector at its world rank: the sum is the same
    # whatever the order, and shows which world ranks the sub-communicator holds.
    onehot = np.zeros(comm.size)
    onehot[comm.rank] = 1.0
    members = np.flatnonzero(sub.allreduce_sum(onehot, xp=np)).tolist()
    if members != sorted(group):
        failures.append(
            f"world rank {comm.rank}: sub-communicator holds {members}; expected {sorted(group)}"
        )
    # The sub-ranks in order, gathered through the sum: position i holds the world
    # rank of sub-rank i.
    slots = np.zeros(sub.size)
    slots[sub.rank] = comm.rank
    order = sub.allreduce_sum(slots, xp=np).astype(int).tolist()
    if order != sorted(group):
        failures.append(
            f"world rank {comm.rank}: sub-ranks 0..{sub.size - 1} are world "
            f"ranks {order}; expected {sorted(group)}"
        )
    return failures


@pytest.mark.parametrize("size", [2, 3, 4])
def test_simulated_sub_ranks_follow_world_rank_order(size):
    failures = SimulatedWorld(size).run(check_group_comm)
    assert failures == [[]] * size


def test_listing_order_does_not_matter():
    def ranks(comm, groups):
        sub = group_comm(comm, groups)
        return sub.rank

    assert SimulatedWorld(4).run(lambda c: ranks(c, [[3, 1], [2, 0]])) == [0, 0, 1, 1]
    assert SimulatedWorld(4).run(lambda c: ranks(c, [[0, 2], [1, 3]])) == [0, 0, 1, 1]


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_mpi_sub_ranks_follow_world_rank_order(n):
    proc = mpirun(n, "tests/mpi/groups_order.py", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK groups_order") == n, proc.stdout + proc.stderr
