"""SimulatedWorld: K ranks as K threads of one process, deterministic sums."""

from __future__ import annotations

import threading
import time

import numpy as np

from ._plan import block_width, pack, unpack
from ._watchdog import CollectiveTimeout, resolve_timeout

__all__ = ["DEFAULT_TIMEOUT_S", "PeerAborted", "RankError", "SimulatedWorld"]

DEFAULT_TIMEOUT_S = 60.0
"""Deadline of a simulated collective when neither ``timeout=`` nor ``$REFSYNCBN_TIMEOUT`` is set."""


class RankError(RuntimeError):
    """Raised by :meth:`SimulatedWorld.run` when a simulated rank raised.

    ``errors`` maps each failing rank to its exception; the first failing
    rank's exception is also the ``__cause__``.
    """

    def __init__(self, errors: dict[int, BaseException]):
        self.errors = dict(sorted(errors.items()))
        lines = [f"rank {r}: {type(e).__name__}: {e}" for r, e in self.errors.items()]
        super().__init__("simulated ranks raised:\n  " + "\n  ".join(lines))


class PeerAborted(RuntimeError):
    """Raised in a simulated rank waiting in a collective when another rank failed."""


class _World:
    """State of one run: one condition variable, the deadline, whether a rank has failed."""

    def __init__(self, timeout: float):
        self.cond = threading.Condition()
        self.timeout = timeout
        self.failed = False

    def abort(self):
        with self.cond:
            self.failed = True
            self.cond.notify_all()


class _Group:
    """State shared by the member ranks of one simulated communicator."""

    def __init__(self, size: int, world: _World, name: str):
        self.size = size
        self.world = world
        self.name = name
        self.rounds: dict[int, dict] = {}
        self.next_round = [0] * size

    def exchange(self, rank: int, item, what: str) -> list:
        """Every member posts ``item``; all get the list of items in rank order.

        Rounds are numbered per rank, so a rank that finished a round is never
        disturbed by a failure that happens afterwards. ``what`` names the
        collective in a timeout message.
        """
        world = self.world
        with world.cond:
            k = self.next_round[rank]
            self.next_round[rank] += 1
            entry = self.rounds.setdefault(
                k,
                {
                    "items": [None] * self.size,
                    "arrived": 0,
                    "present": [False] * self.size,
                    "read": 0,
                },
            )
            entry["items"][rank] = item
            entry["present"][rank] = True
            entry["arrived"] += 1
            world.cond.notify_all()
            deadline = time.monotonic() + world.timeout
            while entry["arrived"] < self.size:
                if world.failed:
                    msg = f"rank {rank} left a collective because another rank raised"
                    raise PeerAborted(msg)
                left = deadline - time.monotonic()
                if left <= 0:
                    world.failed = True
                    world.cond.notify_all()
                    missing = [r for r, here in enumerate(entry["present"]) if not here]
                    msg = (
                        f"SimulatedWorld: {what} did not complete within "
                        f"{world.timeout:g} s on {self.name} (rank {rank} of {self.size}): "
                        f"rank(s) {missing} never arrived (REFSYNCBN_TIMEOUT or "
                        f"SimulatedWorld(timeout=) sets the deadline)"
                    )
                    raise CollectiveTimeout(msg)
                world.cond.wait(left)
            entry["read"] += 1
            if entry["read"] == self.size:
                del self.rounds[k]
            return list(entry["items"])


