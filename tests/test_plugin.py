"""The pytest plugin: ``pytest --refsyncbn-candidate=MODULE:FUNCTION`` runs the suite."""

import configparser
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CANDIDATES = """
import dataclasses
import numpy as np
from refsyncbn.conventions import TORCH
from refsyncbn.testing import reference_candidate

good = reference_candidate("torch")
biased = reference_candidate(dataclasses.replace(TORCH, running_var="biased"))
not_callable = 3
"""


# Installed (pip install -e .), pytest loads the plugin through its pytest11 entry
# point, and naming it again with -p would register it twice; from a plain
# checkout it has to be named.
_INSTALLED = any(
    ep.value == "refsyncbn.testing.plugin"
    for ep in importlib.metadata.entry_points(group="pytest11")
)
_LOAD = [] if _INSTALLED else ["-p", "refsyncbn.testing.plugin"]


def _pytest(tmp_path, *args):
    (tmp_path / "cands.py").write_text(CANDIDATES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", *_LOAD, "-p", "no:cacheprovider", "-q", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_conforming_candidate_passes_the_suite(tmp_path):
    proc = _pytest(tmp_path, "--refsyncbn-candidate=cands:good", "--refsyncbn-expect=torch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "17 passed" in proc.stdout  # 9 probes, 7 convention traits, the variance


def test_a_planted_bug_fails_the_tests_that_name_it(tmp_path):
    proc = _pytest(tmp_path, "--refsyncbn-candidate=cands:biased", "--refsyncbn-expect=torch")
    assert proc.returncode == 1
    failed = {
        line.split(" - ")[0].split("::")[-1]
        for line in proc.stdout.splitlines()
        if line.startswith("FAILED")
    }
    assert "test_convention_trait[running_var]" in failed
    assert "test_probe_within_the_error_bound[running_stats]" in failed
    assert "test_convention_trait[weighting]" not in failed
    assert "running_var reads 'biased', torch has 'unbiased_global'" in proc.stdout


def test_without_the_option_the_plugin_changes_nothing(tmp_path):
    (tmp_path / "test_mine.py").write_text("def test_one():\n    assert True\n")
    proc = _pytest(tmp_path, "test_mine.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "refsyncbn" not in proc.stdout


def test_a_bad_candidate_is_one_clear_usage_error(tmp_path):
    for spec, words in (
        ("cands", "expected MODULE:FUNCTION"),
        ("cands:missing", "cannot load it"),
        ("cands:not_callable", "names a int, not a callable"),
    ):
        proc = _pytest(tmp_path, f"--refsyncbn-candidate={spec}")
        assert proc.returncode == 4, proc.stdout + proc.stderr
        assert f"--refsyncbn-candidate is {spec!r}; " in proc.stderr and words in proc.stderr
    proc = _pytest(tmp_path, "--refsyncbn-candidate=cands:good", "--refsyncbn-expect=tf")
    assert proc.returncode == 4 and "--refsyncbn-expect is 'tf'" in proc.stderr


def test_registered_as_a_pytest11_entry_point_without_hypothesis():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    entry = cfg["options.entry_points"]["pytest11"].strip()
    assert entry == "refsyncbn = refsyncbn.testing.plugin"
    code = (
        "import sys; import refsyncbn.testing.plugin; "
        "print('hypothesis' in sys.modules, 'pytest' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout.split() == ["False", "False"]
