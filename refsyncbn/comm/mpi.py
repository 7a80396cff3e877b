"""MPIComm: the Communicator protocol over an mpi4py intracommunicator.

mpi4py is imported only when an MPIComm is made, so ``import refsyncbn``
never initializes MPI; CuPy is never imported here (a CuPy array is recognised
through ``sys.modules``).

Bitwise-identical results on every rank
---------------------------------------
The protocol promises every rank the same bytes. MPI does not: the standard
only *recommends* that a reduction give the same result on every process, and
the algorithm an implementation picks (recursive doubling, Rabenseifner,
topology-aware or hardware-offloaded trees) depends on the message size, the
node layout and tuning variables. MPICH 5.0 at our sizes happens to be
consistent (measured at 2, 3 and 4 ranks on packed buffers of 4 to 8194
float64: identical bytes on every rank in 600 of 600 trials), but at 4 ranks it
sums ``(x0 + x1) + (x2 + x3)``, so its result already depends on the world
layout, and Intel MPI (without ``I_MPI_CBWR``) or hierarchical collectives may
hand different ranks different last bits. A reference implementation cannot
rest on that, so floating-point combinations are done in a FIXED ORDER:

* ``combine`` (the functional core's data path): owner-computes on 3 or more
  ranks for records of 1 MiB or more gathered (``_plan``): an ``Ialltoall`` hands owner ``j`` its
  block of channels from every rank, owner ``j`` applies the rank-ordered
  per-channel function, an ``Iallgather`` shares the parts. Each rank receives
  about ``(k + k_out) * C`` float64 whatever ``P`` (the all-gather receives
  ``P * k * C``). Smaller records: one ``Iallgather`` and the function on the
  whole stack on every rank. Both give the same bytes on every rank, and the
  same bytes as :class:`~refsyncbn.comm.SimulatedWorld`, which uses the same
  blocks and owners;
* float ``allreduce_sum`` (tests, checker, generic users): an ``Iallgather``
  and ``((b0 + b1) + b2) + ...`` in rank order on every rank;
* integer buffers (agreement, error tables): one ``Iallreduce``; integer sums
  and minima are exact in any order.

Every collective is nonblocking and completed under the communicator's
deadline (``timeout=``, ``REFSYNCBN_TIMEOUT``, default 600 s; see
``_watchdog``): a rank that never arrives makes the others raise
:class:`~refsyncbn.comm.CollectiveTimeout` instead of hanging. Measured costs:
docs/protocol.md.

Device buffers
--------------
Arrays exposing ``__cuda_array_interface__`` (CuPy and others) go to MPI as
device buffers when MPI is CUDA-aware: detected through the MPI 4.1 info key
``mpi_memory_alloc_kinds`` of the communicator (a ``cuda`` or ``cuda:device``
kind), or forced with the environment variable ``REFSYNCBN_CUDA_AWARE_MPI=1``
(``0`` forces host staging and silences the warning). For CuPy the current
stream is synchronized first; other exporters must have finished writing the
buffer (mpi4py's rule). Without CUDA-aware MPI the buffer is copied to host
memory, reduced there and copied back, with a one-time
:class:`HostStagingWarning`. Arrays of other libraries on other devices
(array-api-strict's virtual devices, ...) are staged through host memory
silently; the result comes back on the buffer's device.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from .._xp import device_of, is_cupy_array, to_numpy
from ._plan import block_width, pack, unpack
from ._watchdog import CollectiveTimeout, resolve_timeout, wait

__all__ = [
    "CUDA_AWARE_ENV",
    "DEFAULT_TIMEOUT_S",
    "HostStagingWarning",
    "MPIComm",
    "default_comm",
    "launched_by_mpiexec",
]

DEFAULT_TIMEOUT_S = 600.0
"""Deadline of an MPI collective when neither ``timeout=`` nor ``$REFSYNCBN_TIMEOUT`` is set."""

CUDA_AWARE_ENV = "REFSYNCBN_CUDA_AWARE_MPI"
_INT_DTYPES = ("int32", "int64")
_FLOAT_DTYPES = ("float32", "float64")

# Environment variables set on every rank by common launchers (MPICH/Hydra,
# Open MPI, Intel MPI, Slurm's srun with PMI/PMIx).
_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")

_staging_warned = False


class HostStagingWarning(RuntimeWarning):
    """A device buffer was copied through host memory because MPI is not CUDA-aware."""


def launched_by_mpiexec() -> bool:
    """True when this process was started by an MPI launcher."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def lists_cuda_device_memory(alloc_kinds: str | None) -> bool:
    """True when an ``mpi_memory_alloc_kinds`` value includes CUDA device memory.

    Examples
    --------
    >>> lists_cuda_device_memory("mpi,system,cuda:device,cuda:host")
    True
    >>> lists_cuda_device_memory("mpi,system")
    False
    """
    kinds = [k.strip().split(":") for k in (alloc_kinds or "").split(",")]
    return any(k[0] == "cuda" and (len(k) == 1 or "device" in k[1:]) for k in kinds)


