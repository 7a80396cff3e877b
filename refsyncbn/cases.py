"""The npz case-file schema "refsyncbn case v1", shared by the CLI and ``testing``.

A case file holds one SyncBatchNorm problem over a world of ``W`` ranks:

========================  ====================================================
key                       meaning
========================  ====================================================
``schema``                the string ``"refsyncbn case v1"``
``x``                     global batch, batch axis 0, layout ``data_format``
``dy``                    optional, shape of ``x``: upstream gradient
``weight``, ``bias``      optional ``(C,)``; absent means affine off
``running_mean``,         ``(C,)`` running statistics before the step
``running_var``
``splits``                int ``(W,)``: local batch sizes in rank order (0 ok)
``groups``                optional int ``(G, K)``: world ranks per group, rows
                          padded with -1; absent means one group of all ranks
``mask``                  optional bool, shape of ``x`` without its C axis
``eps``, ``momentum``     floats (momentum in the convention's own meaning)
``data_format``           ``NC, NCL, NLC, NCHW, NHWC, NCDHW, NDHWC``
``convention``            ``reference, torch, paddle, mindspore, keras, flax,
                          chainermn``
``training``              optional bool, default true
``variance``              optional str, ``"stable"`` (default) or ``"naive"``:
                          :func:`refsyncbn.forward`'s variance algorithm
========================  ====================================================

A per-rank result file (``rank{r}.npz``) holds ``y``, ``dx``, ``dweight``,
``dbias``, ``running_mean``, ``running_var`` (the gradients only when ``dy``
was given; parameter gradients only with affine).
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .comm.groups import group_comm, validate_process_groups
from .conventions import CONVENTIONS
from .functional import VARIANCE_ALGORITHMS, backward, forward
from .layouts import DATA_FORMATS, get_layout

__all__ = [
    "RESULT_KEYS",
    "SCHEMA",
    "Case",
    "read_case",
    "read_result",
    "run_rank",
    "write_case",
    "write_result",
]

SCHEMA = "refsyncbn case v1"
RESULT_KEYS = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
_OPTIONAL_ARRAYS = ("dy", "weight", "bias", "mask")


@dataclass(frozen=True, eq=False)
class Case:
    """One SyncBatchNorm problem: the global batch and how it is spread over ranks."""

    x: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    splits: tuple[int, ...]
    data_format: str = "NCHW"
    convention: str = "reference"
    eps: float = 1e-5
    momentum: float = 0.9
    training: bool = True
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    dy: np.ndarray | None = None
    mask: np.ndarray | None = None
    groups: list[list[int]] | None = field(default=None)
    variance: str = "stable"

    def __post_init__(self):
        _check(self)

    @property
    def world_size(self) -> int:
        return len(self.splits)

    def bounds(self, rank: int) -> tuple[int, int]:
        """``(start, stop)`` of ``rank``'s slice of the batch axis."""
        start = sum(self.splits[:rank])
        return start, start + self.splits[rank]

    def shard(self, rank: int) -> dict:
        """``rank``'s local ``x`` (and ``dy``, ``mask`` when present)."""
        start, stop = self.bounds(rank)
        return {
            k: getattr(self, k)[start:stop]
            for k in ("x", "dy", "mask")
            if getattr(self, k) is not None
        }

    def group_of(self, rank: int) -> list[int]:
        """World ranks of the group holding ``rank``."""
        if self.groups is None:
            return list(range(self.world_size))
        return next(g for g in self.groups if rank in g)


def write_case(path, case: Case) -> None:
    """Write ``case`` to ``path`` (an ``.npz`` file) in schema v1."""
    arrays = {
        "schema": np.str_(SCHEMA),
        "x": case.x,
        "running_mean": case.running_mean,
        "running_var": case.running_var,
        "splits": np.asarray(case.splits, np.int64),
        "eps": np.float64(case.eps),
        "momentum": np.float64(case.momentum),
        "data_format": np.str_(case.data_format),
        "convention": np.str_(case.convention),
        "training": np.bool_(case.training),
        "variance": np.str_(case.variance),
    }
    arrays.update({k: getattr(case, k) for k in _OPTIONAL_ARRAYS if getattr(case, k) is not None})
    if case.groups is not None:
        width = max(len(g) for g in case.groups)
        arrays["groups"] = np.array([g + [-1] * (width - len(g)) for g in case.groups], np.int64)
    np.savez(path, **arrays)


