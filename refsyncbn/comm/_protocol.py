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

    ``combine`` is the float data path of the functional core: each rank passes
    a per-channel record, a ``(k, C)`` float64 array, and ``fn(records, xp=xp)``
    maps the ``(P, k, c)`` stack of the ranks' records (rank order) for any
    slice of ``c`` channels to a ``(k_out, c)`` result. ``fn`` must treat each
    channel on its own and combine the ranks in rank order, so that the result
    is the same bytes whichever rank computes which channels and however the
    channels are sliced; every rank receives the whole ``(k_out, C)`` result.

    ``allreduce_min`` returns the element-wise minimum over all ranks of a
    1-D int64 host buffer: the agreement (``comm.agreement``) sends
    ``[record, -record]`` through it. ``what`` names the call (e.g.
    ``"backward call #3"``) for timeout messages.

    Communicators with a deadline (``MPIComm``, ``SimulatedWorld``) raise
    :class:`~refsyncbn.comm.CollectiveTimeout` from any collective that does
    not complete in time.
    """

    rank: int
    size: int

    def allreduce_min(self, buf, /, *, what): ...

    def allreduce_sum(self, buf, /, *, xp): ...

    def combine(self, record, fn, /, *, xp): ...

    def split(self, color: int | None, key: int) -> Communicator | None: ...
