"""refsyncbn: the reference implementation of Synchronized Batch Normalization."""

from .comm import LocalComm, RankError, SimulatedWorld
from .conventions import CONVENTIONS, Convention, get_convention
from .functional import ForwardResult, Grads, backward, forward
from .layer import BatchNorm, Sequential, SyncBatchNorm, convert_sync_batchnorm
from .layouts import DATA_FORMATS
from .sparse import SparseCooTensor

__all__ = [
    "CONVENTIONS",
    "DATA_FORMATS",
    "BatchNorm",
    "Convention",
    "ForwardResult",
    "Grads",
    "LocalComm",
    "RankError",
    "Sequential",
    "SimulatedWorld",
    "SparseCooTensor",
    "SyncBatchNorm",
    "__version__",
    "backward",
    "convert_sync_batchnorm",
    "forward",
    "get_convention",
]


def __getattr__(name):
    """``__version__``, looked up on first use (package metadata costs ~50 ms to import)."""
    if name == "__version__":
        from ._version import __version__

        return __version__
    msg = f"module 'refsyncbn' has no attribute {name!r}"
    raise AttributeError(msg)
