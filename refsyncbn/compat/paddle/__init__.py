"""``paddle.nn.SyncBatchNorm`` with Paddle's signature, defaults and semantics.

Read from python/paddle/nn/layer/norm.py (``_BatchNormBase``, ``SyncBatchNorm``:
``__init__``, ``_check_data_format``, ``forward``, ``convert_sync_batchnorm``),
python/paddle/sparse/nn/layer/norm.py and the phi ``sync_batch_norm`` kernels:

* the signature is ``(num_features, momentum=0.9, epsilon=1e-05, weight_attr=None,
  bias_attr=None, data_format='NCHW', name=None)`` -- momentum BEFORE epsilon in
  the code (the API docs list epsilon first; keyword use is the same);
* ``momentum`` is the weight of the OLD running value:
  ``running = running * 0.9 + batch * 0.1``; biased running variance;
* uneven ranks are weighted EQUALLY: the kernel all-reduces per-rank
  ``E[x]`` and ``E[x^2]`` and divides by the number of ranks
  (:data:`refsyncbn.conventions.PADDLE`; here ranks with an empty batch are
  left out of the average), with the exact gradient of that forward;
* ``weight_attr=False``/``bias_attr=False``: the scale is fixed to 1 / the
  shift to 0 (``stop_gradient=True``): ``weight_grad``/``bias_grad`` stay None;
* ``data_format`` names a family, not a rank: ``NC, NCL, NCHW, NCDHW`` put the
  channels on axis 1 and ``NLC, NHWC, NDHWC`` on the last axis, for 2-D to 5-D
  inputs alike (Paddle maps them to ``NCHW``/``NHWC``);
* training uses batch statistics and updates the running ones; eval uses the
  running statistics and communicates nothing.

The sparse layers are the submodule :mod:`refsyncbn.compat.paddle.sparse`
(``paddle.sparse.nn.BatchNorm``/``SyncBatchNorm``): it builds on the dense
layers here, which never import it.
"""

from __future__ import annotations

from ...comm.local import LocalComm
from ...comm.mpi import default_comm
from ...conventions import PADDLE
from ...layer import _BatchNormBase, replace_layers

__all__ = ["BatchNorm", "SyncBatchNorm"]

