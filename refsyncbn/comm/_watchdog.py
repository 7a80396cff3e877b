"""Deadlines for blocking collectives: the timeout setting and the wait loop.

Every collective of :class:`~refsyncbn.comm.MPIComm` is started nonblocking
(``Iallreduce``, ``Ialltoall``, ``Iallgather``, ``Ibarrier``) and completed by
:func:`wait`: ``Test`` in a tight loop for the first 100 us (a sleep costs at
least the kernel's ~50 us timer slack, longer than a small collective), then
``Test`` with sleeps in between, starting at 1 us and doubling up to 1 ms, until
the request completes or the communicator's deadline passes. Oversubscribed
ranks thus yield the core instead of spinning like a blocking MPICH call. Expiry raises :class:`CollectiveTimeout`; under
``python -m mpi4py`` the uncaught exception then aborts the whole job.
"""

from __future__ import annotations

import math
import os
import time

__all__ = ["TIMEOUT_ENV", "CollectiveTimeout", "resolve_timeout", "wait"]

TIMEOUT_ENV = "REFSYNCBN_TIMEOUT"
_SPIN_S = 100e-6
_FIRST_SLEEP_S = 1e-6
_MAX_SLEEP_S = 1e-3


class CollectiveTimeout(TimeoutError):
    """A collective did not complete before its communicator's deadline.

    The message names the operation, its call number on the communicator,
    the communicator, and the ranks that had not arrived where that is
    knowable (in :class:`~refsyncbn.comm.SimulatedWorld`; MPI cannot tell).
    """


def resolve_timeout(timeout, default: float, where: str) -> float:
    """Seconds a collective may take: ``timeout``, else ``$REFSYNCBN_TIMEOUT``, else ``default``.

    Examples
    --------
    >>> resolve_timeout(None, 600.0, "MPIComm")
    600.0
    >>> resolve_timeout(0, 600.0, "MPIComm")
    Traceback (most recent call last):
    ...
    ValueError: MPIComm: timeout is 0; expected a number of seconds > 0 (math.inf: no deadline)
    """
    source = "timeout"
    if timeout is None:
        env = os.environ.get(TIMEOUT_ENV)
        if env is None:
            return default
        source, timeout = TIMEOUT_ENV, env
        try:
            timeout = float(env)
        except ValueError:
            timeout = env
    ok = (
        isinstance(timeout, (int, float))
        and not isinstance(timeout, bool)
        and not math.isnan(timeout)
        and timeout > 0
    )
    if not ok:
        msg = (
            f"{where}: {source} is {timeout!r}; expected a number of seconds > 0 "
            f"(math.inf: no deadline)"
        )
        raise ValueError(msg)
    return float(timeout)


def wait(request, timeout: float, describe) -> None:
    """Complete the nonblocking MPI ``request`` or raise ``CollectiveTimeout(describe())``."""
    start = time.monotonic()
    while time.monotonic() - start < _SPIN_S:
        if request.Test():
            return
    deadline = start + timeout
    delay = _FIRST_SLEEP_S
    while not request.Test():
        if time.monotonic() > deadline:
            raise CollectiveTimeout(describe())
        time.sleep(delay)
        delay = min(2 * delay, _MAX_SLEEP_S)
