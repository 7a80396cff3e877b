"""Stateful batch-norm layers over :mod:`refsyncbn.functional`.

:class:`SyncBatchNorm` holds ``weight``, ``bias``, ``running_mean``,
``running_var`` and ``num_batches_tracked``; ``layer(x)`` normalizes (batch
statistics synchronized over the layer's communicator in training, running
statistics in eval) and ``layer.backward(dy)`` returns ``dx`` and keeps the
parameter gradients on the layer (``weight_grad``, ``bias_grad``).
:class:`BatchNorm` is the same layer on one rank (plain, unsynchronized batch
norm, for contrast). :func:`convert_sync_batchnorm` swaps the BatchNorm layers
of a model for SyncBatchNorm ones that share their arrays.

Arrays are never modified in place: each training step replaces the running
statistics by the new arrays the functional core returns, so a user's input is
never mutated and immutable array types work too. Parameters live in the
namespace they were created in (NumPy by default, ``xp=`` to choose).
"""

from __future__ import annotations

import numbers
import types

import numpy as np

from . import functional
from ._xp import device_of, namespace, to_numpy
from .comm.groups import group_comm
from .comm.local import LocalComm
from .comm.mpi import default_comm
from .conventions import get_convention
from .layouts import get_layout
from .sparse import SparseCooTensor

