"""Owner-computes layout of ``combine``: which rank combines which channels.

With ``P`` ranks and ``C`` channels each rank owns a contiguous block of
``b = ceil(C / P)`` channels (the last block is padded with copies of channel
``C - 1``, so ``fn`` only ever sees real values). A rank packs its ``(k, C)``
record into ``(P, k, b)`` (block ``j`` for owner ``j``); owner ``j`` stacks
block ``j`` of every rank in rank order, applies ``fn`` and shares its
``(k_out, b)`` part; every rank unpacks the ``(P, k_out, b)`` parts into
``(k_out, C)``. MPIComm moves the blocks with ``Alltoall`` + ``Allgather``
and SimulatedWorld with two exchanges, both through these functions, so the
two give the same bytes. Per-rank traffic is about ``(k + k_out) C`` values,
independent of ``P``.
"""

from __future__ import annotations

import numpy as np

from .._xp import device_of

__all__ = ["OWNER_MIN_BYTES", "block_width", "pack", "unpack"]

OWNER_MIN_BYTES = 64 * 1024
"""Below this many gathered bytes (``P * k * C * 8``) one ``Allgather`` of the
whole records is faster than two collectives (measured: docs/protocol.md)."""


def block_width(size: int, k: int, c: int) -> int | None:
    """Channels per owner, or ``None`` when every rank combines everything (small records).

    Examples
    --------
    >>> block_width(4, 2, 65536), block_width(4, 2, 64), block_width(8, 4, 6)
    (16384, None, None)
    """
    if size < 2 or c < size or size * k * c * 8 < OWNER_MIN_BYTES:
        return None
    return -(-c // size)


def pack(record, size: int, b: int, *, xp):
    """``(k, C)`` record -> ``(P, k, b)``: row ``j`` holds owner ``j``'s channels."""
    k, c = record.shape
    channel = np.minimum(np.arange(size * b).reshape(size, 1, b), c - 1)
    flat = (np.arange(k).reshape(1, k, 1) * c + channel).reshape(-1)
    idx = xp.asarray(flat, device=device_of(record))
    return xp.reshape(xp.take(xp.reshape(record, (-1,)), idx, axis=0), (size, k, b))


def unpack(parts, c: int, *, xp):
    """``(P, k_out, b)`` owners' parts -> the ``(k_out, C)`` result."""
    _, k_out, b = parts.shape
    channel = np.arange(c)
    flat = ((channel // b) * (k_out * b) + np.arange(k_out).reshape(k_out, 1) * b
            + channel % b).reshape(-1)
    idx = xp.asarray(flat, device=device_of(parts))
    return xp.reshape(xp.take(xp.reshape(parts, (-1,)), idx, axis=0), (k_out, c))
