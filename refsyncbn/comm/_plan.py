"""Owner-computes layout of ``combine``: which rank combines which channels.

With ``P`` ranks and ``C`` channels each rank owns a contiguous block of
``b = ceil(C / P)`` channels (the last block is padded with copies of channel
``C - 1``, so ``fn`` only ever sees real values). A rank packs its ``(k, C)``
record into ``(P, k, b)`` (block ``j`` for owner ``j``); owner ``j`` stacks
block ``j`` of every rank in rank order, applies ``fn`` and shares its
``(k_out, b)`` part; every rank unpacks the ``(P, k_out, b)`` parts into
``(k_out, C)``. MPIComm moves the blocks with ``Alltoall`` + ``Allgather``
and SimulatedWorld with two exchanges, both through these functions, so the
two give the same bytes. Each rank receives ``P * b * (k + k_out)`` values:
about ``(k + k_out) C`` whatever ``P`` when ``C >= P``, and ``P (k + k_out)``
(padding; still far below the all-gather's ``P k C``) when ``C < P``.
"""

from __future__ import annotations

__all__ = ["OWNER_MIN_BYTES", "block_width", "pack", "unpack"]

OWNER_MIN_BYTES = 1 << 20
"""Below this many gathered bytes (``P * k * C * 8``) one ``Allgather`` of the
whole records was faster than two collectives (measured: docs/protocol.md)."""


def block_width(size: int, k: int, c: int) -> int | None:
    """Channels per owner, or ``None`` when every rank combines everything.

    Owner-computes needs 3 or more ranks (at 2 its ``(k + k_out) C`` values per
    rank are no fewer than the all-gather's ``2 k C``) and records of at least
    ``OWNER_MIN_BYTES`` gathered.

    Examples
    --------
    >>> block_width(4, 2, 65536), block_width(4, 2, 1024), block_width(2, 2, 10**6)
    (16384, None, None)
    >>> block_width(4096, 3, 64)   # fewer channels than ranks: padded blocks of 1
    1
    """
    if size < 3 or size * k * c * 8 < OWNER_MIN_BYTES:
        return None
    return -(-c // size)


def pack(record, size: int, b: int, *, xp):
    """``(k, C)`` record -> ``(P, k, b)``: row ``j`` holds owner ``j``'s channels (a new array)."""
    k, c = record.shape
    if size * b > c:
        edge = xp.broadcast_to(record[:, c - 1 :], (k, size * b - c))
        record = xp.concat([record, edge], axis=1)
    blocks = xp.permute_dims(xp.reshape(record, (k, size, b)), (1, 0, 2))
    return xp.reshape(xp.reshape(blocks, (-1,)), (size, k, b))  # flattening copies: contiguous


def unpack(parts, c: int, *, xp):
    """``(P, k_out, b)`` owners' parts -> the ``(k_out, C)`` result."""
    size, k_out, b = parts.shape
    return xp.reshape(xp.permute_dims(parts, (1, 0, 2)), (k_out, size * b))[:, :c]
