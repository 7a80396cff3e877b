"""The implementation checker: passes the reference, catches and names planted bugs."""

import argparse
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from _candidates import lowprec_candidate, torch_global_candidate, zoo_candidate
from _mpirun import mpirun

from refsyncbn import SimulatedWorld
from refsyncbn.cases import read_case, run_rank, write_result
from refsyncbn.comm import LocalComm
from refsyncbn.conventions import CONVENTIONS, REFERENCE, TORCH
from refsyncbn.testing import checker
from refsyncbn.testing.checker import check, probe_cases, reference_candidate, write_probes
from refsyncbn.testing.tolerances import ErrorModel
from refsyncbn.testing.vectors import write_vectors


def _values(report):
    return {k: t.value for k, t in report.fingerprint.items()}


def _failed(report):
    return {c.quantity for cs in report.checks.values() for c in cs if not c.passed}


def _expected_traits(conv):
    return {
        "momentum_meaning": conv.momentum_meaning,
        "running_var": conv.running_var,
        "weighting": conv.weighting,
        "param_grads": conv.param_grads,
        "eps_placement": "inside_sqrt",
        "eps_value": "as given",
        "variance": "cancellation-free",
        "empty_rank": conv.empty_rank,
    }


class TestReference:
    @pytest.mark.parametrize("name", list(CONVENTIONS))
    def test_passes_and_is_fingerprinted_as_its_convention(self, name):
        report = check(reference_candidate(name), expect=name)
        assert report.passed, str(report)
        assert _values(report) == _expected_traits(CONVENTIONS[name])
        assert name in report.presets

    def test_naive_variance_reference_passes_at_the_probes_conditioning(self):
        # float64 E[x^2] - E[x]^2 cancels only far beyond the probes' |mean| / std
        report = check(reference_candidate(variance="naive"))
        assert report.passed and report.fingerprint["variance"].value == "cancellation-free"

    def test_report_text_has_verdict_and_fingerprint(self):
        text = str(check(reference_candidate("paddle"), expect="paddle"))
        assert "verdict: PASS: 108 of 108 outputs within the bound" in text
        assert "consistent with presets: paddle\n" in text  # flax: an empty device gives NaN
        assert "weighting         equal" in text


WRONG = [
    # (bug, candidate convention, expected convention, trait, named value, failing output)
    (
        "biased where unbiased expected",
        dataclasses.replace(TORCH, running_var="biased"),
        "torch",
        "running_var",
        "biased",
        "running_var",
    ),
    (
        "local correction where global expected",
        dataclasses.replace(TORCH, running_var="unbiased_local"),
        "torch",
        "running_var",
        "unbiased_local",
        "running_var",
    ),
    (
        "equal weighting instead of count",
        dataclasses.replace(REFERENCE, weighting="equal"),
        "reference",
        "weighting",
        "equal",
        "y",
    ),
    (
        "update meaning instead of retain",
        dataclasses.replace(REFERENCE, momentum_meaning="update"),
        "reference",
        "momentum_meaning",
        "update",
        "running_mean",
    ),
    (
        "summed instead of local param grads",
        dataclasses.replace(REFERENCE, param_grads="sum"),
        "reference",
        "param_grads",
        "sum",
        "dbias",
    ),
    (
        "averaged instead of summed param grads",
        dataclasses.replace(CONVENTIONS["mindspore"], param_grads="mean"),
        "mindspore",
        "param_grads",
        "mean",
        "dweight",
    ),
]


