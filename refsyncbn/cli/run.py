"""``refsyncbn run CASE.npz OUT_DIR``: one case file, one forward (+ backward) per rank.

Under ``mpiexec -n W python -m mpi4py -m refsyncbn run ...`` each MPI rank
takes its slice of the case; with ``--world W`` the W ranks are threads of one
process (:class:`~refsyncbn.comm.SimulatedWorld`). Either way rank ``r`` writes
``OUT_DIR/rank{r}.npz`` (keys of :data:`refsyncbn.cases.RESULT_KEYS`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .cases import read_case, write_result
from .comm import RankError, SimulatedWorld, default_comm, group_comm, launched_by_mpiexec
from .comm.agreement import agree
from .comm.simulated import PeerAborted
from .functional import backward, forward

__all__ = ["add_arguments", "main", "run_rank"]

# Errors that mean "this case or these arguments are rejected": reported as a
# message and exit status 1. Anything else is a bug and keeps its traceback.
_REJECTED = (ValueError, TypeError, OSError)


def run_rank(case, comm) -> dict:
    """Run ``case`` on the calling rank of ``comm``; what ``rank{r}.npz`` holds.

    Collective over ``comm``, the WORLD communicator of the case (its size is
    ``case.world_size``, its rank the world rank): every rank must call it.
    The rank takes its slice ``case.shard(comm.rank)``, joins its group
    (``case.groups``), runs one forward pass and, when ``case.dy`` is given,
    one backward pass with ``param_grads="local"``.

    Parameters
    ----------
    case : refsyncbn.cases.Case
        The problem, the same on every rank.
    comm : Communicator
        World communicator (``MPIComm``, a ``SimulatedWorld`` rank, ``LocalComm``).

    Returns
    -------
    dict
        ``y``, ``dx``, ``dweight``, ``dbias``, ``running_mean``,
        ``running_var`` (``None`` where absent): ``y``/``dx`` in the dtype of
        ``x``, parameter gradients in the dtype of ``weight`` (this rank's
        local contribution), running statistics in their own dtype.

    Raises
    ------
    ValueError
        On every rank, when ``comm.size != case.world_size`` or when the case
        is rejected by :func:`refsyncbn.forward` / :func:`refsyncbn.backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from refsyncbn.cases import Case
    >>> case = Case(x=np.arange(12.0).reshape(6, 2), running_mean=np.zeros(2),
    ...             running_var=np.ones(2), splits=(2, 0, 4), data_format="NC")
    >>> outs = SimulatedWorld(3).run(lambda comm: run_rank(case, comm))
    >>> [o["y"].shape for o in outs]
    [(2, 2), (0, 2), (4, 2)]
    >>> outs[1]["running_mean"]
    array([0.5, 0.6])
    """
    if comm.size != case.world_size:
        msg = (f"the case has splits for {case.world_size} ranks but the world has "
               f"{comm.size}; run it on {case.world_size} ranks (mpiexec -n {case.world_size}, "
               f"or --world {case.world_size})")
        raise ValueError(msg)
    shard = case.shard(comm.rank)
    group = group_comm(comm, case.groups)
    try:
        res = forward(shard["x"], case.weight, case.bias, running_mean=case.running_mean,
                      running_var=case.running_var, training=case.training, eps=case.eps,
                      momentum=case.momentum, data_format=case.data_format,
                      convention=case.convention, mask=shard.get("mask"), comm=group, xp=np)
        out = {"y": res.y, "running_mean": res.running_mean, "running_var": res.running_var,
               "dx": None, "dweight": None, "dbias": None}
        if case.dy is not None:
            grads = backward(shard["dy"], res.saved, param_grads="local")
            out.update(dx=grads.dx, dweight=grads.dweight, dbias=grads.dbias)
    finally:
        if group is not comm and hasattr(group, "free"):
            group.free()
    return out


def add_arguments(parser) -> None:
    """Arguments of the ``run`` subcommand."""
    parser.add_argument("case", type=Path, help="case file (npz, schema 'refsyncbn case v1')")
    parser.add_argument("out_dir", type=Path, help="directory for rank{r}.npz")
    parser.add_argument("--world", type=int, metavar="W",
                        help="run W ranks as threads of this process instead of under mpiexec")


def main(args) -> int:
    """Run the case; 0 on success, 1 (on every rank) when the case or the run is rejected."""
    if args.world is not None:
        return _main_simulated(args)
    comm = default_comm()
    try:
        case = _agreed_read(comm, args.case)
        out = run_rank(case, comm)
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
        outs = SimulatedWorld(args.world).run(lambda comm: run_rank(case, comm))
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
