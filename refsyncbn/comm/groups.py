"""MindSpore-style process groups: validation and communicator splitting."""

from __future__ import annotations

import hashlib
import numbers

from .agreement import agree

__all__ = ["group_comm", "validate_process_groups"]


def validate_process_groups(process_groups, world_size: int) -> list[list[int]]:
    """Check ``process_groups`` against MindSpore's rules and return it as lists.

    Parameters
    ----------
    process_groups : list of list of int
        Disjoint groups of world ranks, each rank in ``[0, world_size)``.
    world_size : int
        Number of ranks in the parent communicator.

    Raises
    ------
    TypeError
        If ``process_groups`` or one of its groups is not a list, or a rank is
        not an int.
    ValueError
        If a group is empty, a rank is out of range or a rank appears twice.

    Examples
    --------
    >>> validate_process_groups([[0, 2], [1, 3]], 4)
    [[0, 2], [1, 3]]
    """
    if not isinstance(process_groups, list):
        msg = (
            f"process_groups is a {type(process_groups).__name__}; expected a list "
            f"of lists of int ranks, e.g. [[0, 1], [2, 3]]"
        )
        raise TypeError(msg)
    seen: dict[int, int] = {}
    for g, group in enumerate(process_groups):
        if not isinstance(group, list):
            msg = f"process_groups[{g}] is a {type(group).__name__}; expected a list of int ranks"
            raise TypeError(msg)
        if not group:
            msg = f"process_groups[{g}] is empty; every group needs at least one rank"
            raise ValueError(msg)
        for rank in group:
            if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
                msg = f"process_groups[{g}] holds {rank!r}; expected int ranks"
                raise TypeError(msg)
            if not 0 <= rank < world_size:
                msg = (
                    f"process_groups[{g}] holds rank {rank}; expected ranks in "
                    f"[0, {world_size}) for a world of size {world_size}"
                )
                raise ValueError(msg)
            if int(rank) in seen:
                where = (
                    f"twice in group {g}"
                    if seen[int(rank)] == g
                    else f"in group {seen[int(rank)]} and group {g}"
                )
                msg = f"process_groups: rank {rank} is {where}; each rank may appear once only"
                raise ValueError(msg)
            seen[int(rank)] = g
    return [[int(r) for r in group] for group in process_groups]


def group_comm(comm, process_groups):
    """Sub-communicator of ``comm`` holding this rank's group.

    Collective over ``comm``: every rank must call it with the same spec.
    Before ``split`` the ranks agree (one tiny collective, ``comm.agreement``)
    on a digest of the normalized spec and on each rank's validation outcome,
    so a spec that differs between ranks, an invalid spec or a rank in no
    group raises ``ValueError`` on every rank (``TypeError`` on a rank whose
    own spec has the wrong types) instead of splitting into groups the ranks
    disagree about. With ``process_groups=None`` the result is ``comm``
    itself (after the same agreement: a rank passing ``None`` while the others
    pass groups is caught too).

    Examples
    --------
    >>> from refsyncbn.comm import SimulatedWorld
    >>> def sizes(comm):
    ...     return group_comm(comm, [[0], [1, 2]]).size
    >>> SimulatedWorld(3).run(sizes)
    [1, 2, 2]
    """
    groups, color, error = None, None, None
    if process_groups is not None:
        try:
            groups = validate_process_groups(process_groups, comm.size)
        except (TypeError, ValueError) as exc:
            error = exc
    if groups is not None:
        color = next((g for g, group in enumerate(groups) if comm.rank in group), None)
        if color is None:
            msg = (
                f"rank {comm.rank} is in no group of process_groups={groups}; every rank "
                f"that runs SyncBatchNorm must belong to exactly one group"
            )
            error = ValueError(msg)
    own = _digest(groups)

    def describe(field, code):
        if code == own:
            return f"process_groups={groups}"
        return f"another process_groups (digest {code:#x})"

    agree(comm, "group_comm", error, {"process_groups": own}, describe)
    if groups is None:
        return comm
    return comm.split(color, comm.rank)


def _digest(groups) -> int:
    """A 62-bit digest of a normalized spec (0 for ``None``)."""
    if groups is None:
        return 0
    return (
        int.from_bytes(hashlib.blake2b(repr(groups).encode(), digest_size=8).digest(), "big") >> 2
        or 1
    )
