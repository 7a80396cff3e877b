"""The conformance suite run by ``pytest --refsyncbn-candidate=MODULE:FUNCTION``.

Collected only through :mod:`refsyncbn.testing.plugin`: every probe case of
:func:`~refsyncbn.testing.probe_cases` must be within the error model's
bound on every rank and output, and every convention trait of the
fingerprint must be the expected preset's.
"""

from __future__ import annotations

import pytest

from ..conventions import get_convention
from .checker import check, probe_cases
from .tolerances import ErrorModel

_TRAITS = (
    "momentum_meaning",
    "running_var",
    "weighting",
    "param_grads",
    "eps_placement",
    "eps_value",
    "empty_rank",
)


@pytest.fixture(scope="session")
def refsyncbn_report(request):
    """The :class:`~refsyncbn.testing.CheckReport` of the candidate (computed once)."""
    config = request.config
    model = ErrorModel(
        config.getoption("refsyncbn_accumulation"), config.getoption("refsyncbn_variance")
    )
    return check(
        config.refsyncbn_candidate,
        expect=config.getoption("refsyncbn_expect"),
        model=model,
        global_batch=config.getoption("refsyncbn_global_batch"),
    )


@pytest.mark.parametrize("probe", sorted(probe_cases()))
def test_probe_within_the_error_bound(refsyncbn_report, probe):
    if probe in refsyncbn_report.errors:
        pytest.fail(refsyncbn_report.errors[probe], pytrace=False)
    failed = sorted(
        (c for c in refsyncbn_report.checks[probe] if not c.passed), key=lambda c: -c.ratio
    )
    if failed:
        lines = [f"{len(failed)} output(s) outside the bound ({refsyncbn_report.model}):"]
        pytest.fail("\n".join(lines + [f"  {c.describe()}" for c in failed]), pytrace=False)


@pytest.mark.parametrize("trait", _TRAITS)
def test_convention_trait(refsyncbn_report, request, trait):
    conv = get_convention(request.config.getoption("refsyncbn_expect"))
    want = {"eps_placement": "inside_sqrt", "eps_value": "as given"}.get(trait)
    want = getattr(conv, trait) if want is None else want
    got = refsyncbn_report.fingerprint[trait]
    if got.value not in (want, "n/a"):
        pytest.fail(
            f"{trait} reads {got.value!r}, {conv.name} has {want!r}: {got.evidence}", pytrace=False
        )


def test_variance_is_not_naive_unless_declared(refsyncbn_report, request):
    got = refsyncbn_report.fingerprint["variance"]
    if got.value == "naive" and request.config.getoption("refsyncbn_variance") != "naive":
        pytest.fail(
            f"variance reads 'naive' ({got.evidence}); declare "
            f"--refsyncbn-variance=naive to hold it to the naive allowance",
            pytrace=False,
        )
