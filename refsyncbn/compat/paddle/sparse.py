"""``paddle.sparse.nn.BatchNorm`` and ``SyncBatchNorm`` on sparse COO tensors.

Exposed as ``refsyncbn.compat.paddle.sparse``. Read from
python/paddle/sparse/nn/layer/norm.py and
paddle/phi/kernels/sparse/gpu/sync_batch_norm_kernel.cu
(``SyncBatchNormCooKernel``: an empty-like COO output, then the DENSE
``SyncBatchNormKernel`` on ``x.values()``):

* statistics over the stored sites only: implicit zeros are excluded,
  explicit zeros included, duplicate indices are separate rows; the output
  reuses the input indices; the gradient is with respect to the values;
* every other rule is the dense layer's (:mod:`refsyncbn.compat.paddle`):
  equal weighting of (non-empty) ranks, ``momentum`` retained (0.9), biased
  running variance. ``nnz`` may differ per rank and be 0.
* ``BatchNorm`` accepts ``data_format`` ``"NDHWC"`` (default) or ``"NHWC"``
  only; ``SyncBatchNorm`` accepts the dense formats (default ``"NCHW"``) --
  either way the channels are the last axis of the COO tensor.

``BatchNorm(use_global_stats=None)`` follows Paddle's documentation (batch
statistics in training, running ones in eval). Paddle's code instead stores
``not self.training`` into ``_use_global_stats`` at the first call, so the
mode of the first call sticks; we do not copy that.

Examples
--------
The worked example verified with paddle 3.3.1 (CPU): a 1x4 grid with C = 2,
stored sites 0 and 2 holding ``[1, 2]`` and ``[3, 0]``:

>>> import numpy as np
>>> from refsyncbn.sparse import SparseCooTensor
>>> x = SparseCooTensor(np.array([[0, 0], [0, 2]]), np.array([[1.0, 2.0], [3.0, 0.0]]), (1, 4, 2))
>>> bn = BatchNorm(2, data_format="NHWC")
>>> y = bn(x)
>>> y.values
array([[-0.999995,  0.999995],
       [ 0.999995, -0.999995]])
>>> y.indices is x.indices
True
>>> bn.running_mean, bn.running_var
(array([0.2, 0.1], dtype=float32), array([1., 1.], dtype=float32))
"""

from __future__ import annotations

from ...sparse import SparseCooTensor
from . import BatchNorm as _DenseBatchNorm
from . import SyncBatchNorm as _DenseSyncBatchNorm

__all__ = ["BatchNorm", "SparseCooTensor", "SyncBatchNorm"]


class _SparseInput:
    """Accept only SparseCooTensor inputs."""

    def forward(self, x, mask=None):
        if not isinstance(x, SparseCooTensor):
            msg = (
                f"x is a {type(x).__name__}; expected a refsyncbn.sparse.SparseCooTensor "
                f"(indices (ndim_sparse, nnz), values (nnz, C))"
            )
            raise TypeError(msg)
        return super().forward(x, mask=mask)


class BatchNorm(_SparseInput, _DenseBatchNorm):
    """``paddle.sparse.nn.BatchNorm(num_features, momentum=0.9, epsilon=1e-05,
    weight_attr=None, bias_attr=None, data_format='NDHWC', use_global_stats=None,
    name=None)`` on one rank.

    Raises
    ------
    ValueError
        If ``data_format`` is not ``"NDHWC"`` or ``"NHWC"``.
    TypeError
        In forward, if ``x`` is not a :class:`~refsyncbn.sparse.SparseCooTensor`.
    """

    _formats = ("NDHWC", "NHWC")

    def __init__(
        self,
        num_features,
        momentum=0.9,
        epsilon=1e-05,
        weight_attr=None,
        bias_attr=None,
        data_format="NDHWC",
        use_global_stats=None,
        name=None,
        *,
        xp=None,
    ):
        super().__init__(
            num_features,
            momentum,
            epsilon,
            weight_attr,
            bias_attr,
            data_format,
            use_global_stats,
            name,
            xp=xp,
        )


class SyncBatchNorm(_SparseInput, _DenseSyncBatchNorm):
    """``paddle.sparse.nn.SyncBatchNorm(num_features, momentum=0.9, epsilon=1e-05,
    weight_attr=None, bias_attr=None, data_format='NCHW', name=None)``.

    Parameters as :class:`refsyncbn.compat.paddle.SyncBatchNorm` (with the
    keyword-only ``comm`` and ``xp`` extensions); the input is a
    :class:`~refsyncbn.sparse.SparseCooTensor` whose ``nnz`` may differ per
    rank (0 included).

    Examples
    --------
    >>> import numpy as np
    >>> from refsyncbn import SimulatedWorld
    >>> shards = [SparseCooTensor(np.array([[0], [1]]), np.array([[1.0]]), (1, 3, 1)),
    ...           SparseCooTensor(np.zeros((2, 0), int), np.zeros((0, 1)), (1, 3, 1)),
    ...           SparseCooTensor(np.array([[0], [2]]), np.array([[3.0]]), (1, 3, 1))]
    >>> def step(comm, x):
    ...     return SyncBatchNorm(1, comm=comm)(x).values
    >>> [v.ravel().round(4).tolist() for v in SimulatedWorld(3).run(step, shards)]
    [[-1.0], [], [1.0]]

    ``SyncBatchNorm.convert_sync_batchnorm(layer)`` replaces the sparse
    :class:`BatchNorm` layers, sharing their arrays.
    """


SyncBatchNorm._convertible = BatchNorm
