"""Agreement before a collective: a failure on one rank raises on every rank."""

from __future__ import annotations

import numpy as np

__all__ = ["agree"]


def agree(comm, where: str, error: BaseException | None, signature=None, describe=None):
    """Share every rank's outcome (and call signature); raise the same diagnosis on all.

    Collective over ``comm``: ONE all-reduce of a small int64 table on the host,
    a row per rank holding ``[failed, *signature.values()]``. Afterwards every
    rank knows which ranks failed and what each passed, so either all return
    or all raise, and no rank is left waiting in a later collective.

    Parameters
    ----------
    comm : Communicator
        The ranks that must agree.
    where : str
        Prefix of the error messages (the operation).
    error : exception or None
        This rank's own problem; re-raised on this rank.
    signature : dict of str to int, optional
        Call parameters every rank must pass identically (e.g. channel count).
    describe : callable, optional
        ``describe(field, code) -> str`` for messages (default ``"field code"``).

    Raises
    ------
    ValueError
        On the other ranks when some rank failed (naming it), or on every rank
        when a signature entry differs ("rank 2 passed 64 channels, rank 0
        passed 32 channels").

    Examples
    --------
    >>> from refsyncbn.comm import SimulatedWorld
    >>> def step(comm):
    ...     agree(comm, "demo", None, {"channels": 32 if comm.rank == 0 else 64},
    ...           lambda field, code: f"{code} {field}")
    >>> SimulatedWorld(2).run(step)
    Traceback (most recent call last):
    ...
    refsyncbn.comm.simulated.RankError: simulated ranks raised:
      rank 0: ValueError: demo: rank 1 passed 64 channels, rank 0 passed 32 channels; every rank of the group must agree
      rank 1: ValueError: demo: rank 1 passed 64 channels, rank 0 passed 32 channels; every rank of the group must agree
    """
    signature = signature or {}
    describe = describe or (lambda field, code: f"{field} {code}")
    table = np.zeros((comm.size, len(signature) + 1), dtype=np.int64)
    table[comm.rank] = [error is not None, *signature.values()]
    table = comm.allreduce_sum(table.reshape(-1), xp=np).reshape(comm.size, -1)
    if error is not None:
        raise error
    if not table[0, 0] and (table == table[0]).all():
        return  # the common case, one vectorized test: no failure, equal signatures
    failed = [int(r) for r in np.flatnonzero(table[:, 0])]
    if failed:
        msg = (f"{where}: rank(s) {failed} of the group rejected their own inputs (their "
               f"exceptions say why); rank {comm.rank}'s inputs were valid")
        raise ValueError(msg)
    for j, field in enumerate(signature, start=1):
        col = table[:, j]
        odd = np.flatnonzero(col != col[0])
        if odd.size:
            r = int(odd[0])
            msg = (f"{where}: rank {r} passed {describe(field, int(col[r]))}, rank 0 passed "
                   f"{describe(field, int(col[0]))}; every rank of the group must agree")
            raise ValueError(msg)
