"""LocalComm: the one-rank communicator (plain, unsynchronized batch norm)."""

from __future__ import annotations

__all__ = ["LocalComm"]


class LocalComm:
    """A communicator of size 1: every collective is the identity.

    Examples
    --------
    >>> import numpy as np
    >>> LocalComm().allreduce_sum(np.array([1.0, 2.0]), xp=np)
    array([1., 2.])
    """

    rank = 0
    size = 1

    def allreduce_min(self, buf, /, *, what):
        return buf

    def allreduce_sum(self, buf, /, *, xp):
        return buf

    def combine(self, record, fn, /, *, xp):
        return fn(xp.reshape(record, (1, *record.shape)), xp=xp)

    def split(self, color, key):
        return None if color is None else self

    def __repr__(self):
        return "LocalComm()"
