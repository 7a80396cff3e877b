"""``mindspore.nn.SyncBatchNorm`` with MindSpore's signature, checks and semantics.

Read from mindspore/python/mindspore/nn/layer/normalization.py (``_BatchNorm``
and ``SyncBatchNorm``: ``__init__``, ``_check_rank_ids``, ``construct``) and
mindspore/python/mindspore/common/initializer.py:

* checks: ``TypeError`` if ``num_features`` is not an int (bools rejected),
  ``eps`` not a float or ``process_groups`` (or one of its groups) not a list;
  ``ValueError`` if ``num_features < 1``, ``momentum`` outside ``[0, 1]``,
  ``use_batch_statistics`` not None or a bool (MindSpore raises ValueError
  there), a rank outside ``[0, world size)`` or a rank in two groups;
* ``momentum`` is the weight of the OLD moving value (MindSpore passes
  ``1 - momentum`` to its kernel): ``moving = moving * 0.9 + batch * 0.1``;
  the moving variance is unbiased with the group count, statistics weighted by
  count, parameter gradients summed over the group
  (:data:`refsyncbn.conventions.MINDSPORE`);
* ``use_batch_statistics``: ``None`` -- batch statistics and moving-stat
  updates in training, moving statistics in eval; ``True`` -- batch statistics
  and updates even in eval; ``False`` -- moving statistics always;
* ``affine=False`` keeps ``gamma``/``beta`` at their initial values and gives
  them no gradient (``requires_grad=affine``), it does NOT drop them;
* initializers: ``'ones'``, ``'zeros'``, ``'normal'`` (sigma 0.01),
  ``'uniform'`` (U(-0.07, 0.07)) drawn from NumPy's global generator (so
  ``np.random.seed`` makes them reproducible), numbers (constants) or arrays of
  shape ``(num_features,)``; ``'xavier_uniform'``, ``'he_uniform'``,
  ``'xavier_normal'`` and ``'he_normal'`` raise ``ValueError`` as in MindSpore,
  whose fan-in/fan-out is undefined for a 1-D parameter; an unknown name raises
  ``ValueError``, another type ``TypeError``. Parameters are float32.
* inputs are 2-D ``(N, C)`` or 4-D ``(N, C, H, W)`` (``_shape_check_bn`` with
  ``'both'``); inputs of any other number of dimensions raise ``ValueError``
  on every rank of the group.

Ranks: ``process_groups=None`` synchronizes over all ranks of ``comm``; with
groups, each rank synchronizes within its own group (a group of one rank is
plain batch norm, as in MindSpore). A rank listed in no group raises
``ValueError`` naming it (MindSpore leaves that case undefined).
"""

from __future__ import annotations

import numbers

import numpy as np

from ..comm.groups import group_comm
from ..comm.mpi import default_comm
from ..conventions import MINDSPORE
from ..layer import _BatchNormBase

__all__ = ["SyncBatchNorm"]

_FAN_INITS = ("xavier_uniform", "he_uniform", "xavier_normal", "he_normal")


