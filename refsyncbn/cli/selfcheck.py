"""``refsyncbn selfcheck``: random cases on every rank vs the float64 oracle, with a report.

Run it under an MPI launcher (``mpiexec -n 4 python -m mpi4py -m refsyncbn
selfcheck``), or in one process with ``--world W`` (W ranks as threads). Every
rank builds the same seeded cases: uneven local batches with an empty rank
(where the group allows), random ragged and non-contiguous process groups
(where the world allows), every data format and convention, float32 and
float64, masks, eval mode. Every rank runs each case with
:func:`refsyncbn.cases.run_rank`, compares its outputs with
:func:`refsyncbn.testing.expected_outputs` (float64, computed on the
concatenated global batch) under the bounds of :data:`MODEL`, the
:class:`~refsyncbn.testing.ErrorModel` of the reference's own arithmetic (the
same model ``check`` and ``assert_sync_batch_norm_close`` use), and counts the
collectives it joined; the verdicts are all-reduced, so every rank exits with
the same status, and rank 0 prints the report (progress goes to stderr).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from .. import kernels
from ..cases import RESULT_KEYS, Case, run_rank
from ..comm import SimulatedWorld, default_comm, launched_by_mpiexec
from ..comm.counting import CountingComm
from ..conventions import CONVENTIONS
from ..layouts import DATA_FORMATS, get_layout
from ..testing.oracle import expected_outputs
from ..testing.tolerances import ErrorModel, compare_outputs
from ._common import Progress, int_at_least, positive_int

__all__ = ["MODEL", "add_arguments", "build_cases", "case_error", "main"]

#: The reference's arithmetic: float64 accumulation, cancellation-free
#: variance, pairwise sums. Its bounds hold float32 outputs to their rounding
#: and float64 outputs to a small multiple of u64 times the conditioning.
MODEL = ErrorModel("float64")
_DTYPES = ("float64", "float32")
_FIELDS = 5  # per case and rank: err/bound, worst output, int all-reduces, float all-reduces, s


def build_cases(world_size: int, n_cases: int, seed: int) -> list[Case]:
    """``n_cases`` random cases for ``world_size`` ranks, the same for every caller.

    Case ``i`` uses data format ``i mod 7``, convention ``(i + i // 7) mod 7``
    and float64 for even ``i``, float32 for odd ``i``, so 14 cases cover every
    format and convention in both dtypes, 49 every (format, convention) pair
    and 98 every pair in both dtypes. Every group holds at least two
    statistic elements. Cases ``i = 4, 5 (mod 6)`` (a float64 and a float32
    one) have large channel offsets: ``|mean| / std`` from 1e3 to 1e8
    (float64) or 1e6 (float32), where ``E[x^2] - E[x]^2`` would cancel.

    Examples
    --------
    >>> cases = build_cases(3, 14, seed=0)
    >>> sorted({c.data_format for c in cases}) == sorted(DATA_FORMATS)
    True
    >>> all(c.world_size == 3 for c in cases)
    True
    >>> float(abs(cases[4].x).mean() / cases[4].x.std(axis=0).min()) > 1e2   # a large offset
    True
    """
    names = list(CONVENTIONS)
    return [
        _random_case(
            np.random.default_rng([seed, i]),
            world_size,
            DATA_FORMATS[i % 7],
            names[(i + i // 7) % 7],
            _DTYPES[i % 2],
            large_offset=i % 6 >= 4,
        )
        for i in range(n_cases)
    ]


def _random_groups(rng, w):
    """None (one group) or a random partition of ``range(w)`` into 2 or 3 groups."""
    if w < 2 or rng.random() < 0.35:
        return None
    k = int(rng.integers(2, min(w, 3) + 1))
    cuts = np.sort(rng.choice(np.arange(1, w), size=k - 1, replace=False))
    return [sorted(int(r) for r in part) for part in np.split(rng.permutation(w), cuts)]


def _random_case(rng, w, data_format, convention, dtype, *, large_offset=False) -> Case:
    """One random case (see :func:`build_cases`)."""
    groups = _random_groups(rng, w)
    splits = [int(s) for s in rng.integers(1, 4, size=w)]
    shared = [g for g in (groups or [list(range(w))]) if len(g) > 1]
    if shared:  # an empty rank, in a group that has another rank
        group = shared[int(rng.integers(len(shared)))]
        splits[group[int(rng.integers(len(group)))]] = 0
    for g in groups or [list(range(w))]:
        if sum(splits[r] for r in g) < 2:  # at least 2 samples per group
            splits[next(r for r in g if splits[r])] += 1
    layout = get_layout(data_format)
    c = int(rng.integers(1, 5))
    spatial = [int(s) for s in rng.integers(1, 4, size=layout.ndim - 2)]
    shape = [sum(splits), *spatial]
    shape.insert(layout.channel_axis, c)
    scale = 10.0 ** rng.uniform(-1, 1, size=c)
    offset = rng.uniform(-3, 3, size=c)
    if large_offset:
        top = 8.0 if dtype == "float64" else 6.0
        offset = rng.choice([-1.0, 1.0], size=c) * scale * 10.0 ** rng.uniform(3, top, size=c)
    bshape = [1] * layout.ndim
    bshape[layout.channel_axis] = c
    x = rng.standard_normal(shape) * scale.reshape(bshape) + offset.reshape(bshape)
    affine = rng.random() < 0.75
    training = rng.random() < 0.85
    mask = None
    if training and rng.random() < 0.3:
        mask = rng.random(layout.mask_shape(shape)) < 0.7
        for start in np.cumsum([0, *splits[:-1]]):
            mask[start : start + 2] = True  # >= 2 valid positions in every group
    conv = CONVENTIONS[convention]

    def arr(a):
        return np.asarray(a, dtype=dtype)

    return Case(
        x=arr(x),
        dy=arr(rng.standard_normal(shape)),
        weight=arr(rng.uniform(0.5, 2, c)) if affine else None,
        bias=arr(rng.standard_normal(c)) if affine else None,
        running_mean=arr(rng.standard_normal(c)),
        running_var=arr(rng.uniform(0.5, 2, c)),
        splits=tuple(splits),
        data_format=data_format,
        convention=convention,
        eps=conv.eps,
        momentum=conv.momentum,
        training=training,
        mask=mask,
        groups=groups,
    )


def case_error(case, rank: int, outputs: dict, expected: dict) -> tuple[float, str]:
    """Worst ``|got - expected| / bound`` of ``rank``'s outputs of ``case`` under :data:`MODEL`.

    ``expected`` is this rank's :func:`refsyncbn.testing.expected_outputs`
    (local parameter gradients); the bounds are :meth:`ErrorModel.bounds` of
    the case, element by element (:func:`refsyncbn.testing.compare_outputs`).
    Returns the worst ratio (``inf`` for a missing output, a shape mismatch
    or a non-finite value where another is expected; at most 1 passes) and
    the name of that output.

    Examples
    --------
    >>> from refsyncbn.testing.oracle import expected_outputs
    >>> case = Case(x=np.array([[1.0], [2.0], [4.0]]), running_mean=np.zeros(1),
    ...             running_var=np.ones(1), splits=(3,), data_format="NC")
    >>> exp = expected_outputs(case)[0]
    >>> out = {"y": exp["y"].copy(), "running_mean": exp["running_mean"],
    ...        "running_var": exp["running_var"]}
    >>> case_error(case, 0, out, exp)
    (0.0, 'y')
    >>> out["y"][0] += 1e-9
    >>> case_error(case, 0, out, exp)[0] > 1
    True
    """
    bounds = MODEL.bounds(case, param_grads="local")[rank]
    checks = compare_outputs([outputs], [expected], [bounds], data_format=case.data_format)
    worst = max(checks, key=lambda c: c.ratio)
    return worst.ratio, worst.quantity


def check_rank(cases, comm, progress=None) -> np.ndarray:
    """Run and check every case on this rank; the all-reduced ``(size, cases, 5)`` table.

    Collective over ``comm`` (the world): row ``r`` holds rank ``r``'s
    err/bound, worst-output index, int and float all-reduce counts and seconds
    per case; every rank returns the same table. ``progress`` (a
    :class:`~refsyncbn.cli._common.Progress`) is updated after each case.
    """
    table = np.zeros((comm.size, len(cases), _FIELDS))
    for i, case in enumerate(cases):
        counting = CountingComm(comm)
        start = time.perf_counter()
        outputs = run_rank(case, counting)
        seconds = time.perf_counter() - start
        expected = expected_outputs(case, param_grads="local")[comm.rank]
        err, key = case_error(case, comm.rank, outputs, expected)
        calls = counting.tally.calls
        table[comm.rank, i] = [err, RESULT_KEYS.index(key), calls["agree"], calls["data"], seconds]
        if progress is not None:
            progress.update()
    return comm.allreduce_sum(table.reshape(-1), xp=np).reshape(table.shape)


def add_arguments(parser) -> None:
    """Arguments of the ``selfcheck`` subcommand."""
    parser.add_argument(
        "--cases",
        type=positive_int,
        default=98,
        metavar="N",
        help="number of random cases (default 98: every (format, "
        "convention) pair in float64 and in float32)",
    )
    parser.add_argument(
        "--seed",
        type=int_at_least(0),
        default=0,
        metavar="S",
        help="seed of the random cases (default 0)",
    )
    parser.add_argument(
        "--world",
        type=positive_int,
        metavar="W",
        help="run W ranks as threads of this process instead of under mpiexec",
    )


def main(args) -> int:
    """Build, run and check the cases; print the report on rank 0; 0 when all pass."""
    start = time.perf_counter()
    if args.world is not None:
        if launched_by_mpiexec():
            msg = (
                "--world runs ranks as threads of one process; under mpiexec leave it out "
                "(the MPI ranks are the world)"
            )
            raise ValueError(msg)
        world = SimulatedWorld(args.world)
        cases = build_cases(args.world, args.cases, args.seed)
        with Progress(len(cases), "selfcheck", "case") as bar:
            table = world.run(
                lambda comm: check_rank(cases, comm, bar if comm.rank == 0 else None)
            )[0]
        rank, where = 0, f"{args.world} simulated ranks (threads of one process)"
    else:
        comm = default_comm()
        cases = build_cases(comm.size, args.cases, args.seed)
        with Progress(len(cases), "selfcheck", "case", enabled=comm.rank == 0) as bar:
            table = check_rank(cases, comm, bar)
        rank, where = comm.rank, _describe_world(comm)
    failed = int(np.sum(~(np.max(table[:, :, 0], axis=0) <= 1.0)))
    if rank == 0:
        print(_report(cases, table, where, args.seed, time.perf_counter() - start))
    return 1 if failed else 0


def _describe_world(comm) -> str:
    """ "4 MPI ranks (MPICH Version: 5.0.2)" or the one-process fallback."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return (
            "1 rank (not under an MPI launcher; try "
            "`mpiexec -n 4 python -m mpi4py -m refsyncbn selfcheck`)"
        )
    library = mpi.Get_library_version().strip().splitlines()[0]
    return f"{comm.size} MPI rank{'s' if comm.size > 1 else ''} ({' '.join(library.split())})"


