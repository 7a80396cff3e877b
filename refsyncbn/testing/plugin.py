"""pytest plugin: ``pytest --refsyncbn-candidate=MODULE:FUNCTION`` runs the conformance suite.

Registered as the ``refsyncbn`` ``pytest11`` entry point (setup.cfg), so an
installed refsyncbn offers it in every pytest run; without
``--refsyncbn-candidate`` it only adds its options and changes nothing.
With it, the given paths are replaced by :mod:`refsyncbn.testing.suite`: one
test per probe case (accuracy under the :class:`~refsyncbn.testing.ErrorModel`
bound) and one per convention trait of the expected preset, run against the
callable ``FUNCTION`` of ``MODULE`` (the :class:`~refsyncbn.testing.Candidate`
protocol). array-api-tests' ``ARRAY_API_TESTS_MODULE`` is the model.

Without installing refsyncbn, load it by name: ``pytest -p refsyncbn.testing.plugin
--refsyncbn-candidate=...``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

_SUITE = Path(__file__).with_name("suite.py")


def pytest_addoption(parser):
    """The ``--refsyncbn-*`` options."""
    group = parser.getgroup("refsyncbn", "SyncBatchNorm conformance suite (refsyncbn)")
    group.addoption(
        "--refsyncbn-candidate",
        metavar="MODULE:FUNCTION",
        default=None,
        help="run the refsyncbn conformance suite against this callable "
        "(refsyncbn.testing.Candidate protocol) instead of the given paths",
    )
    group.addoption(
        "--refsyncbn-expect",
        metavar="PRESET",
        default="reference",
        help="the convention the candidate follows (a refsyncbn preset name; default: reference)",
    )
    group.addoption(
        "--refsyncbn-variance",
        default="stable",
        choices=("stable", "two_pass", "naive"),
        help="the candidate's variance algorithm for the error model "
        "(naive: an E[x^2] - E[x]^2 allowance)",
    )
    group.addoption(
        "--refsyncbn-accumulation",
        default=None,
        choices=("float64", "float32", "bfloat16", "float16"),
        help="the candidate's accumulation precision (default: the data's, at least float32)",
    )
    group.addoption(
        "--refsyncbn-global-batch",
        action="store_true",
        help="the candidate is a single-process, global-batch implementation",
    )


def load_candidate(spec: str):
    """The callable named by ``"module:function"`` (``function`` may be dotted)."""
    import pytest

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        msg = f"--refsyncbn-candidate is {spec!r}; expected MODULE:FUNCTION"
        raise pytest.UsageError(msg)
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        msg = f"--refsyncbn-candidate is {spec!r}; cannot load it: {exc}"
        raise pytest.UsageError(msg) from None
    if not callable(obj):
        msg = f"--refsyncbn-candidate is {spec!r}; it names a {type(obj).__name__}, not a callable"
        raise pytest.UsageError(msg)
    return obj


def pytest_configure(config):
    """With ``--refsyncbn-candidate``: validate it and collect the suite instead of the paths."""
    spec = config.getoption("refsyncbn_candidate")
    if spec is None:
        return
    import pytest

    from ..conventions import CONVENTIONS

    expect = config.getoption("refsyncbn_expect")
    if expect not in CONVENTIONS:
        msg = f"--refsyncbn-expect is {expect!r}; expected one of {', '.join(CONVENTIONS)}"
        raise pytest.UsageError(msg)
    config.refsyncbn_candidate = load_candidate(spec)
    config.args[:] = [str(_SUITE)]


def pytest_report_header(config):
    """Which candidate and preset the suite checks."""
    spec = config.getoption("refsyncbn_candidate")
    if spec is None:
        return None
    return (
        f"refsyncbn: conformance suite for {spec} (expect "
        f"{config.getoption('refsyncbn_expect')!r}, variance "
        f"{config.getoption('refsyncbn_variance')!r})"
    )
