"""Smoke tests of the benchmark and the small-batch study (tiny sizes, no timing asserts).

Both scripts run under a real ``mpiexec -n 2``; the tests check what they
write (JSON keys, collective counts and bytes, the table, the PNG), never how
fast anything ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
from _mpirun import mpirun

from refsyncbn.cli import bench

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CASES = ("NCHW:5x3x4x4", "NHWC:3x2x2x5")


def _channels(case):
    fmt, shape = bench.parse_case(case)
    return shape[1] if fmt.startswith("NC") else shape[-1]


def _check_results(results, world_size):
    assert [r["data_format"] for r in results] == [c.split(":")[0] for c in CASES]
    for r, case in zip(results, CASES, strict=True):
        assert set(bench.RESULT_KEYS) <= set(r), set(bench.RESULT_KEYS) - set(r)
        assert r["world_size"] == world_size
        c = _channels(case)
        # K > 1: one packed data collective per pass, [n, mean, M2, e] and
        # [sum dy, sum dy*xhat] per channel in float64, and one int64 agreement;
        # one rank: no collective at all
        k = int(world_size > 1)
        assert r["collectives"] == {
            "forward": {"data": k, "agree": k},
            "backward": {"data": k, "agree": k},
        }
        assert r["bytes_per_pass"]["forward"]["data"] == k * 4 * c * 8
        assert r["bytes_per_pass"]["backward"]["data"] == k * 2 * c * 8
        for key in (
            "forward_ms",
            "backward_ms",
            "step_ms",
            "copy_ms",
            "bound_ms",
            "ratio_to_bound",
        ):
            assert r[key] > 0, key
        assert r["backend"] in ("numpy", "numba") and r["calls_per_repetition"] >= 1
        if r["torch_ms"] is not None:
            assert r["ratio_to_torch"] > 0
        assert r["peak_bytes"] > 0
        assert (r["scaling"] is None) == (world_size == 1)


@pytest.mark.mpi
def test_bench_under_mpiexec_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "bench.json"
    args = [a for c in CASES for a in ("--case", c)]
    args += [
        "--repeat",
        "2",
        "--warmup",
        "1",
        "--no-progress",
        "--json",
        str(out),
        "--markdown",
        str(tmp_path / "bench.md"),
    ]
    if HAS_MPL:
        args += ["--plot", str(tmp_path / "bench.png")]
    proc = mpirun(2, "scripts/bench_syncbn.py", *args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["world_size"] == 2
    _check_results(data["results"], world_size=2)
    table = (tmp_path / "bench.md").read_text().splitlines()
    assert len(table) == 2 + len(CASES) and table[0].startswith("| format | shape")
    if HAS_MPL:
        assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
def test_bench_plot_is_a_png(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--case",
            CASES[0],
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--no-torch",
            "--no-progress",
            "--plot",
            str(tmp_path / "b.png"),
        ]
    )
    assert bench.main(args) == 0
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_in_one_process_reports_no_scaling(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = [a for c in CASES for a in ("--case", c)]
    args = parser.parse_args(
        [
            *args,
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--no-progress",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    assert bench.main(args) == 0
    _check_results(json.loads((tmp_path / "b.json").read_text())["results"], world_size=1)
    assert "| NCHW | 5x3x4x4 | float32 | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_bench_runs_and_names_the_forced_backend(tmp_path, backend):
    if backend == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("needs numba")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--case",
            "NCL:4x3x5",
            "--dtype",
            "float64",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--no-torch",
            "--no-progress",
            "--backend",
            backend,
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    assert bench.main(args) == 0
    (result,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert result["backend"] == backend and result["dtype"] == "float64"


@pytest.mark.parametrize("text", ["NCHW:4x3x4", "NXYZ:4x3", "NC:4xa", "NC:0x3"])
def test_bad_case_names_the_expected_form(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected FORMAT:DIMS"):
        bench.parse_case(text)


@pytest.mark.mpi
def test_small_batch_study_under_mpiexec(tmp_path):
    out = tmp_path / "study.json"
    args = ["--batch-sizes", "1,3", "--trials", "2", "--json", str(out)]
    if HAS_MPL:
        args += ["--plot", str(tmp_path / "study.png")]
    proc = mpirun(2, "scripts/small_batch_study.py", *args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    # 2 shifts x world sizes 1..2 x 2 batch sizes x 3 methods
    assert len(rows) == 24
    assert {
        "shift",
        "world_size",
        "batch",
        "method",
        "splits",
        "mean_err",
        "var_err",
        "y_rms",
    } <= set(rows[0])
    for r in rows:
        if r["method"] == "sync" or r["world_size"] == 1:
            assert r["y_rms"] < 1e-12 and r["mean_err"] < 1e-12, r  # exact
        elif r["method"] == "local":
            assert r["y_rms"] > 1e-3, r  # negative control: per-rank BN strays
    if HAS_MPL:
        assert (tmp_path / "study.png").read_bytes()[:8] == PNG_MAGIC