def read_case(path) -> Case:
    """Read and validate a schema-v1 case file.

    Raises
    ------
    ValueError
        Naming the key that is missing or wrong.
    """
    path = Path(path)
    data = _load_npz(path, "case file")
    schema = str(data.pop("schema", ""))
    if schema != SCHEMA:
        msg = f"{path}: key 'schema' is {schema!r}; expected {SCHEMA!r}"
        raise ValueError(msg)
    for key in ("x", "running_mean", "running_var", "splits"):
        if key not in data:
            msg = (
                f"{path}: key {key!r} is missing; a case needs x, running_mean, running_var, splits"
            )
            raise ValueError(msg)
    groups = data.pop("groups", None)
    if groups is not None:
        if groups.ndim != 2 or not np.issubdtype(groups.dtype, np.integer):
            msg = f"{path}: key 'groups' has shape {groups.shape}; expected a 2-D int array"
            raise ValueError(msg)
        groups = [[int(r) for r in row if r >= 0] for row in groups]
    kwargs = {
        k: data.pop(k) for k in ("x", "running_mean", "running_var", *_OPTIONAL_ARRAYS) if k in data
    }
    scalars = {
        "eps": float,
        "momentum": float,
        "data_format": str,
        "convention": str,
        "training": bool,
        "variance": str,
    }
    kwargs.update({k: conv(data.pop(k)[()]) for k, conv in scalars.items() if k in data})
    splits = data.pop("splits")
    if splits.ndim != 1 or not np.issubdtype(splits.dtype, np.integer):
        msg = (
            f"{path}: key 'splits' has shape {splits.shape}, dtype {splits.dtype}; expected 1-D int"
        )
        raise ValueError(msg)
    if data:
        msg = f"{path}: unknown key(s) {sorted(data)}; schema v1 has no such keys"
        raise ValueError(msg)
    try:
        return Case(splits=tuple(int(s) for s in splits), groups=groups, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_result(path, **arrays) -> None:
    """Write one rank's outputs (keys from :data:`RESULT_KEYS`, ``None`` skipped)."""
    unknown = set(arrays) - set(RESULT_KEYS)
    if unknown:
        msg = f"write_result: unknown key(s) {sorted(unknown)}; expected keys from {RESULT_KEYS}"
        raise ValueError(msg)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def read_result(path) -> dict:
    """One rank's outputs as a dict of arrays.

    Raises
    ------
    ValueError
        Naming the file when it is not a readable ``.npz`` archive.
    """
    return _load_npz(Path(path), "result file")


def _load_npz(path: Path, what: str) -> dict:
    """Every array of the ``.npz`` archive at ``path``; ValueError naming it if unreadable."""
    try:
        # Our own handle: np.load leaks the one it opens when the archive is corrupt.
        with open(path, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                loaded = None
            else:
                # A truncated or corrupt archive fails here or at np.load.
                with loaded:
                    data = {k: loaded[k] for k in loaded.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        msg = f"{path}: not a readable .npz {what} ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from None
    if loaded is None:
        msg = f"{path}: holds a single array; expected an .npz archive ({what})"
        raise ValueError(msg)
    return data


def _check(case: Case) -> None:
    """Raise ValueError naming the first key of ``case`` that breaks the schema."""
    if case.data_format not in DATA_FORMATS:
        msg = f"key 'data_format' is {case.data_format!r}; expected one of {DATA_FORMATS}"
        raise ValueError(msg)
    if case.convention not in CONVENTIONS:
        msg = f"key 'convention' is {case.convention!r}; expected one of {tuple(CONVENTIONS)}"
        raise ValueError(msg)
    if case.variance not in VARIANCE_ALGORITHMS:
        msg = f"key 'variance' is {case.variance!r}; expected one of {VARIANCE_ALGORITHMS}"
        raise ValueError(msg)
    layout = get_layout(case.data_format)
    if case.x.ndim != layout.ndim:
        msg = (
            f"key 'x' has shape {case.x.shape}; expected {layout.ndim}-D for data_format "
            f"{case.data_format!r}"
        )
        raise ValueError(msg)
    c = layout.channels(case.x.shape)
    for key in ("weight", "bias", "running_mean", "running_var"):
        v = getattr(case, key)
        if v is not None and v.shape != (c,):
            msg = f"key {key!r} has shape {v.shape}; expected ({c},)"
            raise ValueError(msg)
    if (case.weight is None) != (case.bias is None):
        msg = "keys 'weight' and 'bias' must be both present or both absent"
        raise ValueError(msg)
    if case.dy is not None and case.dy.shape != case.x.shape:
        msg = f"key 'dy' has shape {case.dy.shape}; expected {case.x.shape}, the shape of x"
        raise ValueError(msg)
    if case.mask is not None and case.mask.shape != layout.mask_shape(case.x.shape):
        msg = f"key 'mask' has shape {case.mask.shape}; expected {layout.mask_shape(case.x.shape)}"
        raise ValueError(msg)
    if not case.splits or any(s < 0 for s in case.splits) or sum(case.splits) != case.x.shape[0]:
        msg = (
            f"key 'splits' is {list(case.splits)}; expected W >= 1 non-negative local batch "
            f"sizes summing to x.shape[0] = {case.x.shape[0]}"
        )
        raise ValueError(msg)
    if case.groups is not None:
        try:
            groups = validate_process_groups(case.groups, case.world_size)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"key 'groups': {exc}") from None
        covered = sorted(r for g in groups for r in g)
        if covered != list(range(case.world_size)):
            msg = (
                f"key 'groups' is {case.groups}; expected every rank of the world "
                f"(0..{case.world_size - 1}) in exactly one group"
            )
            raise ValueError(msg)


def run_rank(
    case, comm, *, param_grads="local", variance=None, convert=None, statistics=False
) -> dict:
    """Run ``case`` on the calling rank of ``comm``; what ``rank{r}.npz`` holds.

    Collective over ``comm``, the WORLD communicator of the case (its size is
    ``case.world_size``, its rank the world rank): every rank must call it.
    The rank takes its slice ``case.shard(comm.rank)``, joins its group
    (``case.groups``), runs one forward pass and, when ``case.dy`` is given,
    one backward pass. The command line and the test suite both run cases
    through this function.

    Parameters
    ----------
    case : refsyncbn.cases.Case
        The problem, the same on every rank.
    comm : Communicator
        World communicator (``MPIComm``, a ``SimulatedWorld`` rank, ``LocalComm``).
    param_grads : {"local", "sum", "mean"} or None
        Reduction of the parameter gradients (:func:`refsyncbn.backward`;
        ``None``: the convention's). Default ``"local"``, as in result files.
    variance : {"stable", "naive"}, optional
        Overrides ``case.variance``.
    convert : callable, optional
        Maps each NumPy input array to the array type under test (e.g. an
        array-API namespace on a device); default: NumPy inputs.
    statistics : bool
        Also return ``mean`` and ``var``: the float64 per-channel statistics
        the forward pass normalized with.

    Returns
    -------
    dict
        ``y``, ``dx``, ``dweight``, ``dbias``, ``running_mean``,
        ``running_var`` (``None`` where absent): ``y``/``dx`` in the dtype of
        ``x``, parameter gradients in the dtype of ``weight``, running
        statistics in their own dtype; with ``statistics``, ``mean`` and ``var``.

    Raises
    ------
    ValueError
        On every rank, when ``comm.size != case.world_size`` or when the case
        is rejected by :func:`refsyncbn.forward` / :func:`refsyncbn.backward`.

    Examples
    --------
    >>> import numpy as np
    >>> case = Case(x=np.arange(12.0).reshape(6, 2), running_mean=np.zeros(2),
    ...             running_var=np.ones(2), splits=(2, 0, 4), data_format="NC")
    >>> from refsyncbn.comm import SimulatedWorld
    >>> outs = SimulatedWorld(3).run(lambda comm: run_rank(case, comm))
    >>> [o["y"].shape for o in outs]
    [(2, 2), (0, 2), (4, 2)]
    >>> outs[1]["running_mean"]
    array([0.5, 0.6])
    """
    if comm.size != case.world_size:
        msg = (
            f"the case has splits for {case.world_size} ranks but the world has "
            f"{comm.size}; run it on {case.world_size} ranks (mpiexec -n {case.world_size}, "
            f"or --world {case.world_size})"
        )
        raise ValueError(msg)

    def conv(a):
        return a if a is None or convert is None else convert(a)

    shard = {k: conv(v) for k, v in case.shard(comm.rank).items()}
    group = group_comm(comm, case.groups)
    try:
        res = forward(
            shard["x"],
            conv(case.weight),
            conv(case.bias),
            running_mean=conv(case.running_mean),
            running_var=conv(case.running_var),
            training=case.training,
            eps=case.eps,
            momentum=case.momentum,
            data_format=case.data_format,
            convention=case.convention,
            variance=case.variance if variance is None else variance,
            mask=shard.get("mask"),
            comm=group,
            xp=np if convert is None else None,
        )
        out = {
            "y": res.y,
            "running_mean": res.running_mean,
            "running_var": res.running_var,
            "dx": None,
            "dweight": None,
            "dbias": None,
        }
        if statistics:
            out.update(mean=res.saved.mean, var=res.saved.var)
        if case.dy is not None:
            grads = backward(shard["dy"], res.saved, param_grads=param_grads)
            out.update(dx=grads.dx, dweight=grads.dweight, dbias=grads.dbias)
    finally:
        if group is not comm and hasattr(group, "free"):
            group.free()
    return out