class SyncBatchNorm(_BatchNormBase):
    """``mindspore.nn.SyncBatchNorm(num_features, eps=1e-5, momentum=0.9, affine=True,
    gamma_init='ones', beta_init='zeros', moving_mean_init='zeros', moving_var_init='ones',
    use_batch_statistics=None, process_groups=None)``.

    Parameters
    ----------
    num_features : int
        Channel count ``C``.
    eps : float
        Added to the variance (1e-5).
    momentum : float
        Weight of the old moving statistics, in ``[0, 1]`` (0.9).
    affine : bool
        Whether ``gamma``/``beta`` get gradients.
    gamma_init, beta_init, moving_mean_init, moving_var_init : str, number or array
        Initial values (see the module notes).
    use_batch_statistics : None or bool
        See the module notes.
    process_groups : list of list of int, optional
        Disjoint groups of ranks of ``comm``; split once, at construction.
    comm : Communicator, optional
        The world (refsyncbn extension; default :func:`refsyncbn.comm.default_comm`).
    xp : namespace, optional
        Array namespace of the parameters (refsyncbn extension; default NumPy).

    Raises
    ------
    TypeError, ValueError
        As listed in the module notes, naming the argument.

    Examples
    --------
    >>> import numpy as np
    >>> from refsyncbn import SimulatedWorld
    >>> x = np.array([[1.0], [2.0], [3.0], [6.0]])
    >>> def step(comm, shard):
    ...     bn = SyncBatchNorm(1, process_groups=[[0, 1]], comm=comm)
    ...     y = bn(shard)
    ...     return bn.moving_mean, bn.moving_variance
    >>> SimulatedWorld(2).run(step, [x[:1], x[1:]])[0]   # 0.1 * 3, 0.9 + 0.1 * 14/3
    (array([0.3], dtype=float32), array([1.3666667], dtype=float32))
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.9,
        affine=True,
        gamma_init="ones",
        beta_init="zeros",
        moving_mean_init="zeros",
        moving_var_init="ones",
        use_batch_statistics=None,
        process_groups=None,
        *,
        comm=None,
        xp=None,
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            msg = f"num_features is {num_features!r}; expected an int (MindSpore checks the type)"
            raise TypeError(msg)
        if num_features < 1:
            msg = f"num_features is {num_features}; expected at least 1"
            raise ValueError(msg)
        if not isinstance(eps, float):
            msg = f"eps is {eps!r} ({type(eps).__name__}); expected a float"
            raise TypeError(msg)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            msg = f"momentum is {momentum!r}; expected a number in range [0, 1]"
            raise TypeError(msg)
        if not 0 <= momentum <= 1:
            msg = f"momentum is {momentum}; expected a number in range [0, 1]"
            raise ValueError(msg)
        if not isinstance(affine, bool):
            msg = f"affine is {affine!r}; expected a bool"
            raise TypeError(msg)
        if use_batch_statistics is not None and not isinstance(use_batch_statistics, bool):
            msg = f"use_batch_statistics is {use_batch_statistics!r}; expected a bool or None"
            raise ValueError(msg)
        inits = {
            name: _initial_values(name, init, num_features)
            for name, init in (
                ("gamma_init", gamma_init),
                ("beta_init", beta_init),
                ("moving_mean_init", moving_mean_init),
                ("moving_var_init", moving_var_init),
            )
        }
        comm = group_comm(default_comm() if comm is None else comm, process_groups)
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=True,
            data_format="NCHW",
            convention=MINDSPORE,
            comm=comm,
            xp=xp,
        )
        xp = np if xp is None else xp
        self.weight, self.bias, self.running_mean, self.running_var = (
            xp.asarray(inits[k]) for k in inits
        )
        self.weight_requires_grad = self.bias_requires_grad = affine
        self.affine = affine
        self.use_batch_statistics = use_batch_statistics
        self.process_groups = process_groups

    # MindSpore's names for the same arrays.
    gamma = property(lambda self: self.weight)
    beta = property(lambda self: self.bias)
    moving_mean = property(lambda self: self.running_mean)
    moving_variance = property(lambda self: self.running_var)

    def _data_format_for(self, x):
        # 2-D: (N, C); anything else goes to the core as NCHW, which raises
        # "x has shape ...; expected a 4-D array" on every rank unless 4-D.
        return "NC" if getattr(x, "ndim", 0) == 2 else "NCHW"

    def _stats_mode(self):
        if self.use_batch_statistics is None:
            return self.training, self.training
        return self.use_batch_statistics, self.use_batch_statistics

    def __repr__(self):
        return (
            f"SyncBatchNorm(num_features={self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum})"
        )


def _initial_values(name, init, c):
    """MindSpore's ``initializer(init, (c,))`` as a float32 NumPy array."""
    if isinstance(init, str):
        key = init.lower()
        if key in ("ones", "zeros"):
            return np.full(c, 1.0 if key == "ones" else 0.0, dtype=np.float32)
        if key == "normal":
            return np.random.normal(0.0, 0.01, c).astype(np.float32)  # noqa: NPY002 (global seed, like mindspore.set_seed)
        if key == "uniform":
            return np.random.uniform(-0.07, 0.07, c).astype(np.float32)  # noqa: NPY002
        if key in _FAN_INITS:
            msg = (
                f"{name} is {init!r}: its fan_in and fan_out can not be computed for a "
                f"parameter with fewer than 2 dimensions (shape ({c},)), as in MindSpore"
            )
            raise ValueError(msg)
        msg = (
            f"{name} is {init!r}; expected 'ones', 'zeros', 'normal', 'uniform', a number "
            f"or an array of shape ({c},)"
        )
        raise ValueError(msg)
    if isinstance(init, numbers.Real):
        return np.full(c, float(init), dtype=np.float32)
    if hasattr(init, "shape"):
        if tuple(init.shape) != (c,):
            msg = f"{name} has shape {tuple(init.shape)}; expected ({c},) for num_features={c}"
            raise ValueError(msg)
        return np.array(init, dtype=np.float32)  # a copy: the layer owns its arrays
    msg = f"{name} is a {type(init).__name__}; expected a str, a number or an array of shape ({c},)"
    raise TypeError(msg)
