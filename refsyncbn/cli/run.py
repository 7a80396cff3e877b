"""``refsyncbn run CASE.npz OUT_DIR``: one case file, one forward (+ backward) per rank.

Under ``mpiexec -n W python -m mpi4py -m refsyncbn run ...`` each MPI rank
takes its slice of the case; with ``--world W`` the W ranks are threads of one
process (:class:`~refsyncbn.comm.SimulatedWorld`). Either way rank ``r`` writes
``OUT_DIR/rank{r}.npz`` (keys of :data:`refsyncbn.cases.RESULT_KEYS`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..cases import read_case, run_rank, write_result
from ..comm import RankError, SimulatedWorld, default_comm, launched_by_mpiexec
from ..comm.agreement import agree
from ..comm.simulated import PeerAborted
from ..functional import VARIANCE_ALGORITHMS

__all__ = ["add_arguments", "main"]

# Errors that mean "this case or these arguments are rejected": reported as a
# message and exit status 1. Anything else is a bug and keeps its traceback.
_REJECTED = (ValueError, TypeError, OSError)


def add_arguments(parser) -> None:
    """Arguments of the ``run`` subcommand."""
    parser.add_argument("case", type=Path, help="case file (npz, schema 'refsyncbn case v1')")
    parser.add_argument("out_dir", type=Path, help="directory for rank{r}.npz")
    parser.add_argument("--world", type=int, metavar="W",
                        help="run W ranks as threads of this process instead of under mpiexec")
    parser.add_argument("--variance", choices=VARIANCE_ALGORITHMS,
                        help="variance algorithm, overriding the case file's 'variance' "
                             "(default there: stable; naive emulates E[x^2] - E[x]^2)")


def main(args) -> int:
    """Run the case; 0 on success, 1 (on every rank) when the case or the run is rejected."""
    if args.world is not None:
        return _main_simulated(args)
    comm = default_comm()
    try:
        case = _agreed_read(comm, args.case)
        out = run_rank(case, comm, variance=args.variance)
    except _REJECTED as exc:
        print(f"refsyncbn run: rank {comm.rank} of {comm.size}: error: {exc}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_result(args.out_dir / f"rank{comm.rank}.npz", **out)
    return 0


def _main_simulated(args) -> int:
    """``--world W``: W threads of this process, one SimulatedWorld."""
    if launched_by_mpiexec():
        print("refsyncbn run: error: --world runs ranks as threads of one process; under "
              "mpiexec leave it out (the MPI ranks are the world)", file=sys.stderr)
        return 1
    try:
        case = read_case(args.case)
        outs = SimulatedWorld(args.world).run(
            lambda comm: run_rank(case, comm, variance=args.variance))
    except _REJECTED as exc:
        print(f"refsyncbn run: error: {exc}", file=sys.stderr)
        return 1
    except RankError as exc:
        if not all(isinstance(e, (*_REJECTED, PeerAborted)) for e in exc.errors.values()):
            raise
        print(f"refsyncbn run: error: {exc}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for r, out in enumerate(outs):
        write_result(args.out_dir / f"rank{r}.npz", **out)
    return 0


def _agreed_read(comm, path):
    """Read the case on every rank; if any rank fails, every rank raises (no rank waits)."""
    try:
        case, error = read_case(path), None
    except Exception as exc:  # re-raised by agree(), after the group learned of it
        case, error = None, exc
    agree(comm, f"reading {path}", error)
    return case
