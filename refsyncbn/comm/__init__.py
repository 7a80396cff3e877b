"""Communicators: the protocol, a one-rank one, a simulated world, process groups."""

from ._protocol import Communicator
from ._watchdog import TIMEOUT_ENV, CollectiveTimeout
from .groups import group_comm, validate_process_groups
from .local import LocalComm
from .mpi import MPIComm, default_comm, launched_by_mpiexec
from .simulated import RankError, SimulatedWorld

__all__ = [
    "TIMEOUT_ENV",
    "CollectiveTimeout",
    "Communicator",
    "LocalComm",
    "MPIComm",
    "RankError",
    "SimulatedWorld",
    "default_comm",
    "group_comm",
    "launched_by_mpiexec",
    "validate_process_groups",
]