class MPIComm:
    """A Communicator over an mpi4py communicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        The communicator to use. It is cloned once (``Idup``) so that library
        traffic never mixes with the caller's; default: a clone of
        ``COMM_WORLD``.
    timeout : float, optional
        Deadline of every collective in seconds (``math.inf``: none); default
        ``$REFSYNCBN_TIMEOUT``, else ``DEFAULT_TIMEOUT_S`` (600 s).

    Notes
    -----
    Every collective is nonblocking MPI completed by a test loop with backoff
    (``_watchdog.wait``); past the deadline it raises
    :class:`~refsyncbn.comm.CollectiveTimeout` and the communicator is unusable.
    ``allreduce_min`` (the agreement) and integer ``allreduce_sum`` are one
    ``Iallreduce``; float ``allreduce_sum`` is an ``Iallgather`` and a
    rank-ordered sum; ``combine`` is owner-computes (``Ialltoall`` +
    ``Iallgather``, see ``_plan``) or, for small records, one ``Iallgather``.
    See the module docstring for device buffers.
    """

    def __init__(self, comm=None, *, timeout=None, _owned=None, _name=None):
        from mpi4py import MPI

        self._mpi = MPI
        self.timeout = resolve_timeout(timeout, DEFAULT_TIMEOUT_S, "MPIComm")
        self._broken = None
        self._last = "no agreement yet"
        if _owned is not None:
            self._comm, self.name = _owned, _name
        else:
            parent = MPI.COMM_WORLD if comm is None else comm
            self.name = f"a clone of {parent.Get_name() or 'the caller communicator'}"
            self.rank, self.size = parent.Get_rank(), parent.Get_size()
            self._comm, request = parent.Idup()
            self._wait(request, "MPIComm() (duplicating the communicator)")
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._cuda_aware = None

    @property
    def mpi_comm(self):
        """The library's own (cloned) mpi4py communicator."""
        return self._comm

    @property
    def cuda_aware(self) -> bool:
        """Whether device buffers go to MPI directly (env override, else detected)."""
        if self._cuda_aware is None:
            forced = os.environ.get(CUDA_AWARE_ENV)
            if forced is None:
                info = self._comm.Get_info()
                try:
                    self._cuda_aware = lists_cuda_device_memory(info.Get("mpi_memory_alloc_kinds"))
                finally:
                    info.Free()
            elif forced in ("0", "1"):
                self._cuda_aware = forced == "1"
            else:
                msg = (
                    f"MPIComm.allreduce_sum: {CUDA_AWARE_ENV} is {forced!r}; expected 1 (MPI "
                    f"is CUDA-aware: hand it device buffers) or 0 (stage through host memory)"
                )
                raise ValueError(msg)
        return self._cuda_aware

    def allreduce_min(self, buf, /, *, what):
        """Element-wise minimum of the 1-D int64 host ``buf`` over all ranks (the agreement).

        ``what`` names the call in a timeout message and in later ones.
        """
        out = np.array(buf, dtype=np.int64)
        self._last = what
        request = self._comm.Iallreduce(self._mpi.IN_PLACE, out, op=self._mpi.MIN)
        self._wait(request, f"{what} (agreement)")
        return out

    def allreduce_sum(self, buf, /, *, xp):
        """Element-wise sum of the 1-D ``buf`` over all ranks, the same bytes on every rank.

        Integer buffers are reduced in place (``buf`` is overwritten when it is
        a NumPy or device array); the result keeps ``buf``'s type and device.
        """
        if getattr(buf, "ndim", None) != 1:
            msg = (
                f"MPIComm.allreduce_sum: buf has shape {getattr(buf, 'shape', None)}; "
                f"expected a 1-D packed buffer"
            )
            raise ValueError(msg)
        if isinstance(buf, np.ndarray):
            return self._reduce(np.ascontiguousarray(buf), xp=np)
        if hasattr(buf, "__cuda_array_interface__"):
            if self.cuda_aware:
                if is_cupy_array(buf):
                    sys.modules["cupy"].cuda.get_current_stream().synchronize()
                return self._reduce(buf, xp=xp)
            if os.environ.get(CUDA_AWARE_ENV) is None:
                _warn_staging()
        host = np.array(to_numpy(buf))  # a writable copy: integer buffers reduce in place
        return xp.asarray(self._reduce(host, xp=np), device=device_of(buf))

    def combine(self, record, fn, /, *, xp):
        """``fn`` over every rank's ``(k, C)`` record, the same bytes on every rank.

        Owner-computes when the records are large (``_plan.block_width``):
        ``Ialltoall`` sends owner ``j`` its block of channels of every rank's
        record, owner ``j`` applies ``fn`` to them in rank order, ``Iallgather``
        shares the parts; about ``(k + k_out) * C`` float64 per rank whatever
        the number of ranks. Small records: one ``Iallgather`` of the records
        and ``fn`` on every rank. Device records move as ``allreduce_sum``
        describes (direct when MPI is CUDA-aware, else staged through host memory).
        """
        k, c = record.shape
        what = f"data collective after {self._last}"
        dev = device_of(record)
        on_device = not isinstance(record, np.ndarray) and hasattr(
            record, "__cuda_array_interface__"
        )
        direct = on_device and self.cuda_aware
        if direct:
            if is_cupy_array(record):
                sys.modules["cupy"].cuda.get_current_stream().synchronize()
            bxp, buf = xp, record
        else:
            if on_device and os.environ.get(CUDA_AWARE_ENV) is None:
                _warn_staging()
            bxp, buf = np, np.ascontiguousarray(to_numpy(record), dtype=np.float64)

        def to_xp(a):
            return a if direct or xp is np else xp.asarray(a, device=dev)

        b = block_width(self.size, k, c)
        if b is None:
            gathered = bxp.empty((self.size, k, c), dtype=buf.dtype, device=device_of(buf))
            self._wait(self._comm.Iallgather(buf, gathered), what)
            return fn(to_xp(gathered), xp=xp)
        send = pack(buf, self.size, b, xp=bxp)
        blocks = bxp.empty((self.size, k, b), dtype=buf.dtype, device=device_of(buf))
        self._wait(self._comm.Ialltoall(send, blocks), what)
        part = fn(to_xp(blocks), xp=xp)
        part = part if direct else np.ascontiguousarray(to_numpy(part), dtype=np.float64)
        parts = bxp.empty((self.size, *part.shape), dtype=part.dtype, device=device_of(part))
        self._wait(self._comm.Iallgather(part, parts), what)
        return to_xp(unpack(parts, c, xp=bxp))

    def _reduce(self, buf, *, xp):
        """The one collective on a buffer MPI can read (host, or device when CUDA-aware)."""
        dtype = _buffer_dtype(buf)
        what = f"allreduce_sum after {self._last}"
        if dtype.name in _INT_DTYPES:
            self._wait(self._comm.Iallreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM), what)
            return buf
        if dtype.name not in _FLOAT_DTYPES:
            msg = (
                f"MPIComm.allreduce_sum: buf has dtype {dtype.name}; expected one of "
                f"{', '.join(_FLOAT_DTYPES + _INT_DTYPES)}"
            )
            raise TypeError(msg)
        gathered = xp.empty((self.size, buf.shape[0]), dtype=buf.dtype, device=device_of(buf))
        self._wait(self._comm.Iallgather(buf, gathered), what)
        total = gathered[0, ...]
        for r in range(1, self.size):
            total = total + gathered[r, ...]
        return total

    def split(self, color, key):
        """``MPI_Comm_split`` after an ``Ibarrier`` under the deadline (Split itself blocks)."""
        what = f"split after {self._last}"
        self._wait(self._comm.Ibarrier(), what)
        mpi_color = self._mpi.UNDEFINED if color is None else int(color)
        sub = self._comm.Split(mpi_color, int(key))
        if sub == self._mpi.COMM_NULL:
            return None
        return MPIComm(timeout=self.timeout, _owned=sub, _name=f"{self.name}/split(color={color})")

    def free(self) -> None:
        """Release the underlying MPI communicator (collective; the object is unusable after)."""
        self._comm.Free()

    def _wait(self, request, what: str) -> None:
        """Complete ``request`` within the deadline, else raise CollectiveTimeout (and stay broken)."""
        if self._broken is not None:
            msg = f"{self._broken}; this communicator is unusable after a timeout"
            raise CollectiveTimeout(msg)

        def expired():
            self._broken = (
                f"MPIComm: {what} did not complete within {self.timeout:g} s on "
                f"{self.name} (rank {self.rank} of {self.size}); some rank never "
                f"made this call or is in another collective (MPI cannot tell which "
                f"rank; REFSYNCBN_TIMEOUT or MPIComm(timeout=) sets the deadline)"
            )
            return self._broken

        wait(request, self.timeout, expired)

    def __repr__(self):
        return f"<MPIComm rank {self.rank} of {self.size}>"


