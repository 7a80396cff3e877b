"""The Communicator protocol every backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Communicator"]


@runtime_checkable
class Communicator(Protocol):
    """What the functional core needs from a communicator.

    ``allreduce_sum`` returns the element-wise sum over all ranks of the
    one-dimensional ``buf`` (the caller's buffer may be reused in place); every
    rank must receive bitwise-identical results. ``split`` mirrors
    ``MPI_Comm_split``: ranks passing the same ``color`` form a new communicator,
    ordered by ``key`` then by rank; ``color=None`` joins no group and returns
    ``None``.
    """

    rank: int
    size: int

    def allreduce_sum(self, buf, /, *, xp): ...

    def split(self, color: int | None, key: int) -> Communicator | None: ...
