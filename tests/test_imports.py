"""Importing refsyncbn loads neither mpi4py nor cupy (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ["mpi4py", "cupy", "torch", "hypothesis"]


def _child(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    "env", [{}, {"PMI_SIZE": "1", "PMI_RANK": "0"}], ids=["plain", "under-a-launcher"]
)
def test_import_refsyncbn_loads_neither_mpi4py_nor_cupy(env):
    code = (
        "import sys, json\n"
        "import refsyncbn, refsyncbn.functional, refsyncbn.comm, refsyncbn.testing.oracle\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    proc = _child(code, **env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_package_works_without_hypothesis():
    # sys.modules[name] = None makes `import name` raise ImportError, as if not installed.
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None\n"
        "import numpy as np, refsyncbn\n"
        "from refsyncbn.testing import expected_outputs\n"
        "import refsyncbn.testing.oracle\n"
        "print(refsyncbn.forward(np.ones((2, 1)), data_format='NC').y.shape)\n"
        "try:\n"
        "    import refsyncbn.testing.strategies\n"
        "except ImportError:\n"
        "    print('strategies need hypothesis')\n"
    )
    proc = _child(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(2,", "1)", "strategies", "need", "hypothesis"]


def test_strategies_load_on_first_use():
    code = (
        "import sys\n"
        "import refsyncbn.testing as t\n"
        "before = 'hypothesis' in sys.modules\n"
        "t.cases\n"
        "print(before, 'hypothesis' in sys.modules)\n"
    )
    proc = _child(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