_CHANNEL_FIRST = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
_CHANNEL_LAST = {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"}
_DENSE_FORMATS = ("NC", "NCL", "NCHW", "NCDHW", "NLC", "NHWC", "NDHWC")


class _PaddleNorm(_BatchNormBase):
    """Paddle's rules on top of the generic layer."""

    _formats = _DENSE_FORMATS

    def __init__(
        self,
        num_features,
        momentum,
        epsilon,
        weight_attr,
        bias_attr,
        data_format,
        use_global_stats,
        name,
        comm,
        xp,
    ):
        for arg, value in (("weight_attr", weight_attr), ("bias_attr", bias_attr)):
            if value is not None and not isinstance(value, bool):
                msg = (
                    f"{arg} is a {type(value).__name__}; expected None, True or False "
                    f"(False: fixed, non-trainable; ParamAttr objects are not supported)"
                )
                raise TypeError(msg)
        if use_global_stats is not None and not isinstance(use_global_stats, bool):
            msg = f"use_global_stats is {use_global_stats!r}; expected None, True or False"
            raise TypeError(msg)
        super().__init__(
            num_features,
            eps=epsilon,
            momentum=momentum,
            affine=True,
            data_format=data_format,
            convention=PADDLE,
            comm=comm,
            xp=xp,
        )
        self.weight_requires_grad = weight_attr is not False
        self.bias_requires_grad = bias_attr is not False
        self.use_global_stats = use_global_stats
        self.name = name

    @property
    def epsilon(self):
        return self.eps

    def _check_data_format(self):
        if self.data_format not in self._formats:
            msg = f"data_format is {self.data_format!r}; expected one of {', '.join(self._formats)}"
            raise ValueError(msg)

    def _data_format_for(self, x):
        family = _CHANNEL_LAST if self.data_format in ("NLC", "NHWC", "NDHWC") else _CHANNEL_FIRST
        # Unsupported ranks reach the core with the layer's own format, which
        # then raises "x has shape ...; expected a k-D array" on every rank.
        return family.get(getattr(x, "ndim", 0), self.data_format)

    def _stats_mode(self):
        if self.use_global_stats is None:
            return self.training, self.training
        # True: running statistics, never updated; False: batch statistics and
        # updates even in eval (Paddle's trainable_statistics).
        return not self.use_global_stats, not self.use_global_stats

    def __repr__(self):
        return (
            f"{type(self).__name__}(num_features={self.num_features}, "
            f"momentum={self.momentum}, epsilon={self.eps})"
        )


class BatchNorm(_PaddleNorm):
    """``paddle.nn.BatchNorm1D/2D/3D`` on one rank (any of Paddle's data formats).

    ``use_global_stats``: ``None`` -- batch statistics in training, running
    ones in eval; ``True`` -- running statistics always (never updated);
    ``False`` -- batch statistics always, updating the running ones.

    Examples
    --------
    >>> import numpy as np
    >>> bn = BatchNorm(2, data_format="NLC")
    >>> x = np.array([[[1.0, 10.0], [3.0, 30.0]]])          # (N=1, L=2, C=2)
    >>> np.round(bn(x), 4)
    array([[[-1., -1.],
            [ 1.,  1.]]])
    """

    def __init__(
        self,
        num_features,
        momentum=0.9,
        epsilon=1e-05,
        weight_attr=None,
        bias_attr=None,
        data_format="NCHW",
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
            LocalComm(),
            xp,
        )


class SyncBatchNorm(_PaddleNorm):
    """``paddle.nn.SyncBatchNorm(num_features, momentum=0.9, epsilon=1e-05,
    weight_attr=None, bias_attr=None, data_format='NCHW', name=None)``.

    Parameters
    ----------
    num_features : int
        Channel count ``C``.
    momentum : float
        Weight of the old running value (0.9).
    epsilon : float
        Added to the variance (1e-5).
    weight_attr, bias_attr : None or bool
        ``False``: scale fixed to 1 / shift fixed to 0, no gradient.
    data_format : str
        ``NC, NCL, NCHW, NCDHW`` (channels on axis 1) or ``NLC, NHWC, NDHWC``
        (channels last), for inputs of 2 to 5 dimensions.
    name : str, optional
        Kept, unused.
    comm : Communicator, optional
        Ranks to synchronize over (refsyncbn extension; default
        :func:`refsyncbn.comm.default_comm`).
    xp : namespace, optional
        Array namespace of the parameters (refsyncbn extension; default NumPy).

    Raises
    ------
    TypeError
        If ``num_features`` is not an int or ``weight_attr``/``bias_attr`` is
        not None or a bool.
    ValueError
        If ``data_format`` is unknown, ``num_features < 1``, ``epsilon < 0`` or
        ``momentum`` outside ``[0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from refsyncbn import SimulatedWorld
    >>> x = np.array([[1.0], [2.0], [3.0], [6.0]])
    >>> def step(comm, shard):
    ...     bn = SyncBatchNorm(1, data_format="NC", comm=comm)
    ...     return bn(shard), bn.running_mean
    >>> out = SimulatedWorld(2).run(step, [x[:1], x[1:]])   # ranks hold 1 and 3 rows
    >>> out[0][1]            # equal weighting: mean of 1 and 11/3 is 7/3, times 0.1
    array([0.23333333], dtype=float32)
    """

    def __init__(
        self,
        num_features,
        momentum=0.9,
        epsilon=1e-05,
        weight_attr=None,
        bias_attr=None,
        data_format="NCHW",
        name=None,
        *,
        comm=None,
        xp=None,
    ):
        comm = default_comm() if comm is None else comm
        super().__init__(
            num_features,
            momentum,
            epsilon,
            weight_attr,
            bias_attr,
            data_format,
            None,
            name,
            comm,
            xp,
        )

    @classmethod
    def convert_sync_batchnorm(cls, layer, *, comm=None):
        """Replace the :class:`BatchNorm` layers in ``layer`` by SyncBatchNorm ones.

        Paddle's ``SyncBatchNorm.convert_sync_batchnorm``: same options, SHARED
        parameters and running statistics; containers walked as in
        :func:`refsyncbn.layer.convert_sync_batchnorm`.

        Examples
        --------
        >>> model = SyncBatchNorm.convert_sync_batchnorm([BatchNorm(5)])
        >>> model
        [SyncBatchNorm(num_features=5, momentum=0.9, epsilon=1e-05)]
        """
        comm = default_comm() if comm is None else comm
        source = cls._convertible

        def convert(old):
            new = cls(
                old.num_features,
                old.momentum,
                old.eps,
                data_format=old.data_format,
                name=old.name,
                comm=comm,
            )
            new._adopt(old)
            return new

        return replace_layers(layer, lambda o: convert(o) if type(o) is source else None)


SyncBatchNorm._convertible = BatchNorm
