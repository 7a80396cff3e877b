"""Launch real ``mpiexec -n K`` runs from the test suite, under a timeout.

A run that outlives its timeout is killed with its whole process group (no
orphan ranks) and reported as a failure, so a deadlock fails instead of hanging.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mpiexec_path() -> str:
    """The mpiexec next to this Python (the venv's ``mpich``), else the one on PATH."""
    local = Path(sys.executable).with_name("mpiexec")
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpiexec not found: install the test extra (pip install -e '.[test]')")
    return found


def mpirun(n: int, *args: str, timeout: float = 120.0, cwd=None) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n n python -m mpi4py ARGS`` and return the finished process.

    ``python -m mpi4py`` makes an unhandled exception on any rank abort every
    rank. The output is captured as text. A timeout kills every rank and fails
    the calling test with what the ranks printed so far.
    """
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, "-m", "mpi4py", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"mpiexec -n {n} {' '.join(args)} did not finish within {timeout:.0f} s "
            f"(deadlock?)\nstdout:\n{out}\nstderr:\n{err}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