def _offset(case) -> float:
    """Largest ``|mean| / std`` over the channels of the case's global batch (float64)."""
    x3 = get_layout(case.data_format).view(case.x.astype(np.float64), xp=np)
    if case.mask is not None:
        valid = get_layout(case.data_format).view_mask(case.mask, case.x.shape, xp=np)
        x3 = np.where(valid, x3, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nanmax(np.abs(np.nanmean(x3, axis=(0, 2))) / np.nanstd(x3, axis=(0, 2))))


def _report(cases, table, where, seed, wall) -> str:
    """The human-readable report printed by rank 0."""
    lines = [
        f"refsyncbn selfcheck: {where}",
        f"{len(cases)} random cases (seed {seed}) vs the float64 global-batch oracle",
        f"error model: refsyncbn.testing.ErrorModel({MODEL.accumulation!r}, "
        f"{MODEL.variance!r}, {MODEL.summation!r}), as in `check`; "
        f"err/bound = worst |got - expected| / bound",
        f"kernels: {kernels.select(np.empty(0)).NAME} (importable here: "
        f"{', '.join(kernels.available())}; {kernels.ENV_VAR} chooses)",
        "",
        f"{'case':>4}  {'format':<6} {'convention':<10} {'dtype':<7} {'mode':<10} "
        f"{'groups':<22} {'local batch per rank':<22} {'|mean|/std':>10} "
        f"{'all-reduces':<13} {'err/bound':>9}  {'worst':<12} verdict",
    ]
    worst_rank = np.argmax(np.nan_to_num(table[:, :, 0], nan=np.inf), axis=0)
    for i, case in enumerate(cases):
        row = table[worst_rank[i], i]
        err = float(np.max(table[:, i, 0]))
        ok = err <= 1.0
        mode = ("train" if case.training else "eval") + ("+mask" if case.mask is not None else "")
        groups = "all" if case.groups is None else str(case.groups).replace(" ", "")
        colls = f"{int(np.max(table[:, i, 2]))} int+{int(np.max(table[:, i, 3]))} flt"
        lines.append(
            f"{i:>4}  {case.data_format:<6} {case.convention:<10} "
            f"{case.x.dtype.name:<7} {mode:<10} {groups:<22} "
            f"{list(case.splits)!s:<22} {_offset(case):>10.2g} {colls:<13} {err:>9.3g}  "
            f"{RESULT_KEYS[int(row[1])]:<12} {'ok' if ok else 'FAIL'}"
        )
    errs = np.max(table[:, :, 0], axis=0)
    failed = int(np.sum(~(errs <= 1.0)))
    lines += [
        "",
        "all-reduces per rank and case: int = agreement (group creation and every pass, "
        "eval included), flt = packed statistics (one per training pass); a group of "
        "one rank skips the agreement; |mean|/std: the largest over the channels of "
        "the global batch",
        f"time in the cases: {np.max(np.sum(table[:, :, 4], axis=1)):.2f} s "
        f"(slowest rank); wall time {wall:.2f} s",
        (
            f"FAILED: {failed} of {len(cases)} cases exceed the error bound"
            if failed
            else f"PASSED: all {len(cases)} cases within tolerance "
            f"(worst err/bound {float(np.max(errs)):.3g})"
        ),
    ]
    return "\n".join(lines)
