"""Divergence between ranks under ``mpiexec -n 3 python -m mpi4py tests/mpi/mpi_diverge.py MODE``.

``diverge``: the issue's four cases, rank 1 deviating from ranks 0 and 2 (eval
while the others train; a second forward while the others go to backward;
other process_groups; another convention with the same weighting). Every
rank must raise ``ValueError`` naming rank 1 and what differs, and print
``rank R SCENARIO: ValueError: MESSAGE``. Each scenario runs on a fresh
MPIComm with a short deadline, so a hang fails fast.
``timeout``: the last rank never calls; the others' deadline (set through
``REFSYNCBN_TIMEOUT``) expires, the uncaught CollectiveTimeout aborts the job.
``combine``: owner-computes ``combine`` of uneven records gives every rank the
bytes of the same rank-ordered function applied by this script to the whole
stack (gathered independently with mpi4py's pickled ``allgather``).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

X = np.arange(24.0).reshape(4, 3, 2)
BASE = {"running_mean": np.zeros(3), "running_var": np.ones(3), "data_format": "NCL"}
SAME_ORDER = "every rank of the group must make the same calls in the same order"


def check_diverge(v):
    from refsyncbn import backward, forward
    from refsyncbn.comm import MPIComm
    from refsyncbn.layer import SyncBatchNorm

    rank = MPIComm().rank

    def eval_on_rank_1(comm):
        forward(X, comm=comm, **{**BASE, "training": comm.rank != 1})

    def forward_twice_on_rank_1(comm):
        res = forward(X, comm=comm, **BASE)
        if comm.rank == 1:
            forward(X, comm=comm, **{**BASE, "training": False})
        else:
            backward(np.ones_like(X), res.saved)

    def other_groups_on_rank_1(comm):
        groups = [[0, 1], [2]] if comm.rank == 1 else [[0], [1, 2]]
        SyncBatchNorm(3, data_format="NCL", process_groups=groups, comm=comm)

    def torch_on_rank_1(comm):
        forward(X, comm=comm, **{**BASE, "convention": "torch" if comm.rank == 1 else "reference"})

    scenarios = {
        "eval": (
            eval_on_rank_1,
            "rank 1 is in forward(training=False) call #1, rank 0 in "
            f"forward(training=True) call #1; {SAME_ORDER}",
        ),
        "forward-twice": (
            forward_twice_on_rank_1,
            "rank 1 is in forward(training=False) call "
            f"#2, rank 0 in backward call #1; {SAME_ORDER}",
        ),
        "groups": (other_groups_on_rank_1, "group_comm: rank 1 passed "),
        "convention": (
            torch_on_rank_1,
            "forward: rank 1 passed momentum_meaning update, rank 0 passed momentum_meaning retain",
        ),
    }
    for name, (fn, needle) in scenarios.items():
        comm = MPIComm(timeout=20)
        msg = v.raises(ValueError, needle, lambda fn=fn, comm=comm: fn(comm), name)
        print(f"rank {rank} {name}: ValueError: {msg}", flush=True)
    y = forward(X, comm=MPIComm(timeout=20), **BASE).y  # the world still works
    v.expect(np.all(np.isfinite(y)), "valid call after the divergences")
    v.raises(
        ValueError,
        "MPIComm: timeout is 0; expected a number of seconds > 0",
        lambda: MPIComm(timeout=0),
        "timeout=0",
    )


def check_timeout():
    from refsyncbn import forward
    from refsyncbn.comm import TIMEOUT_ENV, MPIComm

    os.environ[TIMEOUT_ENV] = "2"
    comm = MPIComm()
    if comm.rank == comm.size - 1:
        print(f"rank {comm.rank} never calls forward", flush=True)
        time.sleep(120)
    forward(X, comm=comm, **BASE)
    print(f"rank {comm.rank} returned from forward: a rank did not wait", flush=True)


def _ordered(records, *, xp):
    """A per-channel, rank-ordered combination that rounds at every step (a combine fn)."""
    total, scale = records[0, 0], records[0, 1]
    for r in range(1, records.shape[0]):
        total = total + records[r, 0] * scale
        scale = xp.sqrt(scale * scale + records[r, 1])
    return xp.stack([total, scale, total / scale])


def check_combine(v):
    from refsyncbn.comm import MPIComm
    from refsyncbn.comm._plan import block_width

    comm = MPIComm(timeout=60)
    for c in (2, 7, 1003, 4099, 44000, 65536):
        rng = np.random.default_rng(c * 31 + comm.rank)
        record = np.stack([rng.standard_normal(c) * 1e8**comm.rank, rng.uniform(0.1, 3, c)])
        whole = np.stack(comm.mpi_comm.allgather(record))
        want = _ordered(whole, xp=np)
        got = comm.combine(record, _ordered, xp=np)
        v.expect(
            got.shape == want.shape and got.tobytes() == want.tobytes(),
            f"C = {c}: combine differs from the rank-ordered function on the whole stack",
        )
        path = "gather" if block_width(comm.size, 2, c) is None else "owner"
        print(f"rank {comm.rank} combine C={c} path={path}: bitwise equal", flush=True)


def main(mode):
    sys.path.insert(0, os.path.dirname(__file__))
    from _collective import Verdict

    if mode == "timeout":
        check_timeout()
        return 0
    v = Verdict(mode)
    {"diverge": check_diverge, "combine": check_combine}[mode](v)
    return v.finish()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
