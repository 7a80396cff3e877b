"""Layers and compat layers under real mpiexec (K = 1, 3, 4; groups at K = 4)."""

from __future__ import annotations

import pytest

from tests._mpirun import mpirun


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 3, 4])
def test_layers_match_the_oracle_under_mpiexec(n):
    proc = mpirun(n, "tests/mpi/layers_compat.py", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK layers_compat") == n, proc.stdout + proc.stderr
