"""``refsyncbn run CASE.npz OUT_DIR``: one case file, one forward (+ backward) per rank.

Under ``mpiexec -n W python -m mpi4py -m refsyncbn run ...`` each MPI rank
takes its slice of the case; with ``--world W`` the W ranks are threads of one
process (:class:`~refsyncbn.comm.SimulatedWorld`). Either way rank ``r`` writes
``OUT_DIR/rank{r}.npz`` (keys of :data:`refsyncbn.cases.RESULT_KEYS`;
``OUT_DIR`` is created once the results are computed), and once every rank
has written its file, rank 0 prints one line saying what was written. A
rejected case, an unreadable file or an unusable ``OUT_DIR`` fails on every
rank with one line on stderr (under MPI, one per rank, naming the rank) and
exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..cases import read_case, run_rank, write_result
from ..comm import RankError, SimulatedWorld, default_comm, launched_by_mpiexec
from ..comm.agreement import agree
from ..comm.simulated import PeerAborted
from ..functional import VARIANCE_ALGORITHMS
from ._common import USER_ERRORS, one_line, positive_int

__all__ = ["add_arguments", "main"]


def add_arguments(parser) -> None:
    """Arguments of the ``run`` subcommand."""
    parser.add_argument("case", type=Path, help="case file (npz, schema 'refsyncbn case v1')")
    parser.add_argument("out_dir", type=Path, help="directory for rank{r}.npz (created if missing)")
    parser.add_argument(
        "--world",
        type=positive_int,
        metavar="W",
        help="run W ranks as threads of this process instead of under mpiexec",
    )
    parser.add_argument(
        "--variance",
        choices=VARIANCE_ALGORITHMS,
        help="variance algorithm, overriding the case file's 'variance' "
        "(default there: stable; naive emulates E[x^2] - E[x]^2)",
    )


def main(args) -> int:
    """Run the case; 0 on success, 1 (on every rank) when the case or the run is rejected."""
    if args.world is not None:
        try:
            return _main_simulated(args)
        except (*USER_ERRORS, RankError) as exc:
            rejected = not isinstance(exc, RankError) or all(
                isinstance(e, (*USER_ERRORS, PeerAborted)) for e in exc.errors.values()
            )
            if getattr(args, "debug", False) or not rejected:
                raise
            print(f"refsyncbn run: error: {one_line(exc)}", file=sys.stderr)
            return 1
    comm = default_comm()
    try:
        case = _agreed(comm, f"reading {args.case}", _read, args)
        out = run_rank(case, comm, variance=args.variance)
        _agreed(comm, f"writing {args.out_dir}", _write, args.out_dir, comm.rank, out)
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        print(
            f"refsyncbn run: rank {comm.rank} of {comm.size}: error: {one_line(exc)}",
            file=sys.stderr,
        )
        return 1
    if comm.rank == 0:
        print(_wrote(args.out_dir, comm.size, out))
    return 0


def _main_simulated(args) -> int:
    """``--world W``: W threads of this process, one SimulatedWorld."""
    if launched_by_mpiexec():
        msg = (
            "--world runs ranks as threads of one process; under mpiexec leave it out "
            "(the MPI ranks are the world)"
        )
        raise ValueError(msg)
    case = _read(args)
    outs = SimulatedWorld(args.world).run(lambda comm: run_rank(case, comm, variance=args.variance))
    for r, out in enumerate(outs):
        _write(args.out_dir, r, out)
    print(_wrote(args.out_dir, args.world, outs[0]))
    return 0


def _read(args):
    """The case, read and validated; ``OUT_DIR`` checked: both before any computation."""
    case = read_case(args.case)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        msg = (
            f"OUT_DIR {args.out_dir} exists and is not a directory; expected a directory "
            f"(created if missing) for rank{{r}}.npz"
        )
        raise ValueError(msg)
    return case


def _write(out_dir, rank, out):
    out_dir.mkdir(parents=True, exist_ok=True)
    write_result(out_dir / f"rank{rank}.npz", **out)


def _wrote(out_dir, size, out) -> str:
    """The confirmation line."""
    files = "rank0.npz" if size == 1 else f"rank0.npz .. rank{size - 1}.npz"
    keys = ", ".join(k for k, v in out.items() if v is not None)
    return f"refsyncbn run: wrote {files} in {out_dir} ({size} rank{'s' * (size > 1)}; {keys})"


def _agreed(comm, where, fn, *args):
    """``fn(*args)`` on every rank; if it fails on any rank, every rank raises (none waits)."""
    try:
        result, error = fn(*args), None
    except Exception as exc:  # re-raised by agree(), after the group learned of it
        result, error = None, exc
    agree(comm, where, error)
    return result
