"""``torch.nn.SyncBatchNorm`` with PyTorch's signature, defaults and semantics.

Read from torch/nn/modules/batchnorm.py (``_NormBase``, ``_BatchNorm.forward``,
``SyncBatchNorm.forward`` and ``convert_sync_batchnorm``) and
torch/nn/modules/_functions.py (``SyncBatchNorm.forward``):

* ``momentum`` is the weight of the NEW batch statistic (default 0.1);
  ``momentum=None`` is a cumulative average with factor
  ``1 / num_batches_tracked``, counted after the increment of this step;
* the running variance is unbiased with the GLOBAL count ``m / (m - 1)``; a
  global count of 1 per channel in training raises ``ValueError``; per-rank
  statistics merge by count, empty ranks contribute nothing
  (:data:`refsyncbn.conventions.TORCH`);
* ``track_running_stats=False``: no running statistics (``None``), batch
  statistics in training AND eval; with them, eval uses the running statistics
  and communicates nothing;
* input ``(N, C, *)`` with 2 to 5 dimensions, channels on axis 1;
* parameter gradients are this rank's own (DDP averages them outside).

``process_group`` is a communicator (:class:`refsyncbn.comm.Communicator`),
e.g. one from :func:`refsyncbn.comm.group_comm`, the counterpart of
``torch.distributed.new_group``; ``None`` means
:func:`refsyncbn.comm.default_comm`. Unlike PyTorch, a momentum outside
``[0, 1]`` is rejected with ``ValueError``.
"""

from __future__ import annotations

from ..comm import Communicator
from ..comm.local import LocalComm
from ..comm.mpi import default_comm
from ..conventions import TORCH
from ..layer import _BatchNormBase, _check_momentum, replace_layers

__all__ = ["BatchNorm", "SyncBatchNorm"]

_FORMATS = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}


class _TorchNorm(_BatchNormBase):
    """PyTorch's rules on top of the generic layer."""

    def __init__(
        self, num_features, eps, momentum, affine, track_running_stats, comm, device, dtype, xp
    ):
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            data_format="NCHW",
            convention=TORCH,
            comm=comm,
            track_running_stats=track_running_stats,
            dtype=dtype,
            xp=xp,
            device=device,
        )

    def _resolve_momentum(self, momentum):
        if momentum is not None:
            _check_momentum(momentum)
        return momentum

    def _data_format_for(self, x):
        ndim = getattr(x, "ndim", 2)
        # Unsupported ranks go to the core with the nearest format: it raises
        # "x has shape ...; expected a k-D array" on every rank of the group.
        return _FORMATS[min(max(ndim, 2), 5)]

    def _momentum_for(self, step):
        return 1.0 / step if self.momentum is None else self.momentum

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats})"
        )


class BatchNorm(_TorchNorm):
    """``torch.nn.BatchNorm1d/2d/3d`` on one rank (N-D input, channels on axis 1).

    Examples
    --------
    >>> import numpy as np
    >>> bn = BatchNorm(2)
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> np.round(bn(x), 4)
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> bn.running_var                      # 0.9 * 1 + 0.1 * (unbiased var 2 and 200)
    array([ 1.1, 20.9], dtype=float32)
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
        *,
        xp=None,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, LocalComm(), device, dtype, xp
        )


class SyncBatchNorm(_TorchNorm):
    """``torch.nn.SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None)``.

    Parameters
    ----------
    num_features : int
        ``C`` of an input ``(N, C, *)``.
    eps : float
        Added to the variance. Default 1e-5.
    momentum : float or None
        Weight of the batch statistic in the running average (0.1); ``None``:
        cumulative average, factor ``1 / num_batches_tracked``.
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool
        Keep ``running_mean``, ``running_var``, ``num_batches_tracked``.
    process_group : Communicator, optional
        The ranks to synchronize over (default: :func:`refsyncbn.comm.default_comm`).
    device, dtype
        Device and dtype of the parameters (default float32).
    xp : namespace, optional
        Array namespace of the parameters (refsyncbn extension; default NumPy).

    Raises
    ------
    TypeError
        If ``num_features`` is not an int or ``process_group`` not a communicator.
    ValueError
        If ``num_features < 1``, ``eps < 0`` or ``momentum`` outside ``[0, 1]``;
        in forward, for an input that is not 2-D to 5-D, or a single value per
        channel in the whole group when training.

    Examples
    --------
    >>> import numpy as np
    >>> from refsyncbn import SimulatedWorld
    >>> x = np.arange(12.0).reshape(6, 2)               # global batch (N=6, C=2)
    >>> def step(comm, shard):
    ...     bn = SyncBatchNorm(2, momentum=None, process_group=comm)
    ...     y = bn(shard)
    ...     return y, bn.running_mean, bn.num_batches_tracked
    >>> out = SimulatedWorld(2).run(step, [x[:1], x[1:]])
    >>> out[0][1], out[0][2]                           # cumulative: factor 1/1 = batch mean
    (array([5., 6.], dtype=float32), 1)
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        xp=None,
    ):
        if process_group is not None and not isinstance(process_group, Communicator):
            msg = (
                f"process_group is a {type(process_group).__name__}; expected a refsyncbn "
                f"Communicator (e.g. from refsyncbn.comm.group_comm) or None"
            )
            raise TypeError(msg)
        self.process_group = process_group
        comm = default_comm() if process_group is None else process_group
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, comm, device, dtype, xp
        )

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every :class:`BatchNorm` in ``module`` by a SyncBatchNorm sharing its arrays.

        PyTorch's ``SyncBatchNorm.convert_sync_batchnorm``: same options, the
        SAME ``weight``/``bias``/running statistics/``num_batches_tracked``
        and training mode; walks containers as
        :func:`refsyncbn.layer.convert_sync_batchnorm` does.

        Examples
        --------
        >>> from refsyncbn.layer import Sequential
        >>> model = SyncBatchNorm.convert_sync_batchnorm(Sequential(BatchNorm(3)))
        >>> type(model[0]).__name__
        'SyncBatchNorm'
        """
        comm = default_comm() if process_group is None else process_group

        def convert(layer):
            new = cls(
                layer.num_features,
                layer.eps,
                layer.momentum,
                layer.affine,
                layer.track_running_stats,
                process_group=comm,
            )
            new._adopt(layer)
            return new

        return replace_layers(module, lambda o: convert(o) if isinstance(o, BatchNorm) else None)
