"""Tools for validating SyncBatchNorm implementations against the reference."""

from .oracle import expected_outputs

__all__ = ["cases", "expected_outputs", "hard_cases"]

_STRATEGIES = ("cases", "hard_cases")


def __getattr__(name):
    """Hypothesis strategies, imported on first use: hypothesis stays optional."""
    if name in _STRATEGIES:
        from . import strategies

        return getattr(strategies, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