class TestPlantedBugs:
    @pytest.mark.parametrize(
        ("bug", "conv", "expect", "trait", "value", "output"), WRONG, ids=[w[0] for w in WRONG]
    )
    def test_convention_bug_is_caught_and_named(self, bug, conv, expect, trait, value, output):
        report = check(reference_candidate(conv), expect=expect)
        assert not report.passed
        assert output in _failed(report)
        traits = _values(report)
        assert traits[trait] == value, report.fingerprint[trait]
        right = _expected_traits(CONVENTIONS[expect])
        assert {k: v for k, v in traits.items() if k != trait} == {
            k: v for k, v in right.items() if k != trait
        }

    def test_float32_sum_of_squares_is_caught_and_named(self):
        report = check(lowprec_candidate("float32", "sumsq"))
        assert not report.passed
        bad = {(name, c.quantity) for name, cs in report.checks.items() for c in cs if not c.passed}
        assert ("cancellation", "y") in bad and ("cancellation", "running_var") in bad
        trait = report.fingerprint["variance"]
        assert trait.value == "naive"
        assert "in ~float32" in trait.evidence
        assert _values(report) == dict(_expected_traits(REFERENCE), variance="naive")

    def test_float32_two_pass_passes_the_default_float32_model(self):
        report = check(lowprec_candidate("float32", "two_pass"))
        assert report.passed, str(report)
        assert _values(report) == _expected_traits(REFERENCE)

    def test_ignoring_the_given_eps_is_named(self):
        base = reference_candidate()

        def fixed_eps(*args, eps, **kwargs):
            return base(*args, eps=1e-3, **kwargs)

        report = check(fixed_eps)
        assert report.fingerprint["eps_placement"].value == "inside_sqrt"
        assert report.fingerprint["eps_value"].value == "0.001"
        assert "y" in _failed(report)

    def test_eps_outside_the_square_root_is_named(self):
        def outside(
            x,
            dy,
            weight,
            bias,
            running_mean,
            running_var,
            *,
            eps,
            momentum,
            training,
            data_format,
            comm,
        ):
            # sqrt(var) + eps = sqrt(var + e') with e' = 2 eps sqrt(var) + eps^2
            rows = x.astype(np.float64)
            n = np.array([len(rows)], np.float64)
            tot = comm.allreduce_sum(np.concatenate([n, rows.sum(0), (rows**2).sum(0)]), xp=np)
            c = x.shape[1]
            mean = tot[1 : 1 + c] / tot[0]
            var = tot[1 + c :] / tot[0] - mean**2
            y = (rows - mean) / (np.sqrt(var) + eps) * weight + bias
            return {"y": y.astype(x.dtype)}

        traits = checker.fingerprint(
            {"eps": probe_cases()["eps"]},
            {"eps": checker.run_candidate(outside, probe_cases()["eps"])},
        )
        assert traits["eps_placement"].value == "outside_sqrt"
        assert traits["eps_value"].value == "as given"

    def test_unsynchronized_candidate_is_named(self):
        base = reference_candidate()

        def local_only(*args, comm, **kwargs):
            return base(*args, comm=LocalComm(), **kwargs)

        report = check(local_only)
        assert report.fingerprint["weighting"].value == "unsynchronized"
        assert not report.passed

    def test_a_raising_candidate_is_reported_not_fatal(self):
        def broken(x, *args, **kwargs):
            raise RuntimeError("kernel not implemented")

        report = check(broken)
        assert not report.passed
        assert set(report.errors) == set(probe_cases())
        assert "kernel not implemented" in report.errors["eps"]


class TestFrameworkFormulas:
    """The frameworks' own algorithms read as their presets (zoo formulas, tests/_candidates.py)."""

    def test_torch_per_rank_statistics_merged_by_count_read_torch(self):
        torch_like = zoo_candidate(
            stats="two_pass", merge="count", stats_dtype="float64", convention="torch"
        )
        report = check(torch_like, expect="torch")
        assert report.passed, str(report)
        assert report.fingerprint["variance"].value == "per-rank-merged"
        assert report.presets == ("torch",)

    def test_keras_sums_and_squares_read_keras_and_pass_only_the_naive_model(self):
        keras_like = zoo_candidate(stats="naive", merge="count")
        assert not check(keras_like, expect="keras").passed
        report = check(keras_like, expect="keras", model=ErrorModel(variance="naive"))
        assert report.passed, str(report)
        assert report.fingerprint["variance"].value == "naive"
        assert "in ~float32" in report.fingerprint["variance"].evidence
        assert report.presets == ("keras",)

    def test_flax_pmean_of_moments_reads_flax(self):
        flax_like = zoo_candidate(stats="naive", merge="equal", empty="nan")
        report = check(flax_like, expect="flax", model=ErrorModel(variance="naive"))
        assert report.passed, str(report)
        assert report.fingerprint["empty_rank"].value == "nan"
        assert report.presets == ("flax",)

    def test_a_torch_variant_with_its_own_eps_is_not_torch(self):
        base = zoo_candidate(
            stats="two_pass", merge="count", stats_dtype="float64", convention="torch", eps=1e-3
        )
        report = check(base, expect="torch")
        assert report.fingerprint["eps_value"].value == "0.001"
        assert report.presets == ()


