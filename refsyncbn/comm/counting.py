"""CountingComm: a Communicator wrapper that counts, sizes and times collectives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CountingComm", "Tally"]


def _by_kind() -> dict:
    return {"agree": 0, "data": 0}


@dataclass
class Tally:
    """Collectives by kind: ``"agree"`` (int64 agreement records), ``"data"`` (statistics).

    ``bytes`` counts each rank's contribution (its record or buffer).
    """

    calls: dict = field(default_factory=_by_kind)
    bytes: dict = field(default_factory=_by_kind)
    seconds: float = 0.0


class CountingComm:
    """Wraps a Communicator and tallies its collectives in ``self.tally``.

    Communicators made by :meth:`split` share their parent's tally.

    Examples
    --------
    >>> import numpy as np
    >>> from refsyncbn import forward
    >>> from refsyncbn.comm import SimulatedWorld
    >>> def step(comm):
    ...     counting = CountingComm(comm)
    ...     forward(np.ones((2, 3)), data_format="NC", comm=counting)
    ...     return counting.tally.calls, counting.tally.bytes
    >>> SimulatedWorld(2).run(step)[0]   # data: rows n, mean, M2, e of 3 channels, float64
    ({'agree': 1, 'data': 1}, {'agree': 320, 'data': 96})

    The agreement sends ``[record, -record]``: 2 x 20 int64.
    """

    def __init__(self, comm, tally: Tally | None = None):
        self._comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.tally = Tally() if tally is None else tally

    def allreduce_min(self, buf, /, *, what):
        return self._timed("agree", buf.nbytes, lambda: self._comm.allreduce_min(buf, what=what))

    def allreduce_sum(self, buf, /, *, xp):
        if isinstance(buf, np.ndarray) and buf.dtype.kind in "iu":
            kind, nbytes = "agree", buf.nbytes
        else:
            kind, nbytes = "data", int(buf.size) * (xp.finfo(buf.dtype).bits // 8)
        return self._timed(kind, nbytes, lambda: self._comm.allreduce_sum(buf, xp=xp))

    def combine(self, record, fn, /, *, xp):
        return self._timed(
            "data", int(record.size) * 8, lambda: self._comm.combine(record, fn, xp=xp)
        )

    def _timed(self, kind, nbytes, call):
        """Count one collective of ``kind`` and ``nbytes``; time ``call()``."""
        self.tally.calls[kind] += 1
        self.tally.bytes[kind] += nbytes
        start = time.perf_counter()
        out = call()
        self.tally.seconds += time.perf_counter() - start
        return out

    def split(self, color, key):
        sub = self._comm.split(color, key)
        return None if sub is None else CountingComm(sub, self.tally)

    def free(self) -> None:
        """Free the wrapped communicator when it can be freed (MPIComm)."""
        if hasattr(self._comm, "free"):
            self._comm.free()
