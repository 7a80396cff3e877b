"""Kernel layer: one interface, three backends, chosen per call.

Every backend is a module exposing the same functions over canonical
``(A, C, B)`` views (``layouts.Layout.view``) of ANY strides. ``mask3`` is a
boolean ``(A, 1, B)`` array or ``None``; per-channel vectors are float64
arrays of shape ``(C,)``; ``xp`` is the array namespace (a backend may ignore
it). Every sum is accumulated in float64 whatever the input dtype, and every
output array is computed in float64 and rounded ONCE to ``dtype``. Full-size
NumPy outputs of 4 MiB and more come from a small pool of released output
memory (:mod:`refsyncbn.kernels._pool`; ``REFSYNCBN_OUTPUT_POOL=0`` turns it
off), which spares the operating system's zeroing of freshly mapped pages.

``NAME``
    The backend's name (``"numpy"``, ``"numba"``, ``"cupy"``).
``supports(x) -> bool``
    Whether the backend can run the (validated, floating) input array ``x``.
``count(x3, mask3, *, xp) -> int``
    Elements per channel: ``A * B``, or the number of True mask positions.
``moments(x3, mask3, *, xp) -> (mean, m2)``
    Local per-channel mean and ``M2 = sum (x - mean)^2`` over the valid
    positions, free of cancellation (two-pass or shifted within cache-sized
    blocks, blocks merged with Chan's formula); zeros when no position is
    valid. NaN/Inf in valid positions make that channel's results NaN/Inf.
``normalize(x3, mean, scale, shift, *, xp, dtype) -> y3``
    ``(x - mean) * scale + shift`` at every position.
``grad_sums(dy3, x3, mean, invstd, *, xp) -> (a, b)``
    ``a = sum dy`` and ``b = sum dy * (x - mean) * invstd`` over ALL positions
    (masked ones included: every position is normalized with the mean); the
    product is formed around the mean, never ``sum dy*x - mean * sum dy``.
``grad_input(dy3, x3, mean, k_dy, k_x, k_0, mask3, *, xp, dtype) -> dx3``
    ``k_dy * dy - valid * (k_x * (x - mean) + k_0)`` (``valid`` = 1 without a
    mask).
``scales(var, eps, weight, bias, *, xp) -> (invstd, scale, shift)``
    Per channel, ``invstd = 1 / sqrt(var + eps)``, ``scale = invstd * weight``
    and ``shift = bias``, float64 (``weight``/``bias`` None: 1 and 0).
``coefficients(k_dy, kinvstd, a, b, omega, *, xp) -> (k_x, k_0)``
    Per channel, ``k_x = k_dy * (kinvstd * b * omega)`` and
    ``k_0 = k_dy * a * omega`` (``omega`` a float): the factors of ``grad_input``.

The per-channel functions round every operation as the generic code does, in
the same order, so every backend gives the same bytes; the fused backends
compile them only to spare a call per NumPy operation.

Selection (:func:`select`): the ``backend=`` keyword of ``forward``, else the
``REFSYNCBN_BACKEND`` environment variable, else automatic: CuPy
float32/float64 arrays -> ``cupy``; NumPy float32/float64 arrays -> ``numba`` when it imports (else
``numpy``, with one :class:`BackendWarning`); anything else -> ``numpy``, whose
code is generic array-API code (with cache blocking for NumPy arrays). Backends
are imported on first use, never by ``import refsyncbn``.
"""

from __future__ import annotations

import importlib
import os
import warnings

import numpy as np

from .._xp import is_cupy_array

__all__ = ["BACKENDS", "ENV_VAR", "BackendWarning", "available", "select"]

BACKENDS = ("numpy", "numba", "cupy")
ENV_VAR = "REFSYNCBN_BACKEND"

_loaded: dict = {}
_warned = []


class BackendWarning(UserWarning):
    """The automatic choice fell back to a slower backend (issued once per process)."""


def _load(name):
    """The backend module ``name``; ImportError when it (or its package) is missing."""
    if name not in _loaded:
        _loaded[name] = importlib.import_module(f"{__name__}._{name}")
    return _loaded[name]


def _auto(x):
    """The automatic backend for ``x`` (see the module docstring)."""
    if is_cupy_array(x):
        try:
            module = _load("cupy")
        except ImportError:
            return _load("numpy")
        return module if module.supports(x) else _load("numpy")  # float16: generic code
    if isinstance(x, np.ndarray) and x.dtype in (np.float32, np.float64):
        try:
            return _load("numba")
        except ModuleNotFoundError as err:
            if err.name != __name__ + "._numba" and not _warned:
                _warned.append(True)
                warnings.warn(
                    f"refsyncbn: numba cannot be imported ({err}); using the slower "
                    f"NumPy kernels. Install numba, or set {ENV_VAR}=numpy to "
                    f"silence this warning.",
                    BackendWarning,
                    stacklevel=4,
                )
    return _load("numpy")


def select(x, backend=None):
    """The kernel backend module that runs input ``x``.

    Parameters
    ----------
    x : array
        The (validated) input array.
    backend : {"numpy", "numba", "cupy"}, optional
        Forced backend; default: the ``REFSYNCBN_BACKEND`` environment
        variable, else the automatic choice.

    Returns
    -------
    module
        A backend implementing the interface of this package; its name is
        ``module.NAME``.

    Raises
    ------
    ValueError
        If the backend name is unknown or the backend cannot be imported.
    TypeError
        If the forced backend cannot run ``x`` (e.g. ``numba`` on CuPy arrays).

    Examples
    --------
    >>> import numpy as np
    >>> select(np.zeros(3, np.float16)).NAME
    'numpy'
    >>> select(np.zeros(3), backend="numpy").NAME
    'numpy'
    """
    where = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        where = f"the environment variable {ENV_VAR}"
    if backend is None:
        return _auto(x)
    if backend not in BACKENDS:
        msg = f"{where} is {backend!r}; expected one of {', '.join(BACKENDS)} (or unset: automatic)"
        raise ValueError(msg)
    try:
        module = _load(backend)
    except ImportError as err:
        msg = f"{where} is {backend!r}, which cannot be imported here: {err}"
        raise ValueError(msg) from None
    if not module.supports(x):
        msg = (
            f"{where} is {backend!r}, which cannot run x of type {type(x).__name__} and "
            f"dtype {x.dtype}"
        )
        raise TypeError(msg)
    return module


def available() -> tuple:
    """Names of the backends that import in this process, in :data:`BACKENDS` order."""
    names = []
    for name in BACKENDS:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return tuple(names)
