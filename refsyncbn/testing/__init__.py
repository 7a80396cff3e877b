"""Tools for validating SyncBatchNorm implementations against the reference."""

from .oracle import expected_outputs

__all__ = ["expected_outputs"]