def _fingerprint_of(probe, make_y):
    """The traits read from outputs ``y = make_y(x)`` (float64 rows) on one probe."""
    case = probe_cases()[probe]
    y = make_y(np.asarray(case.x, np.float64))
    outs = [{"y": y[slice(*case.bounds(r))]} for r in range(case.world_size)]
    return checker.fingerprint({probe: case}, {probe: outs})


def _normalized(var_factor=1.0, eps=None, centre_shift=0.0, probe="cancellation"):
    """Exact batch norm of the probe (unit affine) with a planted error."""
    case = probe_cases()[probe]
    e = case.eps if eps is None else eps

    def make_y(x):
        mean = x.mean(0) + centre_shift
        return (x - mean) / np.sqrt(x.var(0) * var_factor + e)

    return _fingerprint_of(probe, make_y)


class TestClassifierThresholds:
    """Each fingerprint threshold on both sides: within 3x inside reads one way, 3x out another."""

    def _variance_bounds(self):
        case = probe_cases()["cancellation"]
        x = np.asarray(case.x, np.float64)
        out = {}
        for name in ("two_pass", "stable"):
            model = ErrorModel("float32", name)
            _, d_var = model.statistics_error(
                np.abs(x).mean(0),
                (x * x).mean(0),
                x.mean(0),
                x.var(0),
                len(x),
                u=model.unit(np.float32),
            )
            out[name] = float(np.min(model.safety * d_var / x.var(0)))
        return out

    @pytest.mark.parametrize(
        ("bound", "factor", "value"),
        [
            ("two_pass", 0.3, "cancellation-free"),
            ("two_pass", 3, "per-rank-merged"),
            ("stable", 0.3, "per-rank-merged"),
            ("stable", 3, "naive"),
        ],
    )
    def test_variance(self, bound, factor, value):
        rel = factor * self._variance_bounds()[bound]
        assert _normalized(var_factor=1 + rel)["variance"].value == value

    @pytest.mark.parametrize(("rel", "value"), [(0.005, "as given"), (0.05, "0.00315")])
    def test_eps_value(self, rel, value):
        traits = _normalized(eps=probe_cases()["eps"].eps * (1 + rel), probe="eps")
        assert traits["eps_value"].value == value

    @pytest.mark.parametrize(("share", "value"), [(0.03, "count"), (0.3, "unrecognized")])
    def test_weighting(self, share, value):
        x = np.asarray(probe_cases()["weighting"].x, np.float64)
        splits = probe_cases()["weighting"].splits
        gap = abs(x[:, 0].mean() - np.mean([x[: splits[0], 0].mean(), x[splits[0] :, 0].mean()]))
        traits = _normalized(centre_shift=share * gap, probe="weighting")
        assert traits["weighting"].value == value

    @pytest.mark.parametrize(("share", "value"), [(0.03, "unsynchronized"), (0.3, "unrecognized")])
    def test_unsynchronized(self, share, value):
        case = probe_cases()["weighting"]
        x = np.asarray(case.x, np.float64)
        parts = [x[slice(*case.bounds(r))] for r in range(case.world_size)]
        gap = abs(x[:, 0].mean() - np.mean([p[:, 0].mean() for p in parts]))

        def local(x):  # each rank normalizes with its own statistics, shifted
            return np.concatenate(
                [(p - p.mean(0) - share * gap) / np.sqrt(p.var(0) + case.eps) for p in parts]
            )

        assert _fingerprint_of("weighting", local)["weighting"].value == value

    @pytest.mark.parametrize(("spread", "value"), [(0.005, "inside_sqrt"), (0.1, "unrecognized")])
    def test_eps_placement(self, spread, value):
        case = probe_cases()["eps"]
        eps = case.eps * (1 + spread * np.arange(3))  # a different eps per channel

        def make_y(x):
            return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)

        assert _fingerprint_of("eps", make_y)["eps_placement"].value == value


