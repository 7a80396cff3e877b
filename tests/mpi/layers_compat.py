"""Layers and compat layers under real ``mpiexec -n K`` against the float64 oracle.

Every rank derives the same cases from one seed (expected values in terms of the
world size), runs its shard through the default communicator (an MPIComm), and
the verdict is collective. Checks: refsyncbn.SyncBatchNorm (with a mask),
compat.torch (process_group from group_comm), compat.paddle (equal weighting),
compat.mindspore (process_groups, summed parameter gradients), compat.paddle
.sparse (uneven nnz, one rank empty), bitwise-equal running statistics within
each group, and a bad input on one rank raising on every rank.
"""

from __future__ import annotations

import sys

import numpy as np

from refsyncbn.comm import default_comm, group_comm
from refsyncbn.compat import mindspore, paddle, torch
from refsyncbn.layer import SyncBatchNorm
from refsyncbn.sparse import SparseCooTensor
from tests._layers import make_case, mismatches, run_rank
from tests.mpi._collective import Verdict


def main() -> int:
    verdict = Verdict("layers_compat")
    world = default_comm()
    size, rank = world.size, world.rank
    splits = (3, 0, 5, 1)[:size] if size > 1 else (4,)
    groups = [[0, 2], [1, 3]] if size == 4 else None
    rng = np.random.default_rng(100 + size)

    def check(name, case, layer, **kw):
        got = run_rank(layer, case, rank)
        for line in mismatches_one(case, rank, got, **kw):
            verdict.expect(False, f"{name}: {line}")
        rm = np.ascontiguousarray(got["running_mean"]).tobytes()
        peers = verdict.comm.allgather((case.group_of(rank), rm))
        verdict.expect(
            all(p[1] == rm for p in peers if p[0] == case.group_of(rank)),
            f"{name}: running_mean differs bitwise within the group",
        )

    case = make_case(
        rng,
        (sum(splits), 3, 4),
        splits,
        data_format="NCL",
        convention="reference",
        momentum=0.9,
        groups=groups,
        mask=True,
    )
    check(
        "SyncBatchNorm+mask",
        case,
        SyncBatchNorm(3, data_format="NCL", comm=world, process_groups=groups),
    )

    case = make_case(
        rng,
        (sum(splits), 2, 3, 2),
        splits,
        data_format="NCHW",
        convention="torch",
        momentum=0.1,
        groups=groups,
    )
    check("torch", case, torch.SyncBatchNorm(2, process_group=group_comm(world, groups)))

    case = make_case(
        rng,
        (sum(splits), 2, 2, 3),
        splits,
        data_format="NHWC",
        convention="paddle",
        momentum=0.9,
        groups=groups,
    )
    check(
        "paddle", case, paddle.SyncBatchNorm(3, data_format="NHWC", comm=group_comm(world, groups))
    )

    case = make_case(
        rng,
        (sum(splits), 2),
        splits,
        data_format="NC",
        convention="mindspore",
        momentum=0.9,
        groups=groups,
    )
    check("mindspore", case, mindspore.SyncBatchNorm(2, process_groups=groups), param_grads="sum")

    # Sparse: the rows of the case are this rank's stored values (uneven nnz).
    case = make_case(
        rng,
        (sum(splits), 3),
        splits,
        data_format="NC",
        convention="paddle",
        momentum=0.9,
        groups=groups,
    )
    start, stop = case.bounds(rank)
    idx = np.stack([np.arange(stop - start) % 4, np.zeros(stop - start, int)])
    layer = paddle.sparse.SyncBatchNorm(3, comm=group_comm(world, groups))
    layer.load_state_dict(
        {
            "weight": case.weight,
            "bias": case.bias,
            "running_mean": case.running_mean,
            "running_var": case.running_var,
            "num_batches_tracked": 0,
        }
    )
    x = SparseCooTensor(idx, case.x[start:stop], (4, 1, 3))
    y = layer(x)
    dx = layer.backward(x.with_values(case.dy[start:stop]))
    got = {
        "y": y.values,
        "dx": dx.values,
        "dweight": layer.weight_grad,
        "dbias": layer.bias_grad,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
    }
    for line in mismatches_one(case, rank, got):
        verdict.expect(False, f"paddle.sparse: {line}")

    # A bad input on the last rank raises a clear error on every rank (no hang).
    bad = 3 if rank == size - 1 else 2
    layer = torch.SyncBatchNorm(2)
    needle = "weight has shape" if bad == 3 else "rejected their own inputs"
    verdict.raises(
        ValueError, needle, lambda: layer(np.ones((2, bad))), "channel mismatch on the last rank"
    )
    return verdict.finish()


def mismatches_one(case, rank, got, **kw):
    """:func:`mismatches` for this rank only (the others' entries are copies of ours)."""
    fake = [got] * case.world_size
    return [line for line in mismatches(fake, case, **kw) if line.startswith(f"rank {rank} ")]


if __name__ == "__main__":
    sys.exit(main())
