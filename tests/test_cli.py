"""The command line as a user meets it: one-line errors, confirmations, progress, help.

Every failure is ONE line on stderr, ``refsyncbn COMMAND: error: ...``, naming
the argument or file and what was expected, with a non-zero exit status and no
traceback (``--debug`` shows it). Most tests call :func:`refsyncbn.cli.main`
in-process; one runs ``python -m refsyncbn`` and one ``mpiexec``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _mpirun import ROOT, mpirun

from refsyncbn import cli
from refsyncbn.cases import Case, read_result, write_case, write_result
from refsyncbn.cli import bench, selfcheck
from refsyncbn.cli._common import Progress, one_line
from refsyncbn.comm import RankError
from refsyncbn.comm.simulated import PeerAborted
from refsyncbn.testing.oracle import expected_outputs


def _case():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 2)) * 2 + 1
    return Case(
        x=x,
        dy=rng.standard_normal(x.shape),
        weight=np.ones(2),
        bias=np.zeros(2),
        running_mean=np.zeros(2),
        running_var=np.ones(2),
        splits=(2, 3),
        data_format="NC",
    )


@pytest.fixture
def case_file(tmp_path):
    path = tmp_path / "case.npz"
    write_case(path, _case())
    return path


@pytest.fixture
def truncated(tmp_path, case_file):
    path = tmp_path / "truncated.npz"
    path.write_bytes(case_file.read_bytes()[:200])
    return path


def _fails_in_one_line(capsys, argv, status, *needles):
    """``main(argv)`` returns ``status`` and prints one stderr line holding ``needles``."""
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"refsyncbn {argv[0]}: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def _usage_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


class TestRunErrors:
    def test_a_truncated_case_file_is_named(self, capsys, truncated, tmp_path):
        _fails_in_one_line(
            capsys,
            ["run", str(truncated), str(tmp_path / "o"), "--world", "2"],
            1,
            str(truncated),
            "not a readable .npz case file",
        )
        assert not (tmp_path / "o").exists()

    def test_an_out_dir_that_is_a_file_is_rejected_before_computing(
        self, capsys, case_file, tmp_path, monkeypatch
    ):
        (tmp_path / "taken").write_text("")
        monkeypatch.setattr("refsyncbn.cli.run.run_rank", _must_not_run)
        _fails_in_one_line(
            capsys,
            ["run", str(case_file), str(tmp_path / "taken"), "--world", "2"],
            1,
            f"OUT_DIR {tmp_path / 'taken'}",
            "not a directory",
        )

    @pytest.mark.parametrize("world", ["0", "-1", "two"])
    def test_world_must_be_a_positive_int(self, capsys, case_file, tmp_path, world):
        _usage_error(
            capsys,
            ["run", str(case_file), str(tmp_path), "--world", world],
            "argument --world",
            "expected an int >= 1",
            repr(world),
        )

    @pytest.mark.parametrize(
        ("option", "value", "low"), [("--seed", "-1", 0), ("--cases", "0", 1), ("--world", "0", 1)]
    )
    def test_selfcheck_numbers_are_checked_by_name(self, capsys, option, value, low):
        _usage_error(
            capsys, ["selfcheck", option, value], f"argument {option}", f"expected an int >= {low}"
        )

    def test_the_wrong_world_size_says_which_to_use(self, capsys, case_file, tmp_path):
        _fails_in_one_line(
            capsys,
            ["run", str(case_file), str(tmp_path / "o"), "--world", "3"],
            1,
            "splits for 2 ranks",
            "--world 2",
        )


def _must_not_run(*args, **kwargs):
    raise AssertionError("computed before the arguments were checked")


class TestRunConfirmsWhatItWrote:
    def test_simulated_world(self, capsys, case_file, tmp_path):
        out = tmp_path / "new" / "out"
        assert cli.main(["run", str(case_file), str(out), "--world", "2"]) == 0
        stdout = capsys.readouterr().out
        assert stdout.strip().splitlines() == [
            f"refsyncbn run: wrote rank0.npz .. rank1.npz in {out} (2 ranks; y, running_mean, "
            f"running_var, dx, dweight, dbias)"
        ]
        expected = expected_outputs(_case(), param_grads="local")
        for r in range(2):
            np.testing.assert_allclose(
                read_result(out / f"rank{r}.npz")["y"], expected[r]["y"], rtol=1e-12, atol=1e-12
            )

    @pytest.mark.mpi
    def test_under_mpiexec_rank_0_prints_one_line(self, case_file, tmp_path):
        proc = mpirun(2, "-m", "refsyncbn", "run", str(case_file), str(tmp_path / "o"), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines() == [
            f"refsyncbn run: wrote rank0.npz .. rank1.npz in {tmp_path / 'o'} (2 ranks; y, "
            f"running_mean, running_var, dx, dweight, dbias)"
        ], proc.stdout
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["rank0.npz", "rank1.npz"]


class TestCheckErrors:
    def test_a_missing_candidate_dir_is_one_line(self, capsys, tmp_path):
        (tmp_path / "cases").mkdir()
        _fails_in_one_line(
            capsys,
            ["check", str(tmp_path / "missing"), str(tmp_path / "cases")],
            2,
            f"CANDIDATE_DIR {tmp_path / 'missing'}",
            "not a directory",
        )

    def test_a_missing_cases_dir_is_one_line(self, capsys, tmp_path):
        _fails_in_one_line(
            capsys,
            ["check", str(tmp_path), str(tmp_path / "nope")],
            2,
            f"CASES_DIR {tmp_path / 'nope'}",
        )

    def test_a_truncated_rank_file_is_named(self, capsys, tmp_path, case_file):
        cases, cand = tmp_path / "cases", tmp_path / "cand" / "case"
        cases.mkdir()
        cand.mkdir(parents=True)
        case_file.rename(cases / "case.npz")
        expected = expected_outputs(_case(), param_grads="local")
        write_result(cand / "rank0.npz", **{k: expected[0][k] for k in ("y", "running_mean")})
        (cand / "rank1.npz").write_bytes((cand / "rank0.npz").read_bytes()[:100])
        _fails_in_one_line(
            capsys,
            ["check", str(tmp_path / "cand"), str(cases)],
            2,
            str(cand / "rank1.npz"),
            "not a readable .npz result file",
        )


class TestDebugAndInternalErrors:
    def test_debug_shows_the_traceback_instead(self, truncated, tmp_path):
        with pytest.raises(ValueError, match=r"not a readable \.npz case file"):
            cli.main(["run", str(truncated), str(tmp_path / "o"), "--world", "2", "--debug"])

    def test_an_internal_error_is_one_line_asking_for_a_report(
        self, capsys, case_file, tmp_path, monkeypatch
    ):
        def bug(*args, **kwargs):
            raise KeyError("y")

        monkeypatch.setattr("refsyncbn.cli.run.read_case", bug)
        line = _fails_in_one_line(
            capsys,
            ["run", str(case_file), str(tmp_path), "--world", "1"],
            1,
            "KeyError: 'y'",
            "internal error",
            "--debug",
        )
        with pytest.raises(KeyError):
            cli.main(["run", str(case_file), str(tmp_path), "--world", "1", "--debug"])
        assert "Traceback" not in line

    def test_rank_errors_give_each_cause_once(self):
        exc = RankError(
            {0: ValueError("bad x"), 1: PeerAborted("peer failed"), 2: ValueError("bad x")}
        )
        assert one_line(exc) == "bad x"

    def test_the_real_entry_point_prints_no_traceback(self, truncated, tmp_path):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "refsyncbn",
                "run",
                str(truncated),
                str(tmp_path / "o"),
                "--world",
                "2",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={"PYTHONPATH": str(ROOT), "PATH": ""},
        )
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


class TestHelp:
    def test_top_level_help_has_no_rest_markup(self, capsys):
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out and ":class:" not in out
        for name in cli._COMMANDS:
            assert name in out

    def test_every_command_offers_debug(self, capsys):
        for name in cli._COMMANDS:
            with pytest.raises(SystemExit):
                cli.main([name, "--help"])
            assert "--debug" in capsys.readouterr().out, name

    def test_a_missing_command_is_one_line(self, capsys):
        _usage_error(capsys, [], "required: COMMAND", "refsyncbn --help")


class TestProgress:
    def test_plain_text_without_tqdm(self, monkeypatch, capsys):
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
        with Progress(25, "demo", "case") as bar:
            for _ in range(25):
                bar.update()
        lines = capsys.readouterr().err.splitlines()
        # A line per tenth (every 2 cases of 25) and the last one.
        assert [ln.split(" (")[0] for ln in lines] == [
            f"demo: {k}/25 cases" for k in (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25)
        ]

    def test_disabled_progress_prints_nothing(self, monkeypatch, capsys):
        monkeypatch.setitem(sys.modules, "tqdm", None)
        with Progress(3, "demo", "case", enabled=False) as bar:
            bar.update()
        assert capsys.readouterr().err == ""

    def test_selfcheck_reports_progress_on_stderr_and_the_report_on_stdout(
        self, monkeypatch, capsys
    ):
        monkeypatch.setitem(sys.modules, "tqdm", None)
        assert cli.main(["selfcheck", "--world", "2", "--cases", "3"]) == 0
        captured = capsys.readouterr()
        assert captured.err.splitlines()[-1].startswith("selfcheck: 3/3 cases")
        assert captured.out.startswith("refsyncbn selfcheck: 2 simulated ranks")


class TestSelfcheckJudgesWithTheErrorModel:
    def test_the_report_names_the_error_model_in_one_header_line(self, capsys):
        assert cli.main(["selfcheck", "--world", "2", "--cases", "2"]) == 0
        out = capsys.readouterr().out.splitlines()
        headers = [ln for ln in out if ln.startswith("error model: ")]
        assert len(headers) == 1 and len(headers[0]) <= 140, headers
        assert "ErrorModel('float64', 'stable', 'pairwise')" in headers[0]
        assert selfcheck.MODEL == selfcheck.ErrorModel("float64")

    def test_the_report_names_the_kernels_and_shows_the_large_offsets(self, capsys, monkeypatch):
        monkeypatch.setenv("REFSYNCBN_BACKEND", "numpy")
        assert cli.main(["selfcheck", "--world", "2", "--cases", "12"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert next(ln for ln in out if ln.startswith("kernels: ")).startswith("kernels: numpy (")
        col = out.index(next(ln for ln in out if ln.startswith("case "))) + 1
        offsets = [float(ln.split()[-7]) for ln in out[col : col + 12]]
        assert max(offsets) >= 1e6 and min(offsets) < 1e3  # both regimes are in the run

    def test_large_offset_cancellation_fails(self):
        # mean 1e6, std ~1: E[x^2] - E[x]^2 in float64 loses ~12 digits of the
        # variance; the old scaled metric (1e-12 * kappa with kappa = 1e12)
        # accepted it, the error model's float64 bound does not.
        rng = np.random.default_rng(0)
        x = 1e6 + rng.standard_normal((64, 2))
        case = Case(
            x=x, running_mean=np.zeros(2), running_var=np.ones(2), splits=(64,), data_format="NC"
        )
        want = expected_outputs(case, param_grads="local")[0]
        assert selfcheck.case_error(case, 0, dict(want), want) == (0.0, "y")
        mean = x.sum(axis=0) / 64
        naive_var = (x * x).sum(axis=0) / 64 - mean * mean
        naive = dict(want, y=(x - mean) / np.sqrt(naive_var + case.eps))
        assert np.abs(naive["y"] - want["y"]).max() > 1e-7  # premise: it is wrong
        err, key = selfcheck.case_error(case, 0, naive, want)
        assert err > 1e3 and key == "y"

    @pytest.mark.parametrize("dtype", [np.float64, np.float32])
    def test_both_sides_of_the_bound(self, dtype):
        case = next(
            c
            for c in selfcheck.build_cases(2, 14, seed=3)
            if c.x.dtype == dtype and c.training and c.splits[0] > 1
        )
        want = expected_outputs(case, param_grads="local")[0]
        bound = selfcheck.MODEL.bounds(case, param_grads="local")[0]["y"]
        for factor, passes in ((0.9, True), (1.1, False)):
            got = dict(want, y=want["y"] + factor * bound)
            err, key = selfcheck.case_error(case, 0, got, want)
            assert (err <= 1) is passes, (factor, err, key)
        # The float64 bound of y is a few u64 per unit of magnitude, not 1e-12.
        if dtype == np.float64:
            scale = 1 + np.abs(want["y"]).max()
            assert bound.max() < 1e-13 * scale


class TestBench:
    def test_says_why_a_column_is_missing(self):
        import argparse

        args = argparse.Namespace(no_torch=False, no_single=False)
        assert bench.missing_columns(args, 1, None) == [
            "n/a torch ms, ratio: torch is not installed (pip install torch)",
            "n/a 1-process ms, scaling: one rank (the 1-process run is the run itself)",
        ]
        assert bench.missing_columns(args, 2, "2.13.0") == []
        args = argparse.Namespace(no_torch=True, no_single=True)
        assert bench.missing_columns(args, 2, "2.13.0") == [
            "n/a torch ms, ratio: --no-torch",
            "n/a 1-process ms, scaling: --no-single",
        ]

    def test_a_bad_repeat_is_one_line(self, capsys):
        _fails_in_one_line(capsys, ["bench", "--repeat", "0"], 1, "--repeat is 0")