class TestGlobalBatch:
    def test_reference_on_the_global_batch(self):
        report = check(reference_candidate("keras"), expect="keras", global_batch=True)
        assert report.passed, str(report)
        assert _values(report) == dict(_expected_traits(CONVENTIONS["keras"]), param_grads="n/a")
        assert report.presets == ("reference", "keras")

    @pytest.mark.skipif(
        importlib.util.find_spec("torch") is None, reason="needs torch==2.13.0 (CPU)"
    )
    def test_torch_batch_norm_with_autograd_is_fingerprinted_as_torch(self):
        import torch

        assert torch.__version__.startswith("2.13.0"), "needs torch==2.13.0 (CPU)"
        report = check(torch_global_candidate, expect="torch", global_batch=True)
        assert report.passed, str(report)
        assert _values(report) == dict(_expected_traits(TORCH), param_grads="n/a")
        assert report.presets == ("torch",)


def _reference_outputs_to(case_dir, out_dir):
    """What an external implementation does: every case file -> OUT/<case>/rank{r}.npz."""
    for path in sorted(case_dir.glob("*.npz")):
        case = read_case(path)
        outs = SimulatedWorld(case.world_size).run(lambda comm, c=case: run_rank(c, comm))
        for r, out in enumerate(outs):
            (out_dir / path.stem).mkdir(parents=True, exist_ok=True)
            write_result(out_dir / path.stem / f"rank{r}.npz", **out)


class TestDirectories:
    def test_probe_files_answered_by_the_reference_give_the_same_report(self, tmp_path):
        write_probes(tmp_path / "probes", "torch")
        _reference_outputs_to(tmp_path / "probes", tmp_path / "out")
        from_files = check(tmp_path / "out", tmp_path / "probes")
        direct = check(reference_candidate("torch"), expect="torch")
        assert from_files.passed, str(from_files)
        assert _values(from_files) == _values(direct)

    def test_missing_rank_file_is_an_error(self, tmp_path):
        write_probes(tmp_path / "probes")
        _reference_outputs_to(tmp_path / "probes", tmp_path / "out")
        (tmp_path / "out" / "eps" / "rank1.npz").unlink()
        report = check(tmp_path / "out", tmp_path / "probes")
        assert not report.passed
        assert "rank1.npz" in report.errors["eps"]
        assert report.fingerprint["eps_placement"].value == "not probed"

    def test_directory_candidate_needs_cases_dir(self, tmp_path):
        with pytest.raises(ValueError, match="needs cases_dir"):
            check(tmp_path)


def _cli(*argv):
    parser = argparse.ArgumentParser()
    checker.add_arguments(parser)
    return checker.main(parser.parse_args(list(argv)))


