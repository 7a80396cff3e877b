"""MPIComm: the Communicator protocol over an mpi4py intracommunicator.

mpi4py is imported only when an MPIComm is made, so ``import refsyncbn``
never initializes MPI.
"""

from __future__ import annotations

import os

import numpy as np

from .._xp import to_numpy

__all__ = ["MPIComm", "default_comm", "launched_by_mpiexec"]

# Environment variables set on every rank by common launchers (MPICH/Hydra,
# Open MPI, Intel MPI, Slurm's srun with PMI/PMIx).
_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")


def launched_by_mpiexec() -> bool:
    """True when this process was started by an MPI launcher."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


class MPIComm:
    """A Communicator over an mpi4py communicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        The communicator to use. It is cloned once (``Dup``) so that library
        traffic never mixes with the caller's; default: a clone of
        ``COMM_WORLD``.

    Notes
    -----
    ``allreduce_sum`` is one buffer-based in-place ``Allreduce`` of the packed
    buffer (float64 or int64).
    """

    def __init__(self, comm=None, *, _owned=None):
        from mpi4py import MPI

        self._mpi = MPI
        if _owned is not None:
            self._comm = _owned
        else:
            self._comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    @property
    def mpi_comm(self):
        """The library's own (cloned) mpi4py communicator."""
        return self._comm

    def allreduce_sum(self, buf, /, *, xp):
        host = np.ascontiguousarray(to_numpy(buf))
        self._comm.Allreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM)
        if isinstance(buf, np.ndarray):
            return host
        return xp.asarray(host, device=buf.device)

    def split(self, color, key):
        mpi_color = self._mpi.UNDEFINED if color is None else int(color)
        sub = self._comm.Split(mpi_color, int(key))
        if sub == self._mpi.COMM_NULL:
            return None
        return MPIComm(_owned=sub)

    def __repr__(self):
        return f"<MPIComm rank {self.rank} of {self.size}>"


_DEFAULT = None


def default_comm():
    """The communicator used when none is given.

    Under an MPI launcher (``mpiexec``/``srun``): one MPIComm cloned from
    ``COMM_WORLD``, made once and reused. Otherwise a one-rank LocalComm.
    """
    global _DEFAULT
    if _DEFAULT is None:
        if launched_by_mpiexec():
            _DEFAULT = MPIComm()
        else:
            from .local import LocalComm

            _DEFAULT = LocalComm()
    return _DEFAULT
