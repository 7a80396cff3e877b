"""refsyncbn: the reference implementation of Synchronized Batch Normalization."""

from .comm import LocalComm, RankError, SimulatedWorld
from .conventions import CONVENTIONS, Convention, get_convention
from .functional import ForwardResult, Grads, backward, forward
from .layouts import DATA_FORMATS

__all__ = [
    "CONVENTIONS",
    "DATA_FORMATS",
    "Convention",
    "ForwardResult",
    "Grads",
    "LocalComm",
    "RankError",
    "SimulatedWorld",
    "backward",
    "forward",
    "get_convention",
]
