"""MPIComm buffer paths, run under ``mpiexec -n K python -m mpi4py tests/mpi/mpi_buffers.py``.

``host``: NumPy float/int buffers (fixed-order sums), unsupported buffers,
array-api-strict arrays on a non-default device (staged through host memory),
a host array exposing only ``__cuda_array_interface__`` (mpi4py's
FakeGPUArrayNumPy trick: the device pass-through path without a GPU) and a
stand-in ``cupy`` module (stream synchronization, staging, warn-once).
``cupy``: the same with real CuPy arrays (needs CuPy and a CUDA device).
Expectations are written in terms of rank and size; every rank prints
``OK buffers`` or its failures, and all ranks exit 1 if any rank failed.
"""

from __future__ import annotations

import functools
import os
import sys
import types
import warnings

import numpy as np


def _buffer(rank):
    """Rank ``rank``'s float64 buffer: rank order changes the rounded sum."""
    return np.array([1e16 if rank == 0 else 1.0, 0.1 * (rank + 1), -(2.0**-rank)])


def _ordered_sum(size):
    """The rank-ordered sum ``((b0 + b1) + b2) + ...`` every rank must get, bitwise."""
    return functools.reduce(lambda a, b: a + b, [_buffer(r) for r in range(size)])


class FakeGPUArray:
    """Host memory seen only through ``__cuda_array_interface__`` (no buffer protocol)."""

    device = "fake-gpu"

    def __init__(self, host):
        self._host = np.ascontiguousarray(host)

    shape = property(lambda self: self._host.shape)
    ndim = property(lambda self: self._host.ndim)
    dtype = property(lambda self: self._host.dtype)

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self._host.shape,
            "typestr": self._host.dtype.str,
            "data": (self._host.ctypes.data, False),
            "strides": None,
            "version": 3,
            "stream": None,
        }

    def __getitem__(self, key):
        return type(self)(self._host[key])

    def __add__(self, other):
        return type(self)(self._host + other._host)

    def get(self):
        return self._host.copy()


def _fake_namespace(cls):
    """The few array-API functions MPIComm calls on device arrays, for ``cls``."""
    return types.SimpleNamespace(
        empty=lambda shape, dtype, device: cls(np.empty(shape, dtype)),
        asarray=lambda a, device: cls(np.asarray(a)),
        concat=lambda arrays, axis: cls(np.concatenate([a._host for a in arrays], axis=axis)),
        broadcast_to=lambda a, shape: cls(np.broadcast_to(a._host, shape)),
        permute_dims=lambda a, axes: cls(np.transpose(a._host, axes)),
        reshape=lambda a, shape: cls(np.reshape(a._host, shape)),
    )


def _ordered_fn(records, *, xp):
    """``combine`` fn: the rank-ordered sum of the records (works on FakeGPUArray too)."""
    total = records[0, ...]
    for r in range(1, records.shape[0]):
        total = total + records[r, ...]
    return total


def check_device_combine(v, comm, fake_xp):
    """CUDA-aware ``combine`` hands MPI the device records on both paths (gather, owner)."""
    from refsyncbn.comm._plan import block_width

    for c in (5, 30011):  # all-gather; owner-computes (3 ranks) with a padded last block
        rng = np.random.default_rng(c + comm.rank)
        record = rng.standard_normal((2, c)) * 10.0 ** (4 * comm.rank)
        want = _ordered_fn(np.stack(comm.mpi_comm.allgather(record)), xp=np)
        got = comm.combine(FakeGPUArray(record), _ordered_fn, xp=fake_xp)
        path = "gather" if block_width(comm.size, 2, c) is None else "owner"
        v.expect(
            isinstance(got, FakeGPUArray) and got.get().tobytes() == want.tobytes(),
            f"pass-through combine, C = {c} ({path} path)",
        )


