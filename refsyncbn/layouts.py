"""Data formats: which axis holds the channels, and the canonical 3-D view.

Every supported ``data_format`` maps an input of shape ``x.shape`` to a view of
shape ``(A, C, B)`` whose statistics are reduced over axes 0 and 2:

* channel-first formats (``NC``, ``NCL``, ``NCHW``, ``NCDHW``):
  ``(N, C, prod(spatial))``;
* channel-last formats (``NLC``, ``NHWC``, ``NDHWC``):
  ``(N * prod(spatial), C, 1)``.

Both are plain reshapes, so a C-contiguous input is viewed, not copied. A mask
(valid positions, the shape of ``x`` without its channel axis) maps to
``(A, 1, B)`` the same way. Sparse COO values of shape ``(nnz, C)`` use ``NC``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DATA_FORMATS", "Layout", "get_layout"]


@dataclass(frozen=True)
class Layout:
    """A data format: its name, the input rank it expects and its channel axis."""

    data_format: str
    ndim: int
    channel_axis: int

    @property
    def channels_last(self) -> bool:
        return self.channel_axis == self.ndim - 1 and self.ndim > 2

    @property
    def code(self) -> int:
        """Small integer identifying the format (used when ranks compare calls)."""
        return DATA_FORMATS.index(self.data_format)

    def channels(self, shape) -> int:
        """Number of channels of an input of ``shape``."""
        return int(shape[self.channel_axis])

    def canonical_shape(self, shape) -> tuple[int, int, int]:
        """``(A, C, B)`` for an input of ``shape`` (see the module docstring)."""
        dims = [int(s) for s in shape]
        if self.channels_last:
            return (math.prod(dims[:-1]), dims[-1], 1)
        return (dims[0], dims[1], math.prod(dims[2:]))  # channel-first: C is axis 1

    def mask_shape(self, shape) -> tuple[int, ...]:
        """Shape a mask must have for an input of ``shape``: ``shape`` without C."""
        return tuple(int(s) for i, s in enumerate(shape) if i != self.channel_axis)

    def view(self, x, *, xp):
        """``x`` reshaped to ``(A, C, B)``."""
        return xp.reshape(x, self.canonical_shape(x.shape))

    def view_mask(self, mask, shape, *, xp):
        """A mask for an input of ``shape`` reshaped to ``(A, 1, B)``."""
        a, _, b = self.canonical_shape(shape)
        return xp.reshape(mask, (a, 1, b))

    def channel_vector_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector against the input."""
        return tuple(-1 if i == self.channel_axis else 1 for i in range(self.ndim))


_CHANNEL_AXIS = {
    "NC": (2, 1),
    "NCL": (3, 1),
    "NLC": (3, 2),
    "NCHW": (4, 1),
    "NHWC": (4, 3),
    "NCDHW": (5, 1),
    "NDHWC": (5, 4),
}

DATA_FORMATS = tuple(_CHANNEL_AXIS)
_LAYOUTS = {fmt: Layout(fmt, ndim, axis) for fmt, (ndim, axis) in _CHANNEL_AXIS.items()}


def get_layout(data_format: str) -> Layout:
    """The :class:`Layout` of ``data_format``.

    Raises
    ------
    ValueError
        If ``data_format`` is not one of :data:`DATA_FORMATS`.

    Examples
    --------
    >>> get_layout("NHWC").canonical_shape((2, 3, 4, 5))
    (24, 5, 1)
    >>> get_layout("NCHW").canonical_shape((2, 3, 4, 5))
    (2, 3, 20)
    """
    try:
        return _LAYOUTS[data_format]
    except (KeyError, TypeError):
        msg = f"data_format is {data_format!r}; expected one of {', '.join(DATA_FORMATS)}"
        raise ValueError(msg) from None
