"""Collective verdicts for scripts run under ``mpiexec``: a failure on one rank fails all."""

from __future__ import annotations


class Verdict:
    """Collects this rank's failed expectations; :meth:`finish` decides for every rank."""

    def __init__(self, name: str):
        from mpi4py import MPI

        self.name = name
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.failures: list[str] = []

    def expect(self, ok, what: str) -> None:
        """Record ``what`` as a failure on this rank unless ``ok``."""
        if not ok:
            self.failures.append(what)

    def raises(self, exc_type, needle: str, fn, what: str) -> str:
        """Expect ``fn()`` to raise ``exc_type`` with ``needle`` in its message; the message."""
        try:
            fn()
        except exc_type as exc:
            self.expect(needle in str(exc), f"{what}: message {str(exc)!r} lacks {needle!r}")
            return str(exc)
        except Exception as exc:  # reported as a failure
            self.failures.append(
                f"{what}: raised {type(exc).__name__}: {exc}, expected {exc_type.__name__}"
            )
            return str(exc)
        self.failures.append(f"{what}: raised nothing, expected {exc_type.__name__}")
        return ""

    def finish(self) -> int:
        """Gather every rank's failures; print them; the same exit status on every rank."""
        everyone = self.comm.allgather(self.failures)
        for f in self.failures:
            print(f"FAIL {self.name} rank {self.rank}/{self.size}: {f}", flush=True)
        if any(everyone):
            return 1
        print(f"OK {self.name} rank {self.rank}/{self.size}", flush=True)
        return 0