def _set_env(value):
    from refsyncbn.comm.mpi import CUDA_AWARE_ENV

    if value is None:
        os.environ.pop(CUDA_AWARE_ENV, None)
    else:
        os.environ[CUDA_AWARE_ENV] = value


def check_host(v):
    import array_api_strict as xps

    from refsyncbn.comm import MPIComm

    comm = MPIComm()
    rank, size = comm.rank, comm.size
    want = _ordered_sum(size)

    got = comm.allreduce_sum(_buffer(rank), xp=np)
    v.expect(
        got.tobytes() == want.tobytes(),
        f"float64 sum {got.tolist()} != rank-ordered {want.tolist()}",
    )
    got32 = comm.allreduce_sum(np.full(2, rank + 0.5, np.float32), xp=np)
    v.expect(
        got32.dtype == np.float32 and np.all(got32 == size * size / 2), f"float32 sum {got32!r}"
    )
    ints = np.array([rank, 2**40 + rank], np.int64)
    out = comm.allreduce_sum(ints.copy(), xp=np)
    exact = np.array([size * (size - 1) // 2, size * 2**40 + size * (size - 1) // 2])
    v.expect(np.array_equal(out, exact) and out.dtype == np.int64, f"int64 sum {out!r}")

    for bad in (np.zeros(2, np.complex128), np.zeros(2, bool), np.zeros(2, np.uint8)):
        v.raises(
            TypeError,
            f"MPIComm.allreduce_sum: buf has dtype {bad.dtype.name}; expected",
            lambda b=bad: comm.allreduce_sum(b, xp=np),
            f"dtype {bad.dtype}",
        )
    v.raises(
        ValueError,
        "MPIComm.allreduce_sum: buf has shape (2, 2); expected a 1-D",
        lambda: comm.allreduce_sum(np.zeros((2, 2)), xp=np),
        "2-D buffer",
    )

    dev = xps.Device("device1")
    for host, expect in ((_buffer(rank), want), (ints, exact)):
        arr = xps.asarray(host, device=dev)
        res = comm.allreduce_sum(arr, xp=xps)
        v.expect(res.device == dev, f"strict result on {res.device}, expected {dev}")
        back = np.asarray(res.to_device(xps.Device("CPU_DEVICE")))
        v.expect(
            back.tobytes() == np.asarray(expect, host.dtype).tobytes(),
            f"strict {host.dtype} sum {back!r}",
        )

    # Device pass-through (CUDA-aware forced): MPI reads and writes through the
    # interface; FakeGPUArray has no buffer protocol and no DLPack, so it
    # cannot have been staged.
    fake_xp = _fake_namespace(FakeGPUArray)
    _set_env("1")
    aware = MPIComm()
    got = aware.allreduce_sum(FakeGPUArray(_buffer(rank)), xp=fake_xp)
    v.expect(
        isinstance(got, FakeGPUArray) and got.get().tobytes() == want.tobytes(),
        f"pass-through float64 gave {got!r}",
    )
    check_device_combine(v, aware, fake_xp)
    dev_ints = FakeGPUArray(ints.copy())
    got = aware.allreduce_sum(dev_ints, xp=fake_xp)
    v.expect(
        got is dev_ints and np.array_equal(got.get(), exact),
        "pass-through int64 is not the in-place reduced device buffer",
    )
    _set_env("maybe")
    v.raises(
        ValueError,
        "MPIComm.allreduce_sum: REFSYNCBN_CUDA_AWARE_MPI is 'maybe'; expected 1",
        lambda: MPIComm().allreduce_sum(FakeGPUArray(_buffer(rank)), xp=fake_xp),
        "bad env value",
    )
    check_fake_cupy(v, comm, want)


def check_fake_cupy(v, comm, want):
    """CuPy-specific steps with a stand-in ``cupy`` module (is_cupy_array uses sys.modules)."""
    from refsyncbn.comm import MPIComm, mpi

    class FakeCupyArray(FakeGPUArray):
        pass

    syncs = []
    stream = types.SimpleNamespace(synchronize=lambda: syncs.append(1))
    fake = types.ModuleType("cupy")
    fake.ndarray = FakeCupyArray
    fake.cuda = types.SimpleNamespace(get_current_stream=lambda: stream)
    sys.modules["cupy"] = fake
    fxp = _fake_namespace(FakeCupyArray)
    rank = comm.rank
    try:
        _set_env("1")
        got = MPIComm().allreduce_sum(FakeCupyArray(_buffer(rank)), xp=fxp)
        v.expect(syncs == [1], f"CUDA-aware path synchronized the stream {len(syncs)} times")
        v.expect(got.get().tobytes() == want.tobytes(), "CUDA-aware CuPy sum")

        _set_env(None)  # MPICH here lists no CUDA memory kind: staged, warned once
        plain = MPIComm()
        v.expect(not plain.cuda_aware, "MPI without CUDA support detected as CUDA-aware")
        mpi._staging_warned = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = plain.allreduce_sum(FakeCupyArray(_buffer(rank)), xp=fxp)
            plain.allreduce_sum(FakeCupyArray(_buffer(rank)), xp=fxp)
        staged = [w for w in caught if issubclass(w.category, mpi.HostStagingWarning)]
        v.expect(len(staged) == 1, f"{len(staged)} staging warnings for 2 calls, expected 1")
        text = str(staged[0].message) if staged else ""
        v.expect(
            "REFSYNCBN_CUDA_AWARE_MPI=1" in text
            and "REFSYNCBN_CUDA_AWARE_MPI=0" in text
            and "silence" in text,
            f"warning does not say how to enable/silence: {text!r}",
        )
        v.expect(
            isinstance(first, FakeCupyArray) and first.get().tobytes() == want.tobytes(),
            "staged CuPy result",
        )
        v.expect(syncs == [1], "staging synchronized a stream")

        _set_env("0")  # staging chosen explicitly: silent
        mpi._staging_warned = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = MPIComm().allreduce_sum(FakeCupyArray(_buffer(rank)), xp=fxp)
        v.expect(not caught, f"REFSYNCBN_CUDA_AWARE_MPI=0 still warned: {caught}")
        v.expect(got.get().tobytes() == want.tobytes(), "explicitly staged CuPy result")
        record = np.random.default_rng(rank).standard_normal((2, 30011))
        whole = _ordered_fn(np.stack(comm.mpi_comm.allgather(record)), xp=np)
        got = MPIComm().combine(FakeCupyArray(record), _ordered_fn, xp=fxp)
        v.expect(
            isinstance(got, FakeCupyArray) and got.get().tobytes() == whole.tobytes(),
            "staged CuPy combine (owner-computes on host, fn on the device)",
        )
    finally:
        del sys.modules["cupy"]
        _set_env(None)


def check_cupy(v):
    """Real CuPy arrays on the GPU: staged (env 0) and, if the MPI allows, CUDA-aware."""
    import cupy
    from array_api_compat import cupy as cxp

    from refsyncbn.comm import MPIComm

    comm = MPIComm()
    want = _ordered_sum(comm.size)
    _set_env("0")
    got = MPIComm().allreduce_sum(cupy.asarray(_buffer(comm.rank)), xp=cxp)
    v.expect(
        isinstance(got, cupy.ndarray) and got.get().tobytes() == want.tobytes(), "staged CuPy sum"
    )
    _set_env(None)
    if comm.cuda_aware:
        got = comm.allreduce_sum(cupy.asarray(_buffer(comm.rank)), xp=cxp)
        v.expect(got.get().tobytes() == want.tobytes(), "CUDA-aware CuPy sum")


def main(mode):
    sys.path.insert(0, os.path.dirname(__file__))
    from _collective import Verdict

    v = Verdict(f"buffers-{mode}")
    {"host": check_host, "cupy": check_cupy}[mode](v)
    return v.finish()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
