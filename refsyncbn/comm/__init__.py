"""Communicators: the protocol, a one-rank one, a simulated world, process groups."""

from ._protocol import Communicator
from .groups import group_comm, validate_process_groups
from .local import LocalComm
from .simulated import RankError, SimulatedWorld

__all__ = [
    "Communicator",
    "LocalComm",
    "RankError",
    "SimulatedWorld",
    "group_comm",
    "validate_process_groups",
]
