"""The call signatures the ranks agree on before each pass (see ``comm.agreement``).

Each pass makes ONE call here: :func:`agree_forward` or :func:`agree_backward`
encode the call as int fields (codes from the tables below, floats as their
IEEE-754 bit patterns) and run the agreement, which raises on every rank when
any rank's call differs or fails validation.
"""

from __future__ import annotations

import struct

import numpy as np

from ._xp import compat_numpy
from .comm.agreement import agree
from .conventions import _CHOICES
from .layouts import DATA_FORMATS

__all__ = [
    "FLOAT_NAMES",
    "VARIANCE_CODES",
    "agree_backward",
    "agree_forward",
    "dtype_code",
    "reject",
]

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
VARIANCE_CODES = {"stable": 1, "naive": 2}
"""Codes of the variance algorithms (unknown names code 0)."""
_VARIANCE_NAMES = {code: name for name, code in VARIANCE_CODES.items()}
_NUMPY_CODES = {np.dtype(name): i for i, name in enumerate(FLOAT_NAMES) if hasattr(np, name)}


def dtype_code(dtype, xp) -> int:
    """Index of ``dtype`` in ``FLOAT_NAMES`` (-1 if not a supported float)."""
    if xp is compat_numpy:  # NumPy has no bfloat16: a dict lookup, not a scan
        return _NUMPY_CODES.get(dtype, -1)
    for i, name in enumerate(FLOAT_NAMES):
        if hasattr(xp, name) and dtype == getattr(xp, name):
            return i
    return -1


def agree_forward(
    comm,
    error,
    x,
    weight,
    bias,
    running_mean,
    mask,
    layout,
    conv,
    eps,
    momentum,
    variance,
    training,
    *,
    xp,
):
    """Agreement of a forward pass (training or eval); raises ``error`` on this rank."""
    if comm.size == 1:  # nothing to agree on (see ``agree``): skip building the record
        _raise(error)
        return
    ok = error is None
    fields = {
        "channels": layout.channels(x.shape) if ok else 0,
        "dtype": dtype_code(x.dtype, xp) if ok else -1,
        "data_format": layout.code,
        "variance": VARIANCE_CODES.get(variance, 0),
        **{rule: _CHOICES[rule].index(getattr(conv, rule)) for rule in _CHOICES},
        "eps": _bits(eps) if ok else 0,
        "momentum": _bits(momentum) if ok else 0,
        "weight": weight is not None,
        "bias": bias is not None,
        "running statistics": running_mean is not None,
        "mask": mask is not None,
    }
    op = "forward(training=True)" if training else "forward(training=False)"
    agree(comm, op, error, fields, _describe)


def reject(comm, error, op):
    """Agreement of a call this rank cannot even decode (bad namespace, convention, format)."""
    agree(comm, op, error)


def agree_backward(comm, error, dy, saved, param_grads, *, xp):
    """Agreement of a backward pass; raises ``error`` on this rank."""
    if comm.size == 1:
        _raise(error)
        return
    ok = error is None
    fields = {
        "channels": saved.layout.channels(saved.shape),
        "dtype": dtype_code(dy.dtype, xp) if ok else -1,
        "data_format": saved.layout.code,
        "training": saved.training,
        "param_grads": _CHOICES["param_grads"].index(param_grads) if ok else -1,
        "weighting": _CHOICES["weighting"].index(saved.convention.weighting),
        "weight": saved.weight is not None,
        "mask": saved.mask3 is not None,
    }
    agree(comm, "backward", error, fields, _describe)


def _raise(error):
    """Raise ``error`` unless it is None (what ``agree`` does on a one-rank communicator)."""
    if error is not None:
        raise error


def _bits(value) -> int:
    """The IEEE-754 float64 bit pattern of ``value`` as an int."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _describe(field, code) -> str:
    """How a rank's field reads in an error message."""
    if field == "channels":
        return f"{code} channels"
    if field in ("eps", "momentum"):
        return f"{field}={struct.unpack('<d', struct.pack('<q', code))[0]!r}"
    if field in ("weight", "bias", "running statistics", "mask"):
        return f"{field} {'given' if code else 'None'}"
    if field == "variance":
        return f"variance {_VARIANCE_NAMES.get(code, 'unsupported')}"
    names = {
        "dtype": FLOAT_NAMES,
        "data_format": DATA_FORMATS,
        "training": ("False", "True"),
        **_CHOICES,
    }[field]
    return f"{field} {names[code] if 0 <= code < len(names) else 'unsupported'}"
