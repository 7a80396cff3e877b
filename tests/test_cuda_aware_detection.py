"""Detection of CUDA-aware MPI from the MPI 4.1 info key ``mpi_memory_alloc_kinds``.

A kind is ``name[:restrictor[:restrictor...]]``; a bare ``cuda`` supports every
CUDA restrictor. Device buffers may go to MPI only when ``cuda:device`` memory
is supported: ``cuda:host`` (pinned host memory) alone is not enough.
"""

from __future__ import annotations

import pytest

from refsyncbn.comm.mpi import lists_cuda_device_memory


@pytest.mark.parametrize(
    "kinds",
    [
        "mpi,system,cuda:device",
        "mpi,system,cuda",
        "mpi,cuda:host,cuda:device",
        "mpi, cuda:host:device",
        "cuda:managed:device",
    ],
)
def test_cuda_device_memory_means_cuda_aware(kinds):
    assert lists_cuda_device_memory(kinds)


@pytest.mark.parametrize(
    "kinds",
    [
        None,
        "",
        "mpi,system",
        "mpi,system,cuda:host",
        "cuda:host",
        "cuda:managed",
        "rocm:device",
        "mpi,system,cudax:device",
    ],
)
def test_without_cuda_device_memory_buffers_are_staged(kinds):
    assert not lists_cuda_device_memory(kinds)