class TestCommandLine:
    def test_write_probes_lists_them_sorted_with_the_next_command(self, tmp_path, capsys):
        assert _cli("--write-probes", str(tmp_path), "--expect", "flax") == 0
        assert sorted(p.stem for p in tmp_path.glob("*.npz")) == sorted(probe_cases())
        assert read_case(tmp_path / "eps.npz").convention == "flax"
        lines = capsys.readouterr().out.splitlines()
        listed = lines[: len(probe_cases())]
        assert listed == sorted(listed) and str(tmp_path / "eps.npz") in listed
        assert lines[-1].strip() == (
            f"python -m refsyncbn check {tmp_path.parent / 'outputs'} {tmp_path}"
        )

    def test_golden_vectors_pass_and_a_corrupted_one_fails(self, tmp_path, capsys):
        write_vectors(tmp_path)
        assert _cli(str(tmp_path / "expected"), str(tmp_path / "cases")) == 0
        assert "verdict: PASS" in capsys.readouterr().out
        path = tmp_path / "expected" / "nchw-f32-uneven-paddle" / "rank1.npz"
        with np.load(path) as f:
            data = dict(f)
        data["dx"] = data["dx"] * 1.001
        write_result(path, **data)
        json_path, xml_path = tmp_path / "report.json", tmp_path / "report.xml"
        assert (
            _cli(
                str(tmp_path / "expected"),
                str(tmp_path / "cases"),
                "--json",
                str(json_path),
                "--junit-xml",
                str(xml_path),
            )
            == 1
        )
        out = capsys.readouterr().out.splitlines()
        # one screen: header, the failing case, the passing count, verdict
        assert len(out) == 4, out
        assert re.match(r"FAIL +nchw-f32-uneven-paddle: rank 1, dx, channel \d", out[1])
        assert out[2].startswith("ok    55 case(s)")
        assert out[-1] == "verdict: FAIL: 769 of 770 outputs within the bound"
        report = json.loads(json_path.read_text())
        assert not report["passed"] and not report["cases"]["nchw-f32-uneven-paddle"]["passed"]
        bad = [c for c in report["cases"]["nchw-f32-uneven-paddle"]["checks"] if not c["passed"]]
        assert [(c["rank"], c["quantity"]) for c in bad] == [(1, "dx")] and bad[0]["ratio"] > 1
        suite = ET.parse(xml_path).getroot()
        assert (suite.get("tests"), suite.get("failures")) == ("56", "1")
        failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
        assert failed == ["nchw-f32-uneven-paddle"]

    def test_verbose_lists_every_case_rank_and_output(self, tmp_path, capsys):
        write_vectors(tmp_path)
        assert _cli(str(tmp_path / "expected"), str(tmp_path / "cases"), "-v") == 0
        out = capsys.readouterr().out.splitlines()
        assert sum(line.startswith("ok   ") for line in out) == 770

    def test_summary_caps_the_failing_cases(self):
        report = check(reference_candidate(dataclasses.replace(REFERENCE, weighting="equal")))
        failing = [n for n, cs in report.checks.items() if not all(c.passed for c in cs)]
        assert len(failing) >= 2
        short = report.summary(max_cases=1).splitlines()
        assert sum(line.startswith("FAIL") for line in short) == 1
        assert f"... and {len(failing) - 1} more failing case(s) (-v lists all)" in short

    def test_usage_errors_exit_2(self, tmp_path, capsys):
        assert _cli(str(tmp_path)) == 2
        assert _cli(str(tmp_path), str(tmp_path)) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and "holds no .npz case files" in err[1]


@pytest.mark.mpi
def test_same_fingerprint_under_mpiexec_as_in_a_simulated_world():
    proc = mpirun(2, "tests/mpi/checker_fingerprint.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT "))
    under_mpi = json.loads(line[len("RESULT ") :])
    for name, candidate, expect in (
        ("torch", reference_candidate("torch"), "torch"),
        ("float32_sumsq", lowprec_candidate("float32", "sumsq"), "reference"),
    ):
        report = check(candidate, expect=expect)
        assert under_mpi[name] == {"passed": report.passed, "fingerprint": _values(report)}
    assert under_mpi["torch"]["passed"] and not under_mpi["float32_sumsq"]["passed"]


def test_testing_tools_import_without_hypothesis():
    code = (
        "import sys; sys.modules['hypothesis'] = None; import refsyncbn.testing as t; "
        "import refsyncbn.testing.checker, refsyncbn.testing.tolerances, "
        "refsyncbn.testing.vectors; print(t.check.__name__, t.ErrorModel.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["check", "ErrorModel"]
