"""Real multi-process SyncBatchNorm: ``mpiexec -n K`` (K = 1..4) under a timeout.

The per-rank checks live in ``tests/mpi/*.py``; they assert collectively (a
failure on one rank fails every rank) and print ``OK NAME rank R/K`` per rank.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from _mpirun import ROOT, mpirun

from refsyncbn.cases import Case, read_result, write_case
from refsyncbn.cli.run import add_arguments as run_arguments
from refsyncbn.cli.run import main as run_main
from refsyncbn.testing.oracle import expected_outputs

pytestmark = pytest.mark.mpi


def _assert_ok(proc, name, n):
    """Exit status 0 and an ``OK name`` line from each of the ``n`` ranks.

    mpiexec forwards the ranks' output concurrently, so lines of different
    ranks may run together: look for substrings, not whole lines.
    """
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for r in range(n):
        assert f"OK {name} rank {r}/{n}" in out, out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_mpi_equals_simulated_world_equals_oracle_with_bitwise_identical_statistics(n):
    _assert_ok(mpirun(n, "tests/mpi/mpi_syncbn.py"), "syncbn", n)


def test_buffer_paths_numpy_strict_devices_and_cuda_array_interface():
    _assert_ok(mpirun(3, "tests/mpi/mpi_buffers.py", "host"), "buffers-host", 3)


def _cupy_with_device() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver or no device
        return False


@pytest.mark.skipif(not _cupy_with_device(), reason="needs CuPy and a CUDA device")
def test_cupy_buffers_staged_and_cuda_aware():
    _assert_ok(mpirun(2, "tests/mpi/mpi_buffers.py", "cupy"), "buffers-cupy", 2)


class TestFailureInjection:
    def test_a_bad_input_on_one_rank_raises_a_clear_error_on_every_rank(self):
        n = 3
        proc = mpirun(n, "tests/mpi/mpi_inject.py", "agree", timeout=60)
        _assert_ok(proc, "inject", n)
        out = proc.stdout
        for r in range(n):
            for scenario in ("channels", "dtype", "shape", "dy-shape"):
                assert re.search(rf"rank {r} {scenario}: ValueError: \S", out), out
            assert (
                f"rank {r} channels: ValueError: forward: rank 2 passed 4 channels, rank 0 "
                f"passed 3 channels" in out
            )
            assert f"rank {r} nan: no exception" in out
        assert "rank 2 shape: ValueError: x has shape (3, 3, 2) (3-D)" in out
        assert "rank 0 shape: ValueError: forward: rank(s) [2] of the group rejected" in out

    def test_a_rank_raising_before_the_call_aborts_the_job_without_orphans(self):
        token = f"refsyncbn-orphan-check-{uuid.uuid4().hex}"
        proc = mpirun(3, "tests/mpi/mpi_inject.py", "raise", token, timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert "RuntimeError: user code failed on rank 2 before calling forward" in out, out
        assert "returned from forward" not in out, out
        deadline = time.monotonic() + 15  # the launcher's kills take a moment to land
        while (left := _processes_with(token)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"orphan ranks still running: {left}"


class TestDivergence:
    """The issue's divergences under ``mpiexec -n 3``: every rank raises, well within a timeout."""

    def test_eval_twice_groups_and_convention_deviations_raise_on_every_rank(self):
        proc = mpirun(3, "tests/mpi/mpi_diverge.py", "diverge", timeout=60)
        _assert_ok(proc, "diverge", 3)
        for r in range(3):
            for scenario in ("eval", "forward-twice", "groups", "convention"):
                assert re.search(rf"rank {r} {scenario}: ValueError: \S", proc.stdout), proc.stdout
        assert (
            "rank 0 forward-twice: ValueError: backward: rank 1 is in forward(training=False) "
            "call #2, rank 0 in backward call #1" in proc.stdout
        )
        assert (
            "rank 1 groups: ValueError: group_comm: rank 1 passed process_groups=[[0, 1], "
            "[2]], rank 0 passed another process_groups" in proc.stdout
        )
        assert (
            "rank 2 groups: ValueError: group_comm: rank 1 passed another process_groups "
            "(digest 0x" in proc.stdout
        )

    def test_a_rank_that_never_calls_aborts_the_job_with_the_deadline_message(self):
        # The last rank sleeps 120 s: only the abort can end the job within mpirun's 60 s.
        proc = mpirun(3, "tests/mpi/mpi_diverge.py", "timeout", timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert (
            "CollectiveTimeout: MPIComm: forward(training=True) call #1 (agreement) did not "
            "complete within 2 s on a clone of MPI_COMM_WORLD" in out
        ), out
        assert "returned from forward" not in out, out

    @pytest.mark.parametrize("n", [2, 3, 4])
    def test_owner_computes_combine_is_bitwise_the_rank_ordered_function(self, n):
        proc = mpirun(n, "tests/mpi/mpi_diverge.py", "combine", timeout=90)
        _assert_ok(proc, "combine", n)
        owner = "owner" if n >= 3 else "gather"  # two ranks: the all-gather moves no more
        assert f"combine C=44000 path={owner}: bitwise equal" in proc.stdout
        assert "combine C=2 path=gather: bitwise equal" in proc.stdout


def _processes_with(token):
    """``ps`` lines of the processes whose command line contains ``token``."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if token in line]


def _cli_case(splits=(3, 0, 2, 4), groups=((0,), (1, 2, 3))):
    """Uneven splits with an empty rank, ragged groups, affine, dy, NHWC."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((sum(splits), 2, 3, 3)) * 3 + 1
    return Case(
        x=x,
        dy=rng.standard_normal(x.shape),
        weight=rng.uniform(0.5, 2, 3),
        bias=rng.standard_normal(3),
        running_mean=np.zeros(3),
        running_var=np.ones(3),
        splits=splits,
        data_format="NHWC",
        convention="torch",
        momentum=0.1,
        groups=None if groups is None else [list(g) for g in groups],
    )


def _check_outputs(case, out_dir):
    expected = expected_outputs(case, param_grads="local")
    for r in range(case.world_size):
        got = read_result(out_dir / f"rank{r}.npz")
        assert sorted(got) == ["dbias", "dweight", "dx", "running_mean", "running_var", "y"]
        for key, value in got.items():
            assert value.dtype == case.x.dtype
            np.testing.assert_allclose(
                value, expected[r][key], rtol=1e-10, atol=1e-10, err_msg=f"rank {r} {key}"
            )
    return [read_result(out_dir / f"rank{r}.npz") for r in range(case.world_size)]


class TestCommandLine:
    def test_run_under_mpiexec_and_in_process_match_the_oracle_and_each_other(self, tmp_path):
        case = _cli_case()
        write_case(tmp_path / "case.npz", case)
        proc = mpirun(
            4, "-m", "refsyncbn", "run", str(tmp_path / "case.npz"), str(tmp_path / "mpi")
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        mpi = _check_outputs(case, tmp_path / "mpi")
        args = _parse_run([str(tmp_path / "case.npz"), str(tmp_path / "sim"), "--world", "4"])
        assert run_main(args) == 0
        sim = _check_outputs(case, tmp_path / "sim")
        for a, b in zip(mpi, sim, strict=True):
            assert all(a[k].tobytes() == b[k].tobytes() for k in a)

    def test_run_with_the_wrong_world_size_fails_on_every_rank(self, tmp_path):
        write_case(tmp_path / "case.npz", _cli_case())
        proc = mpirun(
            3,
            "-m",
            "refsyncbn",
            "run",
            str(tmp_path / "case.npz"),
            str(tmp_path / "out"),
            timeout=60,
        )
        assert proc.returncode != 0
        for r in range(3):
            assert (
                f"rank {r} of 3: error: the case has splits for 4 ranks but the world has "
                f"3" in proc.stderr
            ), proc.stderr
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("splits", np.array([[1, 2]])),
            ("data_format", np.str_("NCWH")),
            ("schema", np.str_("refsyncbn case v0")),
            ("x", None),
        ],
    )
    def test_a_bad_case_file_names_the_key(self, tmp_path, capsys, key, value):
        write_case(tmp_path / "case.npz", _cli_case(splits=(3, 2), groups=None))
        with np.load(tmp_path / "case.npz") as f:
            data = {k: f[k] for k in f.files if k != key}
        if value is not None:
            data[key] = value
        np.savez(tmp_path / "bad.npz", **data)
        argv = [str(tmp_path / "bad.npz"), str(tmp_path / "o"), "--world", "2"]
        assert run_main(_parse_run(argv)) == 1
        assert f"key '{key}'" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()

    def test_a_bad_case_file_under_mpiexec_fails_on_every_rank(self, tmp_path):
        (tmp_path / "bad.npz").write_bytes(b"not an npz file")
        proc = mpirun(
            2,
            "-m",
            "refsyncbn",
            "run",
            str(tmp_path / "bad.npz"),
            str(tmp_path / "out"),
            timeout=60,
        )
        assert proc.returncode != 0
        for r in range(2):
            assert f"refsyncbn run: rank {r} of 2: error:" in proc.stderr, proc.stderr

    @pytest.mark.parametrize("n", [1, 3])
    def test_selfcheck_passes_and_prints_the_report(self, n):
        proc = mpirun(n, "-m", "refsyncbn", "selfcheck", "--cases", "28", timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert out.count("refsyncbn selfcheck:") == 1  # rank 0 reports
        assert f"{n} MPI rank" in out
        assert "PASSED: all 28 cases within tolerance" in out
        assert len(re.findall(r"^ +\d+ +N\w+ +\w+ +float(32|64) .* ok$", out, re.M)) == 28


def _parse_run(argv):
    import argparse

    parser = argparse.ArgumentParser()
    run_arguments(parser)
    return parser.parse_args(argv)


def test_selfcheck_detects_a_wrong_output():
    from refsyncbn.cli.selfcheck import build_cases, case_error

    case = next(c for c in build_cases(2, 14, seed=1) if c.training and c.splits[0])
    expected = expected_outputs(case, param_grads="local")[0]
    outputs = {
        k: expected[k] for k in ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
    }
    assert case_error(case, 0, outputs, expected)[0] == 0.0
    outputs["running_var"] = expected["running_var"] * (1 + 1e-6)
    err, key = case_error(case, 0, outputs, expected)
    assert err > 1
    assert key == "running_var"


def test_importing_the_run_and_selfcheck_commands_loads_no_mpi4py():
    code = (
        "import sys, refsyncbn.cli.run, refsyncbn.cli.selfcheck; "
        "print('mpi4py' in sys.modules, 'cupy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.split() == ["False", "False"]