class _SimComm:
    """One rank's handle on a simulated communicator (implements Communicator)."""

    def __init__(self, group: _Group, rank: int):
        self._group = group
        self.rank = rank
        self.size = group.size
        self._last = "no agreement yet"

    def allreduce_min(self, buf, /, *, what):
        self._last = what
        return np.min(np.stack(self._group.exchange(self.rank, buf, f"{what} (agreement)")), axis=0)

    def allreduce_sum(self, buf, /, *, xp):
        bufs = self._group.exchange(self.rank, buf, f"allreduce_sum after {self._last}")
        if any(b.shape != buf.shape for b in bufs):
            shapes = ", ".join(f"rank {r}: {tuple(b.shape)}" for r, b in enumerate(bufs))
            msg = f"SimulatedWorld.allreduce_sum: buffers differ in shape ({shapes})"
            raise ValueError(msg)
        total = bufs[0]
        for b in bufs[1:]:
            total = total + b
        return total

    def combine(self, record, fn, /, *, xp):
        """Same blocks, owners and order as :meth:`MPIComm.combine` (see ``_plan``)."""
        what = f"data collective after {self._last}"
        k, c = record.shape
        b = block_width(self.size, k, c)
        mine = record if b is None else pack(record, self.size, b, xp=xp)
        posted = self._group.exchange(self.rank, (tuple(record.shape), mine), what)
        if any(shape != tuple(record.shape) for shape, _ in posted):
            shapes = ", ".join(f"rank {i}: {shape}" for i, (shape, _) in enumerate(posted))
            msg = f"SimulatedWorld.combine: records differ in shape ({shapes})"
            raise ValueError(msg)
        if b is None:
            return fn(xp.stack([r for _, r in posted]), xp=xp)
        part = fn(xp.stack([p[self.rank, ...] for _, p in posted]), xp=xp)
        return unpack(xp.stack(self._group.exchange(self.rank, part, what)), c, xp=xp)

    def split(self, color, key):
        what = f"split after {self._last}"
        entries = self._group.exchange(self.rank, (color, key, self.rank), what)
        if self.rank == 0:
            children = {}
            for c in sorted({e[0] for e in entries if e[0] is not None}):
                members = sorted((k, r) for col, k, r in entries if col == c)
                group = _Group(
                    len(members), self._group.world, f"{self._group.name}/split(color={c})"
                )
                children[c] = (group, {r: i for i, (_, r) in enumerate(members)})
            self._group.exchange(self.rank, children, what)
        else:
            children = self._group.exchange(self.rank, None, what)[0]
        if color is None:
            return None
        group, new_rank = children[color]
        return _SimComm(group, new_rank[self.rank])

    def __repr__(self):
        return f"<SimulatedWorld comm rank {self.rank} of {self.size}>"


class SimulatedWorld:
    """``size`` ranks run as threads; all-reduce sums buffers in rank order.

    Every rank sees bitwise-identical reduction results (one summation order).
    If any rank raises, ranks waiting in a collective raise
    :class:`PeerAborted` so no rank stays blocked, and :meth:`run` raises
    :class:`RankError` listing every rank's exception. A rank that never joins
    a collective fails the first rank to wait ``timeout`` seconds with
    :class:`~refsyncbn.comm.CollectiveTimeout` naming the collective and the
    ranks that never arrived (the others then raise :class:`PeerAborted`).

    Parameters
    ----------
    size : int
        Number of simulated ranks.
    timeout : float, optional
        Deadline of every collective in seconds; default ``$REFSYNCBN_TIMEOUT``,
        else ``DEFAULT_TIMEOUT_S`` (60 s).

    Examples
    --------
    >>> import numpy as np
    >>> world = SimulatedWorld(3)
    >>> world.run(lambda comm, v: comm.allreduce_sum(np.array([v]), xp=np), [1.0, 2.0, 4.0])
    [array([7.]), array([7.]), array([7.])]
    """

    def __init__(self, size: int, *, timeout: float | None = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            msg = f"size is {size!r}; expected an int >= 1"
            raise ValueError(msg)
        self.size = size
        self.timeout = resolve_timeout(timeout, DEFAULT_TIMEOUT_S, "SimulatedWorld")

    def run(self, fn, shards=None) -> list:
        """Call ``fn(comm, shards[r])`` (or ``fn(comm)``) on every rank; results by rank."""
        if shards is not None and len(shards) != self.size:
            msg = f"shards has {len(shards)} entries; expected one per rank ({self.size})"
            raise ValueError(msg)
        world = _World(self.timeout)
        top = _Group(self.size, world, "the simulated world")
        results: list = [None] * self.size
        errors: dict[int, BaseException] = {}

        def body(rank):
            comm = _SimComm(top, rank)
            try:
                results[rank] = fn(comm) if shards is None else fn(comm, shards[rank])
            except BaseException as exc:  # reported by run(), with every rank's
                errors[rank] = exc
                world.abort()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            original = {r: e for r, e in errors.items() if not isinstance(e, PeerAborted)}
            first = min(original or errors)
            raise RankError(errors) from errors[first]
        return results

    def __repr__(self):
        return f"SimulatedWorld({self.size})"
