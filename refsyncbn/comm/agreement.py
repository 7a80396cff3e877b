"""Agreement before a collective sequence: same call on every rank, or an error on every rank.

Every library collective sequence (forward in training, forward in eval,
backward, group creation) starts with :func:`agree`. Each rank builds a
fixed-size int64 record::

    [operation, sequence, call, failed, field_1, ..., field_16]

``operation`` codes the operation, ``sequence`` counts the agreements made on
this communicator, ``call`` counts the calls of this function (``forward``,
``backward``, ``group_comm``, ...) on it, ``failed``
is this rank's validation outcome, and the fields are the call signature
(floats as their IEEE-754 bit patterns, unused fields zero). ONE
``allreduce_min`` of ``[record, -record]`` gives every rank the minimum and
maximum of each entry: equal means every rank made the same call with the
same signature and no rank failed. Otherwise, and only then, a second
collective gathers the records so every rank names the first rank whose
record differs from rank 0's and the first differing entry. The record has
the same size for every operation, so ranks in different operations still
meet in the same collective and learn about it. A one-rank communicator
skips the agreement.
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import numpy as np

__all__ = ["MAX_FIELDS", "OPERATIONS", "agree", "operation_code"]

OPERATIONS = ("forward(training=True)", "forward(training=False)", "backward", "group_comm")
"""Operations with a fixed code (their index + 1); other names get a 62-bit digest."""

MAX_FIELDS = 16
_HEADER = 4
_calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_calls_lock = threading.Lock()


def operation_code(op: str) -> int:
    """The record's code for ``op``.

    Examples
    --------
    >>> operation_code("backward")
    3
    """
    if op in OPERATIONS:
        return OPERATIONS.index(op) + 1
    return int.from_bytes(hashlib.blake2b(op.encode(), digest_size=8).digest(), "big") >> 2


def agree(comm, op: str, error: BaseException | None, fields=None, describe=None):
    """Check that every rank of ``comm`` makes the same call; raise the same diagnosis on all.

    Collective over ``comm`` (skipped when ``comm.size == 1``): one
    ``comm.allreduce_min`` of ``2 * (4 + MAX_FIELDS)`` int64 when the ranks
    agree, plus one ``allreduce_sum`` of a table of every rank's record when
    they do not.

    Parameters
    ----------
    comm : Communicator
        The ranks that must agree.
    op : str
        The operation (one of ``OPERATIONS`` or any other name); up to its
        first ``(``, the prefix of the error messages.
    error : exception or None
        This rank's own validation problem; re-raised on this rank.
    fields : dict of str to int, optional
        Call signature every rank must pass identically (at most ``MAX_FIELDS``).
    describe : callable, optional
        ``describe(field, code) -> str`` for messages (default ``"field code"``).

    Raises
    ------
    ValueError
        On every rank when the ranks are in different operations or calls
        ("forward: rank 1 is in forward(training=False) call #2, rank 0 in
        backward call #1"), on the other ranks when some rank failed
        (naming it), or on every rank when a field differs ("rank 2 passed 64
        channels, rank 0 passed 32 channels").

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
    fields = fields or {}
    if len(fields) > MAX_FIELDS:
        msg = f"agree: {len(fields)} fields given; expected at most {MAX_FIELDS}"
        raise ValueError(msg)
    if comm.size == 1:
        if error is not None:
            raise error
        return
    sequence, call = _next_call(comm, op)
    record = np.zeros(_HEADER + MAX_FIELDS, dtype=np.int64)
    record[:_HEADER] = [operation_code(op), sequence, call, error is not None]
    record[_HEADER : _HEADER + len(fields)] = list(fields.values())
    both = comm.allreduce_min(np.concatenate([record, -record]), what=f"{op} call #{call}")
    # Every rank holds the same min/max, so every rank takes the same branch below.
    if (both[: record.size] == -both[record.size :]).all():
        if error is not None:
            raise error
        return
    table = np.zeros((comm.size, record.size), dtype=np.int64)
    table[comm.rank] = record
    table = comm.allreduce_sum(table.reshape(-1), xp=np).reshape(comm.size, -1)
    if error is not None:
        raise error
    raise ValueError(_diagnose(table, comm.rank, op, list(fields), describe))


def _next_call(comm, op: str) -> tuple[int, int]:
    """This agreement's sequence number on ``comm`` and the function's call number, from 1.

    Calls are counted per function (``forward`` counts training and eval calls).
    """
    function = op.split("(")[0]
    with _calls_lock:
        counts = _calls.setdefault(comm, {})
        counts[None] = counts.get(None, 0) + 1
        counts[function] = counts.get(function, 0) + 1
        return counts[None], counts[function]


def _diagnose(table, rank: int, op: str, names: list, describe) -> str:
    """The message every rank raises for a table of records that differ."""
    where = op.split("(")[0]  # "forward(training=True)" -> "forward"
    r = int(np.flatnonzero((table != table[0]).any(axis=1))[0])
    own = operation_code(op)

    def name(code):
        known = {operation_code(o): o for o in OPERATIONS}
        return known.get(int(code), op if code == own else "another operation")

    (code_r, seq_r, call_r), (code_0, seq_0, call_0) = table[r, :3], table[0, :3]
    if (code_r, call_r) != (code_0, call_0) or seq_r != seq_0:
        seq = (
            ""
            if (code_r, call_r) != (code_0, call_0)
            else f" (collective sequences #{seq_r} and #{seq_0} on this communicator)"
        )
        return (
            f"{where}: rank {r} is in {name(code_r)} call #{call_r}, rank 0 in "
            f"{name(code_0)} call #{call_0}{seq}; every rank of the group must make the "
            f"same calls in the same order"
        )
    failed = [int(i) for i in np.flatnonzero(table[:, 3])]
    if failed:
        return (
            f"{where}: rank(s) {failed} of the group rejected their own inputs (their "
            f"exceptions say why); rank {rank}'s inputs were valid"
        )
    describe = describe or (lambda field, code: f"{field} {code}")
    j = int(np.flatnonzero(table[r] != table[0])[0]) - _HEADER
    field = names[j]
    return (
        f"{where}: rank {r} passed {describe(field, int(table[r, _HEADER + j]))}, rank 0 "
        f"passed {describe(field, int(table[0, _HEADER + j]))}; every rank of the group "
        f"must agree"
    )