def _buffer_dtype(buf) -> np.dtype:
    """NumPy dtype of a host array or of a ``__cuda_array_interface__`` exporter."""
    if isinstance(buf, np.ndarray) or is_cupy_array(buf):
        return buf.dtype
    return np.dtype(buf.__cuda_array_interface__["typestr"])


def _warn_staging() -> None:
    """Warn, once per process, that device buffers are staged through host memory."""
    global _staging_warned
    if _staging_warned:
        return
    _staging_warned = True
    msg = (
        f"MPIComm.allreduce_sum: MPI does not report CUDA-aware support, so device "
        f"buffers are copied through host memory. If your MPI is CUDA-aware, set "
        f"{CUDA_AWARE_ENV}=1 to hand it device buffers directly; set "
        f"{CUDA_AWARE_ENV}=0 to keep staging and silence this warning."
    )
    warnings.warn(msg, HostStagingWarning, stacklevel=3)


_DEFAULT = None


def default_comm():
    """The communicator used when none is given.

    Under an MPI launcher (``mpiexec``/``srun``): one MPIComm cloned from
    ``COMM_WORLD``, made once and reused. Otherwise a one-rank LocalComm.
    """
    global _DEFAULT
    if _DEFAULT is None:
        if launched_by_mpiexec():
            _DEFAULT = MPIComm()
        else:
            from .local import LocalComm

            _DEFAULT = LocalComm()
    return _DEFAULT
