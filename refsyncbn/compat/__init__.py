"""Framework-compatible layers: each framework's SyncBatchNorm signature and semantics.

* :mod:`refsyncbn.compat.paddle` -- ``paddle.nn.SyncBatchNorm`` (and
  ``paddle.sparse.nn.BatchNorm``/``SyncBatchNorm`` as ``compat.paddle.sparse``);
* :mod:`refsyncbn.compat.mindspore` -- ``mindspore.nn.SyncBatchNorm``;
* :mod:`refsyncbn.compat.torch` -- ``torch.nn.SyncBatchNorm``.

None of them imports its framework. Each adds keyword-only ``comm=`` (the
communicator to synchronize over; default :func:`refsyncbn.comm.default_comm`)
and ``xp=`` (the array namespace of the parameters; default NumPy).
"""

from . import mindspore, paddle, torch
from .paddle import sparse as _  # noqa: F401  (loads compat.paddle.sparse, the sparse layers)

__all__ = ["mindspore", "paddle", "torch"]