__all__ = ["BatchNorm", "Sequential", "SyncBatchNorm", "convert_sync_batchnorm"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _BatchNormBase:
    """Shared state and logic; subclasses choose the communicator and the hooks."""

    def __init__(
        self,
        num_features,
        *,
        eps,
        momentum,
        affine,
        data_format,
        convention,
        comm,
        track_running_stats=True,
        dtype=None,
        xp=None,
        device=None,
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            msg = f"num_features is {num_features!r}; expected an int >= 1 (the channel count C)"
            raise TypeError(msg)
        if num_features < 1:
            msg = f"num_features is {num_features}; expected an int >= 1 (the channel count C)"
            raise ValueError(msg)
        self.convention = get_convention(convention)
        self.eps = self.convention.eps if eps is None else eps
        _check_eps(self.eps)
        self.momentum = self._resolve_momentum(momentum)
        self.data_format = data_format
        self._check_data_format()
        self.num_features = int(num_features)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.comm = comm
        xp = np if xp is None else xp
        dtype = xp.float32 if dtype is None else dtype
        c = self.num_features

        def ones():
            return xp.ones(c, dtype=dtype, device=device)

        def zeros():
            return xp.zeros(c, dtype=dtype, device=device)

        # Each state array is its own allocation: setting one in place never changes another.
        self.weight, self.bias = (ones(), zeros()) if affine else (None, None)
        self.weight_requires_grad = self.bias_requires_grad = self.affine
        if track_running_stats:
            self.running_mean, self.running_var = zeros(), ones()
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.weight_grad = self.bias_grad = None
        self.training = True
        self._saved = None
        self._sparse = None

    # --- hooks for framework-compatible subclasses -------------------------------
    def _resolve_momentum(self, momentum):
        """The momentum to store (validated); ``None`` means the convention's default."""
        momentum = self.convention.momentum if momentum is None else momentum
        _check_momentum(momentum)
        return momentum

    def _check_data_format(self):
        get_layout(self.data_format)

    def _data_format_for(self, x):
        """Data format the core gets for input ``x``."""
        return self.data_format

    def _stats_mode(self):
        """``(normalize with batch statistics, update the running statistics)``."""
        tracking = self.running_mean is not None
        return self.training or not tracking, self.training and tracking

    def _momentum_for(self, step):
        """Momentum (convention meaning) of the update that makes ``step`` batches tracked."""
        return self.momentum

    # --- public API -------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (batch statistics, running-stat updates); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode (running statistics); returns self."""
        return self.train(False)

    def __call__(self, x, mask=None):
        return self.forward(x, mask=mask)

    def forward(self, x, mask=None):
        """Normalize ``x``; in training also update the running statistics.

        Parameters
        ----------
        x : array or SparseCooTensor
            This rank's shard, laid out as the layer's data format; a
            :class:`~refsyncbn.sparse.SparseCooTensor` is normalized over its
            stored values (``(nnz, C)``, data format ``NC``).
        mask : bool array, optional
            Valid positions (``x``'s shape without the channel axis): batch
            statistics use them only, with exact count weighting across ranks;
            every position is normalized. Not for sparse input.

        Returns
        -------
        array or SparseCooTensor
            ``y`` in the dtype of ``x`` (sparse: same indices, new values).
        """
        sparse = None
        if isinstance(x, SparseCooTensor):
            if mask is not None:
                msg = (
                    "mask must be None for a SparseCooTensor input: its stored sites are the "
                    "valid ones"
                )
                raise ValueError(msg)
            sparse, x, data_format = x, x.values, "NC"
        else:
            data_format = self._data_format_for(x)
        use_batch, update = self._stats_mode()
        step = self.num_batches_tracked + 1 if update else None
        momentum = self._momentum_for(step) if update else self.convention.momentum
        res = functional.forward(
            x,
            self.weight,
            self.bias,
            running_mean=self.running_mean,
            running_var=self.running_var,
            training=use_batch,
            eps=self.eps,
            momentum=momentum,
            data_format=data_format,
            convention=self.convention,
            mask=mask,
            comm=self.comm,
        )
        if update:
            self.running_mean, self.running_var = res.running_mean, res.running_var
            self.num_batches_tracked = step
        self._saved, self._sparse = res.saved, sparse
        return res.y if sparse is None else sparse.with_values(res.y)

    def backward(self, dy):
        """Gradient with respect to the last forward's input; keeps parameter gradients.

        Parameters
        ----------
        dy : array or SparseCooTensor
            Gradient of the loss with respect to the last output (sparse input:
            a SparseCooTensor with the same stored sites).

        Returns
        -------
        array or SparseCooTensor
            ``dx``; ``self.weight_grad`` / ``self.bias_grad`` hold the
            parameter gradients (``None`` without affine or when frozen), reduced
            over the group as the convention says.

        Raises
        ------
        RuntimeError
            If no forward pass came before.
        """
        if self._saved is None:
            msg = "backward() called before forward(): there is no saved forward pass"
            raise RuntimeError(msg)
        if self._sparse is not None:
            if not isinstance(dy, SparseCooTensor):
                msg = (
                    f"dy is a {type(dy).__name__}; expected a SparseCooTensor like the last "
                    f"forward's input"
                )
                raise TypeError(msg)
            dy = dy.values
        grads = functional.backward(dy, self._saved)
        self.weight_grad = grads.dweight if self.weight_requires_grad else None
        self.bias_grad = grads.dbias if self.bias_requires_grad else None
        return grads.dx if self._sparse is None else self._sparse.with_values(grads.dx)

    def state_dict(self) -> dict:
        """Parameters and running statistics (the arrays themselves; never mutated)."""
        return {k: getattr(self, k) for k in _STATE_KEYS if getattr(self, k) is not None}

    def load_state_dict(self, state_dict, strict=True):
        """Adopt arrays from ``state_dict`` (shapes checked against ``num_features``).

        Raises
        ------
        ValueError
            Naming the keys that are missing or unexpected (``strict``), or an
            array whose shape is not ``(num_features,)``.
        """
        expected = set(self.state_dict())
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if strict and (missing or unexpected):
            msg = (
                f"state_dict: missing keys {sorted(missing)}, unexpected keys "
                f"{sorted(unexpected)}; this layer holds {sorted(expected)}"
            )
            raise ValueError(msg)
        updates = {}
        for key in expected & set(state_dict):
            value = state_dict[key]
            if key == "num_batches_tracked":
                value = int(np.asarray(to_numpy(value) if hasattr(value, "shape") else value))
            elif tuple(value.shape) != (self.num_features,):
                msg = (
                    f"state_dict[{key!r}] has shape {tuple(value.shape)}; expected "
                    f"({self.num_features},) for num_features={self.num_features}"
                )
                raise ValueError(msg)
            updates[key] = value
        for key, value in updates.items():
            setattr(self, key, value)

    def save(self, path):
        """Write :meth:`state_dict` to ``path`` as ``.npz`` (host copies)."""
        np.savez(
            path,
            **{
                k: np.asarray(to_numpy(v) if hasattr(v, "shape") else v)
                for k, v in self.state_dict().items()
            },
        )

    def load(self, path, strict=True):
        """Load a :meth:`save` file; arrays go to the namespace and device of the current ones."""
        with np.load(path, allow_pickle=False) as f:
            state = {k: f[k] for k in f.files}
        for key, value in state.items():
            current = getattr(self, key, None)
            if key != "num_batches_tracked" and current is not None and hasattr(current, "shape"):
                xp = namespace(current)
                state[key] = xp.asarray(value, dtype=current.dtype, device=device_of(current))
        self.load_state_dict(state, strict=strict)

    def _adopt(self, other):
        """Share ``other``'s arrays, counters, flags and mode (used by conversions)."""
        for key in _STATE_KEYS:
            setattr(self, key, getattr(other, key))
        self.weight_requires_grad = other.weight_requires_grad
        self.bias_requires_grad = other.bias_requires_grad
        self.training = other.training

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum}, convention={self.convention.name!r})"
        )


