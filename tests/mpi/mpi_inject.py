"""Failure injection under ``mpiexec -n K python -m mpi4py tests/mpi/mpi_inject.py MODE``.

``agree``: in turn, the last rank passes a different channel count, a
different dtype, a wrong-shape ``x``, a wrong-shape ``dy``; every rank must
raise a clear exception naming the rank at fault, print it as ``rank R
SCENARIO: TYPE: MESSAGE``, and the world must still work afterwards (a valid
call succeeds). A NaN on one rank is not an error: it propagates to its
channel's statistics on every rank. ``raise``: the last rank raises in user
code before the call while the others call ``forward``: ``python -m mpi4py``
aborts the job (no rank is left waiting).
"""

from __future__ import annotations

import os
import sys

import numpy as np


def _inputs(rank, channels=3, dtype=np.float64, ndim=4):
    rng = np.random.default_rng(rank)
    return rng.standard_normal((rank + 1, channels, 2, 2)[:ndim]).astype(dtype)


def check_agree(v):
    from refsyncbn import backward, forward
    from refsyncbn.comm import MPIComm

    comm = MPIComm()
    rank, bad = comm.rank, comm.size - 1

    def run(name, fn, needle_bad, needle_good):
        needle = needle_bad if rank == bad else needle_good
        msg = v.raises(ValueError, needle, fn, name)
        print(f"rank {rank} {name}: ValueError: {msg}", flush=True)

    run(
        "channels",
        lambda: forward(_inputs(rank, channels=4 if rank == bad else 3), comm=comm),
        f"rank {bad} passed 4 channels, rank 0 passed 3 channels",
        f"rank {bad} passed 4 channels, rank 0 passed 3 channels",
    )
    run(
        "dtype",
        lambda: forward(_inputs(rank, dtype=np.float32 if rank == bad else np.float64), comm=comm),
        f"rank {bad} passed dtype float32, rank 0 passed dtype float64",
        f"rank {bad} passed dtype float32, rank 0 passed dtype float64",
    )
    run(
        "shape",
        lambda: forward(_inputs(rank, ndim=3 if rank == bad else 4), comm=comm),
        "expected a 4-D array for data_format 'NCHW'",
        f"rank(s) [{bad}] of the group rejected their own inputs",
    )
    saved = forward(_inputs(rank), comm=comm).saved
    dy = np.ones((rank + 1, 3, 2, 2 + (rank == bad)))
    run(
        "dy-shape",
        lambda: backward(dy, saved),
        "dy has shape",
        f"backward: rank(s) [{bad}] of the group rejected their own inputs",
    )

    x = _inputs(rank)
    if rank == 0:
        x[0, 0, 0, 0] = np.nan
    res = forward(x, comm=comm)
    stats = res.saved.mean
    v.expect(
        np.isnan(stats[0]) and np.all(np.isfinite(stats[1:])),
        f"a NaN on rank 0 gave statistics {stats}",
    )
    print(f"rank {rank} nan: no exception, mean {stats.tolist()}", flush=True)

    y = forward(_inputs(rank), comm=comm).y  # the world is still usable
    v.expect(y.shape == _inputs(rank).shape and np.all(np.isfinite(y)), "valid call after errors")


def check_raise():
    from refsyncbn import forward
    from refsyncbn.comm import MPIComm

    comm = MPIComm()
    if comm.rank == comm.size - 1:
        msg = f"user code failed on rank {comm.rank} before calling forward"
        raise RuntimeError(msg)
    forward(_inputs(comm.rank), comm=comm)
    print(f"rank {comm.rank} returned from forward: a rank did not wait", flush=True)


def main(mode):
    sys.path.insert(0, os.path.dirname(__file__))
    from _collective import Verdict

    if mode == "raise":
        check_raise()
        return 0
    v = Verdict("inject")
    check_agree(v)
    return v.finish()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
