"""A small sparse COO container: ``indices (ndim_sparse, nnz)``, ``values (nnz, C)``.

Batch norm on a COO tensor (Paddle's ``sparse.nn.BatchNorm``/``SyncBatchNorm``)
runs the dense core on ``values`` as data format ``NC``: statistics over the
stored sites only (implicit zeros excluded, explicit zeros included, duplicate
indices counted as separate rows), and the output reuses the input indices.
The layers in :mod:`refsyncbn.layer` accept a :class:`SparseCooTensor` directly.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._xp import to_numpy

__all__ = ["SparseCooTensor"]


class SparseCooTensor:
    """Coordinates plus per-site channel vectors, like Paddle's ``SparseCooTensor``.

    Parameters
    ----------
    indices : int array of shape (ndim_sparse, nnz)
        Coordinates of the stored sites (duplicates allowed, any order).
    values : array of shape (nnz, C)
        Channel vector of each stored site (any array namespace).
    shape : sequence of int
        Dense shape ``(*sparse_shape, C)``, e.g. ``(N, D, H, W, C)`` for NDHWC.

    Raises
    ------
    TypeError
        If ``shape`` holds non-integers or ``indices`` is not an integer array.
    ValueError
        If the shapes disagree or an index is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> dense = np.array([[[1.0, 2.0], [0.0, 0.0], [3.0, 0.0], [0.0, 0.0]]])  # (1, 4, 2)
    >>> coo = SparseCooTensor.from_dense(dense)
    >>> coo.indices
    array([[0, 0],
           [0, 2]])
    >>> coo.values
    array([[1., 2.],
           [3., 0.]])
    >>> bool((coo.to_dense() == dense).all())
    True
    """

    def __init__(self, indices, values, shape):
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
            msg = f"shape is {tuple(shape)!r}; expected a sequence of ints"
            raise TypeError(msg)
        shape = tuple(int(s) for s in shape)
        idx = to_numpy(indices)
        if not np.issubdtype(idx.dtype, np.integer):
            msg = f"indices has dtype {idx.dtype}; expected an integer array"
            raise TypeError(msg)
        if values.ndim != 2:
            msg = (
                f"values has shape {tuple(values.shape)}; expected (nnz, C): one channel "
                f"vector per stored site"
            )
            raise ValueError(msg)
        nnz, c = (int(s) for s in values.shape)
        if idx.ndim != 2 or idx.shape != (len(shape) - 1, nnz):
            msg = (
                f"indices has shape {idx.shape}; expected ({len(shape) - 1}, {nnz}) for "
                f"shape {shape} and {nnz} stored sites"
            )
            raise ValueError(msg)
        if len(shape) < 2 or shape[-1] != c:
            msg = (
                f"shape is {shape}; expected (*sparse_shape, C) with C = {c}, the channel "
                f"count of values"
            )
            raise ValueError(msg)
        bad = (idx < 0) | (idx >= np.asarray(shape[:-1], dtype=np.int64)[:, None])
        if bad.any():
            d, k = (int(i[0]) for i in np.nonzero(bad))
            msg = (
                f"indices[{d}, {k}] is {int(idx[d, k])}; expected a coordinate in "
                f"[0, {shape[d]}) for axis {d} of shape {shape}"
            )
            raise ValueError(msg)
        self.indices = idx.astype(np.int64, copy=False)
        self.values = values
        self.shape = shape

    @property
    def nnz(self) -> int:
        """Number of stored sites (rows of ``values``)."""
        return int(self.values.shape[0])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def from_dense(cls, x):
        """COO of ``x`` (NumPy, channel axis last): a site is stored if any channel is nonzero.

        Paddle's ``Tensor.to_sparse_coo(x.ndim - 1)``.
        """
        x = to_numpy(x)
        sites = np.nonzero((x != 0).any(axis=-1))
        return cls(np.stack(sites) if sites else np.zeros((0, 0), np.int64), x[sites], x.shape)

    @classmethod
    def from_coords(cls, coords, values, shape):
        """COO from scipy-style coordinates: one 1-D integer array per sparse axis.

        Examples
        --------
        >>> import numpy as np
        >>> coo = SparseCooTensor.from_coords(([0, 0], [0, 2]), np.ones((2, 3)), (1, 4, 3))
        >>> coo.nnz, coo.shape
        (2, (1, 4, 3))
        """
        idx = np.stack([np.asarray(c).reshape(-1) for c in coords]) if len(coords) else None
        if idx is None:
            idx = np.zeros((0, values.shape[0]), np.int64)
        return cls(idx, values, shape)

    def with_values(self, values) -> SparseCooTensor:
        """A COO tensor with the same indices and shape and new ``values``."""
        return SparseCooTensor(self.indices, values, self.shape)

    def to_dense(self) -> np.ndarray:
        """Dense NumPy array; values at duplicate indices are summed, others are 0."""
        values = to_numpy(self.values)
        out = np.zeros(self.shape, dtype=values.dtype)
        np.add.at(out, tuple(self.indices), values)
        return out

    def __repr__(self):
        return f"SparseCooTensor(shape={self.shape}, nnz={self.nnz})"