class BatchNorm(_BatchNormBase):
    """Plain batch norm on one rank: :class:`SyncBatchNorm` with a :class:`LocalComm`.

    Parameters are those of :class:`SyncBatchNorm` without the communicator.

    Examples
    --------
    >>> import numpy as np
    >>> bn = BatchNorm(2, data_format="NC")
    >>> y = bn(np.array([[1.0, 10.0], [3.0, 30.0]]))
    >>> np.round(y, 4)
    array([[-1., -1.],
           [ 1.,  1.]])
    """

    def __init__(
        self,
        num_features,
        eps=None,
        momentum=None,
        affine=True,
        data_format="NCHW",
        convention="reference",
        *,
        track_running_stats=True,
        dtype=None,
        xp=None,
        device=None,
    ):
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            data_format=data_format,
            convention=convention,
            comm=LocalComm(),
            track_running_stats=track_running_stats,
            dtype=dtype,
            xp=xp,
            device=device,
        )


class SyncBatchNorm(_BatchNormBase):
    """Synchronized batch norm over the ranks of a communicator (or of a process group).

    Parameters
    ----------
    num_features : int
        Channel count ``C``.
    eps, momentum : float, optional
        Default to the convention's; ``momentum`` in the convention's meaning
        (``retain``: weight of the old running value; ``update``: of the batch).
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); else none.
    data_format : str
        ``NC, NCL, NLC, NCHW, NHWC, NCDHW, NDHWC``.
    convention : Convention or str
        Weighting, running-variance and parameter-gradient rules.
    process_groups : list of list of int, optional
        Disjoint groups of ranks of ``comm`` (MindSpore's rule); the layer
        synchronizes within its rank's group. Split once, here (collective over
        ``comm``: every rank must construct the layer).
    comm : Communicator, optional
        Default :func:`refsyncbn.comm.default_comm` (MPI under ``mpiexec``,
        else one rank).
    track_running_stats : bool
        Keep running statistics; without them every pass uses batch statistics.
    dtype, xp, device
        Dtype, array namespace and device of the parameters (float32 NumPy).

    Examples
    --------
    >>> import numpy as np
    >>> from refsyncbn import SimulatedWorld
    >>> x = np.array([[1.0], [2.0], [3.0], [6.0]])          # global batch, C = 1
    >>> def step(comm, shard):
    ...     layer = SyncBatchNorm(1, data_format="NC", comm=comm)
    ...     return layer(shard), layer.running_mean
    >>> out = SimulatedWorld(2).run(step, [x[:1], x[1:]])   # uneven: 1 + 3 rows
    >>> np.round(np.concatenate([y for y, _ in out]).ravel(), 4)
    array([-1.069 , -0.5345,  0.    ,  1.6036])
    >>> out[0][1]                                            # 0.9 * 0 + 0.1 * 3
    array([0.3], dtype=float32)
    """

    def __init__(
        self,
        num_features,
        eps=None,
        momentum=None,
        affine=True,
        data_format="NCHW",
        convention="reference",
        process_groups=None,
        comm=None,
        *,
        track_running_stats=True,
        dtype=None,
        xp=None,
        device=None,
    ):
        comm = default_comm() if comm is None else comm
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            data_format=data_format,
            convention=convention,
            comm=group_comm(comm, process_groups),
            track_running_stats=track_running_stats,
            dtype=dtype,
            xp=xp,
            device=device,
        )


