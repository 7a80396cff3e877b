"""Cost of the protocol: ``combine`` paths, the agreement, the watchdog's wait loop.

MPI (P ranks; oversubscribed when P exceeds the cores)::

    mpiexec -n P python -m mpi4py scripts/bench_protocol.py mpi

SimulatedWorld (threads of one process, P up to 256)::

    python scripts/bench_protocol.py simulated

``combine``: each rank's ``(4, C)`` record (n, mean, M2, e) combined by the
forward's exact rank-ordered combination (``functional.combine_moments``) into
``(5, C)``, through the all-gather path
(every rank receives all ``P`` records and combines everything) and the
owner-computes path (``Ialltoall`` of channel blocks, owner combines,
``Iallgather`` of the parts), forced in turn and interleaved in the same
process; median of the repeats. Bytes are those each rank receives (and
holds), from the message sizes. ``agree``: one agreement (``Iallreduce`` of
40 int64 through the wait loop) next to a blocking ``Allreduce`` of the same
buffer, and an eval forward of a (32, 64) shard with its agreement.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from refsyncbn.comm import _plan, mpi, simulated
from refsyncbn.functional import combine_moments as fn

K, K_OUT = 4, 5


def received_bytes(p, c, path):
    """Bytes one rank receives per combine (its own block included)."""
    if path == "gather":
        return p * K * c * 8
    b = -(-c // p)
    return p * K * b * 8 + p * K_OUT * b * 8


def _force(path, module):
    """Make ``module.block_width`` choose ``path``; returns the original."""
    original = module.block_width
    if path == "gather":
        module.block_width = lambda size, k, c: None
    else:
        module.block_width = lambda size, k, c: -(-c // size) if size > 1 else None
    return original


def _record(rank, c):
    rng = np.random.default_rng(rank)
    return np.stack(
        [np.full(c, 10.0 + rank), rng.standard_normal(c), rng.uniform(1, 2, c), np.zeros(c)]
    )


def _timed(call, iters):
    start = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - start) / iters


def bench_mpi():
    from refsyncbn import forward
    from refsyncbn.comm import MPIComm
    from refsyncbn.comm.agreement import agree

    comm = MPIComm()
    p, rank = comm.size, comm.rank
    world = comm.mpi_comm
    rows = []
    for c in (64, 1024, 65536):
        record = _record(rank, c)
        iters = 200 if c <= 1024 else 20
        times = {"gather": [], "owner": []}
        for _ in range(7):
            for path in times:
                original = _force(path, mpi)
                try:
                    world.Barrier()
                    times[path].append(
                        _timed(lambda rec=record: comm.combine(rec, fn, xp=np), iters)
                    )
                finally:
                    mpi.block_width = original
        worst = {k: world.allreduce(statistics.median(v), op=_max()) for k, v in times.items()}
        rows.append((p, c, worst["gather"], worst["owner"]))
    buf = np.zeros(40, np.int64)
    lat = {"agree": [], "Allreduce": []}
    x = np.random.default_rng(rank).standard_normal((32, 64))
    stats = {"running_mean": np.zeros(64), "running_var": np.ones(64), "data_format": "NC"}
    ev = {"eval forward": [], "eval forward, 1 rank": []}
    for _ in range(7):
        world.Barrier()
        lat["agree"].append(_timed(lambda: agree(comm, "bench", None, {"f": 1}), 300))
        world.Barrier()
        lat["Allreduce"].append(
            _timed(lambda: world.Allreduce(_mpi_in_place(), buf, op=_mpi_min()), 300)
        )
        world.Barrier()
        ev["eval forward"].append(
            _timed(lambda: forward(x, training=False, comm=comm, **stats), 300)
        )
        ev["eval forward, 1 rank"].append(_timed(lambda: forward(x, training=False, **stats), 300))
    med = {k: world.allreduce(statistics.median(v), op=_max()) for k, v in {**lat, **ev}.items()}
    if rank == 0:
        print(f"## MPI, {p} ranks")
        print("| P | C | all-gather: us | bytes/rank | owner-computes: us | bytes/rank | ratio |")
        print("|---|---|---|---|---|---|---|")
        for p_, c, tg, to in rows:
            print(
                f"| {p_} | {c} | {tg * 1e6:.0f} | {received_bytes(p_, c, 'gather')} | "
                f"{to * 1e6:.0f} | {received_bytes(p_, c, 'owner')} | {tg / to:.2f} |"
            )
        print(
            f"agreement (Iallreduce + wait loop): {med['agree'] * 1e6:.1f} us; blocking "
            f"Allreduce of the same 40 int64: {med['Allreduce'] * 1e6:.1f} us"
        )
        print(
            f"eval forward (32, 64): {med['eval forward'] * 1e6:.1f} us with the agreement; "
            f"{med['eval forward, 1 rank'] * 1e6:.1f} us on one rank (no agreement)"
        )


def _max():
    from mpi4py import MPI

    return MPI.MAX


def _mpi_min():
    from mpi4py import MPI

    return MPI.MIN


def _mpi_in_place():
    from mpi4py import MPI

    return MPI.IN_PLACE


def bench_simulated():
    print("## SimulatedWorld (threads)")
    print("| P | C | all-gather: ms | bytes/rank | owner-computes: ms | bytes/rank |")
    print("|---|---|---|---|---|---|")
    for p in (2, 16, 64, 256):
        for c in (64, 1024, 65536):
            if p * c > 256 * 1024 * 4:
                continue  # the gathered stacks would need P^2 * 3C floats of memory
            records = [_record(r, c) for r in range(p)]
            times = {}
            for path in ("gather", "owner"):
                original = _force(path, simulated)
                try:
                    world = simulated.SimulatedWorld(p)
                    times[path] = min(
                        _timed(
                            lambda w=world, recs=records: w.run(
                                lambda comm, rec: comm.combine(rec, fn, xp=np), recs
                            ),
                            1,
                        )
                        for _ in range(3)
                    )
                finally:
                    simulated.block_width = original
            print(
                f"| {p} | {c} | {times['gather'] * 1e3:.1f} | {received_bytes(p, c, 'gather')}"
                f" | {times['owner'] * 1e3:.1f} | {received_bytes(p, c, 'owner')} |"
            )
    print(f"\n## On paper: bytes each rank receives per combine (k = {K}, k_out = {K_OUT})")
    print("| P | C | all-gather | owner-computes |")
    print("|---|---|---|---|")
    for p in (1024, 4096):
        for c in (64, 1024, 4096, 65536):
            print(
                f"| {p} | {c} | {received_bytes(p, c, 'gather')} | "
                f"{received_bytes(p, c, 'owner')} |"
            )
    assert _plan.block_width(2, K, 65536) is not None


if __name__ == "__main__":
    {"mpi": bench_mpi, "simulated": bench_simulated}[sys.argv[1]]()
