"""Tools for validating SyncBatchNorm implementations against the reference.

Plug in your own implementation (a :class:`Candidate`: one rank's forward and
backward synchronizing through ``comm.allreduce_sum``)::

    from refsyncbn.testing import check
    report = check(my_sync_bn, expect="torch")   # probes, accuracy, fingerprint
    print(report)                                 # one-screen summary
    assert report.passed

or from pytest: ``pytest --refsyncbn-candidate=mypackage.module:my_sync_bn``
(:mod:`refsyncbn.testing.plugin`). One array against the oracle:
:func:`assert_output_close`; every output of every rank:
:func:`assert_sync_batch_norm_close`; the bounds: :class:`ErrorModel`.
"""

from .checker import (
    Candidate,
    CheckReport,
    check,
    probe_cases,
    reference_candidate,
    run_candidate,
    write_probes,
)
from .oracle import expected_outputs
from .tolerances import (
    ErrorModel,
    QuantityCheck,
    assert_output_close,
    assert_sync_batch_norm_close,
    compare_outputs,
    unit_roundoff,
)
from .vectors import write_vectors

__all__ = [
    "Candidate",
    "CheckReport",
    "ErrorModel",
    "QuantityCheck",
    "assert_output_close",
    "assert_sync_batch_norm_close",
    "cases",
    "check",
    "compare_outputs",
    "expected_outputs",
    "hard_cases",
    "probe_cases",
    "reference_candidate",
    "run_candidate",
    "unit_roundoff",
    "write_probes",
    "write_vectors",
]

_STRATEGIES = ("cases", "hard_cases")


def __getattr__(name):
    """Hypothesis strategies, imported on first use: hypothesis stays optional."""
    if name in _STRATEGIES:
        from . import strategies

        return getattr(strategies, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