class Sequential:
    """A minimal chain of layers: ``forward`` in order, ``backward`` in reverse.

    Examples
    --------
    >>> import numpy as np
    >>> model = Sequential(BatchNorm(2, data_format="NC"), BatchNorm(2, data_format="NC"))
    >>> model(np.array([[1.0, 2.0], [3.0, 5.0]])).shape
    (2, 2)
    """

    def __init__(self, *layers):
        self.layers = list(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode=True):
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)


def convert_sync_batchnorm(model, *, comm=None, process_groups=None):
    """Replace every :class:`BatchNorm` in ``model`` by a :class:`SyncBatchNorm`.

    Walks lists, dicts, tuples, :class:`Sequential` and attribute trees (object
    ``__dict__``), in place where the container is mutable. Each new layer keeps
    the old one's options and SHARES its arrays (``weight``, ``bias``,
    ``running_mean``, ``running_var``), counter, frozen flags and mode, like
    PyTorch's and Paddle's ``convert_sync_batchnorm``. A layer reached twice is
    converted once. The process-group communicator is split once for all layers.

    Parameters
    ----------
    model : object
        A BatchNorm or a container holding some.
    comm, process_groups
        As for :class:`SyncBatchNorm`.

    Returns
    -------
    object
        ``model`` itself (converted in place), or the new layer or tuple when
        ``model`` is a BatchNorm or a tuple.

    Examples
    --------
    >>> model = {"blocks": [BatchNorm(4), BatchNorm(4)]}
    >>> old = model["blocks"][0].weight
    >>> model = convert_sync_batchnorm(model)
    >>> type(model["blocks"][0]).__name__, model["blocks"][0].weight is old
    ('SyncBatchNorm', True)
    """
    comm = group_comm(default_comm() if comm is None else comm, process_groups)

    def convert(layer):
        new = SyncBatchNorm(
            layer.num_features,
            layer.eps,
            layer.momentum,
            layer.affine,
            layer.data_format,
            layer.convention,
            comm=comm,
            track_running_stats=layer.track_running_stats,
        )
        new._adopt(layer)
        return new

    return replace_layers(model, lambda obj: convert(obj) if type(obj) is BatchNorm else None)


def replace_layers(model, replace):
    """Walk ``model`` and substitute ``replace(obj)`` wherever it is not ``None``.

    The walker behind every ``convert_sync_batchnorm``: lists and dicts are
    updated in place, tuples rebuilt, plain objects' attributes reassigned;
    layers, modules, classes and functions are not entered; cycles are safe.
    """
    memo: dict[int, object] = {}
    return _walk(model, replace, memo)


_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    _BatchNormBase,
)


def _walk(obj, replace, memo):
    """``obj`` with its matching layers replaced (see :func:`replace_layers`)."""
    key = id(obj)
    if key in memo:
        return memo[key]
    new = replace(obj)
    if new is not None:
        memo[key] = new
        return new
    memo[key] = obj
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            obj[i] = _walk(item, replace, memo)
    elif isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _walk(obj[k], replace, memo)
    elif isinstance(obj, tuple):
        items = [_walk(item, replace, memo) for item in obj]
        if any(a is not b for a, b in zip(items, obj, strict=True)):
            memo[key] = type(obj)._make(items) if hasattr(obj, "_fields") else tuple(items)
    elif hasattr(obj, "__dict__") and not isinstance(obj, _OPAQUE):
        for name, value in list(vars(obj).items()):
            new_value = _walk(value, replace, memo)
            if new_value is not value:
                setattr(obj, name, new_value)
    return memo[key]


def _check_eps(eps):
    error = functional.eps_error(eps)
    if error is not None:
        raise error


def _check_momentum(momentum):
    error = functional.momentum_error(momentum)
    if error is not None:
        raise error
