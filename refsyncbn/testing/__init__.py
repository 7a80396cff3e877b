"""Tools for validating SyncBatchNorm implementations against the reference."""

from .checker import CheckReport, check, probe_cases, reference_candidate, write_probes
from .oracle import expected_outputs
from .tolerances import ErrorModel, assert_sync_batch_norm_close, compare_outputs, unit_roundoff
from .vectors import write_vectors

__all__ = [
    "CheckReport",
    "ErrorModel",
    "assert_sync_batch_norm_close",
    "cases",
    "check",
    "compare_outputs",
    "expected_outputs",
    "hard_cases",
    "probe_cases",
    "reference_candidate",
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
