"""Hypothesis strategies of SyncBatchNorm problems, for your own tests (``@given``).

:func:`cases` draws :class:`refsyncbn.cases.Case` objects: a global batch in
one of the seven data formats, spread unevenly over 1-4 ranks (empty ranks
included, at least one non-empty rank per group), optional MindSpore-style
process groups (ragged and non-contiguous, e.g. ``[[0, 2], [1, 3]]`` or
``[[0], [1, 2, 3]]``), float16/float32/float64, every convention, affine
on/off, training or eval, with or without ``dy`` and a mask. Every dimension
can be restricted by a parameter.

``regime=`` picks value distributions that break weak implementations
(:data:`REGIMES`); :func:`hard_cases` mixes them all:

``"generic"``
    per-channel mean in [-10, 10], std in [0.1, 10]; some channels hold
    small integers (ties, exactly representable).
``"cancellation"``
    ``|mean| / std`` between 1e2 and 1e4: a float32 ``E[x^2] - E[x]^2``
    loses every digit.
``"tiny_variance"``
    variance 1e-6 to 1 times ``eps``: ``eps`` placement decides the answer.
``"one_sample"``
    every group holds ONE value per channel (variance 0; unbiased
    corrections undefined). Excludes ``torch`` (which raises there or gives
    a NaN running variance) and ``flax`` (whose empty devices make the group
    NaN) unless ``conventions`` names them.
``"float16_overflow"``
    float16 values of magnitude 256 to ~450: every square (so every sum of
    squares) overflows float16; only a wider accumulator gets them right.
``"huge_count"``
    4096 to 16384 elements per channel in every group (one or two
    channels; fewer valid ones with a mask), enough to stall a float16
    running sum.

Array values come from a NumPy generator seeded by a drawn integer, so
examples are cheap; hypothesis still shrinks shapes, splits and groups.
Outside the ``"one_sample"`` regime, ``torch`` cases hold at least two values
per channel in every group (PyTorch raises otherwise), counting valid mask
positions only.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import strategies as st

from ..cases import Case
from ..conventions import CONVENTIONS, get_convention
from ..layouts import DATA_FORMATS, get_layout

__all__ = ["DTYPES", "HARD_REGIMES", "REGIMES", "cases", "hard_cases", "process_groups"]

DTYPES = ("float16", "float32", "float64")
REGIMES = (
    "generic",
    "cancellation",
    "tiny_variance",
    "one_sample",
    "float16_overflow",
    "huge_count",
)
HARD_REGIMES = REGIMES[1:]


def process_groups(world_size: int):
    """Strategy: ``None`` (one group of all ranks) or a partition of the ranks.

    Groups are drawn as a shuffled list of ranks cut into pieces, so every
    partition can occur: ragged (``[[0], [1, 2, 3]]``), non-contiguous
    (``[[0, 2], [1, 3]]``), ranks listed out of order (``[[2, 0], [1]]``).

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=20)
    ... @given(process_groups(4))
    ... def check(groups):
    ...     assert groups is None or sorted(sum(groups, [])) == [0, 1, 2, 3]
    >>> check()
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        msg = f"world_size is {world_size!r}; expected an int >= 1"
        raise ValueError(msg)
    cuts = st.sets(st.integers(1, world_size - 1)) if world_size > 1 else st.just(set())
    partitions = st.tuples(st.permutations(range(world_size)), cuts).map(_cut)
    return st.none() | partitions


def _cut(perm_and_cuts) -> list[list[int]]:
    """The permutation cut before each position in ``cuts``."""
    perm, cuts = perm_and_cuts
    edges = [0, *sorted(cuts), len(perm)]
    return [list(perm[a:b]) for a, b in itertools.pairwise(edges)]


def cases(
    *,
    regime="generic",
    world_sizes=(1, 2, 3, 4),
    data_formats=DATA_FORMATS,
    dtypes=DTYPES,
    conventions=None,
    affine=None,
    training=None,
    dy=None,
    mask=None,
    groups=True,
    empty_ranks=True,
    max_channels=3,
    max_local_batch=3,
    max_spatial=9,
):
    """Strategy of :class:`refsyncbn.cases.Case` objects.

    Parameters
    ----------
    regime : str
        One of :data:`REGIMES` (see the module docstring).
    world_sizes : sequence of int
        World sizes to draw from.
    data_formats, dtypes : sequence of str
        Data formats (:data:`refsyncbn.layouts.DATA_FORMATS`) and dtype names
        (:data:`DTYPES`) to draw from; parameters, running statistics and
        ``dy`` take the dtype of ``x``.
    conventions : sequence of str, optional
        Preset names; default all of them (all but ``torch`` and ``flax`` for
        ``"one_sample"``). The case uses the preset's ``eps`` and, at random,
        its default momentum or 0, 0.5, 1.
    affine, training, dy, mask : bool, optional
        Force weight/bias, training mode, an upstream gradient ``dy`` or a
        mask on (True) or off (False); ``None`` draws both.
    groups : bool
        Draw process groups (else ``groups=None``: one group of all ranks).
    empty_ranks : bool
        Allow ranks with an empty local batch (never a whole group).
    max_channels, max_local_batch, max_spatial : int
        Upper bounds on C, on the local batch size of a rank and on the
        product of the spatial dimensions (``"huge_count"`` ignores
        ``max_local_batch``: it spreads thousands of samples over the ranks).

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Drawing :class:`refsyncbn.cases.Case`.

    Raises
    ------
    ValueError
        For an unknown regime, data format, dtype or convention, empty
        choices, or a regime that the chosen dtypes cannot express
        (``"float16_overflow"`` without float16).

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10)
    ... @given(cases(world_sizes=[2], dtypes=["float64"], mask=False))
    ... def check(case):
    ...     assert case.world_size == 2 and case.x.dtype == "float64" and case.mask is None
    >>> check()
    """
    _check_choice("regime", [regime], REGIMES)
    _check_choice("data_formats", data_formats, DATA_FORMATS)
    _check_choice("dtypes", dtypes, DTYPES)
    if conventions is None:
        conventions = [c for c in CONVENTIONS if regime != "one_sample" or _finite_alone(c)]
    _check_choice("conventions", conventions, tuple(CONVENTIONS))
    if (
        isinstance(world_sizes, (str, int))
        or not world_sizes
        or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in world_sizes)
    ):
        msg = f"world_sizes is {world_sizes!r}; expected a non-empty sequence of ints >= 1"
        raise ValueError(msg)
    for name, value in (
        ("max_channels", max_channels),
        ("max_local_batch", max_local_batch),
        ("max_spatial", max_spatial),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name} is {value!r}; expected an int >= 1"
            raise ValueError(msg)
    if regime == "float16_overflow":
        if "float16" not in dtypes:
            msg = f"regime 'float16_overflow' needs 'float16' in dtypes; got {list(dtypes)}"
            raise ValueError(msg)
        dtypes = ["float16"]
    return _cases(
        regime=regime,
        world_sizes=sorted(world_sizes),
        data_formats=list(data_formats),
        dtypes=list(dtypes),
        conventions=list(conventions),
        affine=_flag(affine),
        training=_flag(training),
        dy=_flag(dy),
        mask=_flag(mask),
        groups=groups,
        empty_ranks=empty_ranks,
        max_channels=max_channels,
        max_local_batch=max_local_batch,
        max_spatial=max_spatial,
    )


def hard_cases(**kwargs):
    """Strategy mixing every regime of :data:`HARD_REGIMES` (same parameters as :func:`cases`).

    A regime the chosen ``dtypes`` cannot express (``"float16_overflow"``
    without float16) is left out, and ``"one_sample"`` never draws ``torch``
    or ``flax`` (raise or NaN there; ask :func:`cases` for those explicitly).

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10)
    ... @given(hard_cases(dtypes=["float32"], world_sizes=[1, 2]))
    ... def check(case):
    ...     assert case.x.dtype == "float32"
    >>> check()
    """
    dtypes = kwargs.get("dtypes", DTYPES)
    names = kwargs.pop("conventions", None) or list(CONVENTIONS)
    single = [c for c in names if _finite_alone(c)]
    chosen = []
    for r in HARD_REGIMES:
        if r == "float16_overflow" and "float16" not in dtypes:
            continue
        if r == "one_sample" and not single:
            continue
        chosen.append(cases(regime=r, conventions=single if r == "one_sample" else names, **kwargs))
    return st.one_of(chosen)


def _finite_alone(name) -> bool:
    """Whether one value per group gives finite results (no raise, no NaN) in ``name``."""
    conv = get_convention(name)
    return conv.single_value == "biased" and conv.empty_rank == "skip"


def _check_choice(name, values, allowed):
    if isinstance(values, str) or not values or any(v not in allowed for v in values):
        msg = f"{name} is {values!r}; expected a non-empty sequence of values from {allowed}"
        raise ValueError(msg)


def _flag(value):
    """Strategy for an on/off dimension: forced by a bool, drawn when ``None``."""
    if value is None:
        return st.booleans()
    if not isinstance(value, bool):
        msg = f"expected True, False or None for an on/off option; got {value!r}"
        raise ValueError(msg)
    return st.just(value)


@st.composite
def _cases(
    draw,
    *,
    regime,
    world_sizes,
    data_formats,
    dtypes,
    conventions,
    affine,
    training,
    dy,
    mask,
    groups,
    empty_ranks,
    max_channels,
    max_local_batch,
    max_spatial,
):
    """The composite behind :func:`cases` (arguments already validated)."""
    world = draw(st.sampled_from(world_sizes))
    fmt = draw(st.sampled_from(data_formats))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    conv_name = draw(st.sampled_from(conventions))
    conv = get_convention(conv_name)
    layout = get_layout(fmt)
    group_list = draw(process_groups(world)) if groups else None
    members = group_list or [list(range(world))]
    # Values per channel in each group: 1 in "one_sample"; at least 2 for torch
    # elsewhere (PyTorch raises on a single value); otherwise at least 1.
    min_count = 2 if conv.single_value != "biased" and regime != "one_sample" else 1

    huge = regime == "huge_count"
    c = draw(st.integers(1, 2 if huge else max_channels))
    n_spatial = layout.ndim - 2
    if regime == "one_sample":
        spatial = [1] * n_spatial
    else:
        side = max(1, round(max_spatial ** (1 / n_spatial))) if n_spatial else 1
        spatial = draw(st.lists(st.integers(1, side), min_size=n_spatial, max_size=n_spatial))
    inner = math.prod(spatial)
    # An empty rank makes every statistic of an empty_rank="nan" group NaN
    # (Flax); those conventions get none here (tests/test_conventions.py has them).
    empty_ranks = empty_ranks and conv.empty_rank == "skip"
    splits = draw(
        _splits(world, members, regime, empty_ranks, max_local_batch, -(-min_count // inner))
    )
    if huge:
        total = draw(st.integers(4096, 16384))
        shares = draw(
            st.lists(st.integers(0 if empty_ranks else 1, 8), min_size=world, max_size=world)
        )
        splits = _spread(-(-total // inner), shares, splits, members)

    shape = [sum(splits), *spatial]
    shape.insert(layout.channel_axis, c)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loc, scale = _channel_moments(draw, regime, c, conv.eps)
    x = _values(draw, rng, regime, shape, layout.channel_axis, loc, scale).astype(dtype)

    m = None
    if draw(mask):
        valid = rng.random(layout.mask_shape(shape)) < draw(st.floats(0.3, 1.0))
        m = _ensure_valid(valid, splits, members, min_count, every_rank=not empty_ranks)
    stat_shape = (c,)
    w = b = None
    if draw(affine):
        w = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
        b = rng.normal(size=c).astype(dtype)
    rm = (loc + 0.5 * scale * rng.normal(size=stat_shape)).astype(dtype)
    rv = (scale**2 * rng.uniform(0.5, 2.0, stat_shape)).astype(dtype)
    g = rng.normal(size=shape).astype(dtype) if draw(dy) else None
    momentum = draw(st.sampled_from((conv.momentum, 0.0, 0.5, 1.0)))
    return Case(
        x=x,
        running_mean=rm,
        running_var=rv,
        splits=tuple(splits),
        data_format=fmt,
        convention=conv_name,
        eps=conv.eps,
        momentum=momentum,
        training=draw(training),
        weight=w,
        bias=b,
        dy=g,
        mask=m,
        groups=group_list,
    )


@st.composite
def _splits(draw, world, members, regime, empty_ranks, max_local_batch, min_samples):
    """Local batch sizes: every group gets at least ``min_samples`` samples.

    ``"one_sample"``: exactly one sample per group, on one drawn member.
    """
    if regime == "one_sample":
        splits = [0] * world
        for group in members:
            splits[draw(st.sampled_from(group))] = 1
        return splits
    low = 0 if empty_ranks else 1
    splits = draw(st.lists(st.integers(low, max_local_batch), min_size=world, max_size=world))
    for group in members:
        short = min_samples - sum(splits[r] for r in group)
        if short > 0:
            splits[draw(st.sampled_from(group))] += short
    return splits


def _spread(samples, shares, floor, members):
    """``floor`` plus at least ``samples`` samples per group, in proportion to ``shares``."""
    out = list(floor)
    for group in members:
        weights = [shares[r] for r in group]
        if not any(weights):
            weights[0] = 1
        for r, s in zip(group, weights, strict=True):
            out[r] += -(-samples * s // sum(weights))
    return out


def _channel_moments(draw, regime, c, eps):
    """Per-channel (mean, std) of the data, float64 ``(C,)`` each."""

    def floats(lo, hi):
        return np.array(draw(st.lists(st.floats(lo, hi), min_size=c, max_size=c)))

    signs = np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=c, max_size=c)))
    if regime == "cancellation":
        scale = floats(0.5, 4.0)
        return signs * scale * 10.0 ** floats(2.0, 4.0), scale
    if regime == "tiny_variance":
        return floats(-2.0, 2.0), math.sqrt(eps) * 10.0 ** floats(-3.0, 0.0)
    if regime == "float16_overflow":
        return signs * floats(256.0, 400.0), floats(1.0, 20.0)
    if regime == "huge_count":
        return signs * floats(1.0, 10.0), floats(0.1, 2.0)
    return floats(-10.0, 10.0), floats(0.1, 10.0)


def _values(draw, rng, regime, shape, axis, loc, scale):
    """Float64 data of ``shape``: normal per channel, or small integers ("generic").

    ``"float16_overflow"`` pushes the values away from 0 (``loc + scale |z|``
    with the sign of ``loc``), so that ``|x| >= |loc| >= 256``.
    """
    bshape = [1] * len(shape)
    bshape[axis] = -1
    loc, scale = loc.reshape(bshape), scale.reshape(bshape)
    z = rng.standard_normal(shape)
    if regime == "generic" and draw(st.booleans()):
        return np.round(loc) + rng.integers(-3, 4, size=shape)
    if regime == "float16_overflow":
        return loc + np.sign(loc) * scale * np.abs(z)
    if regime == "tiny_variance":  # |x - loc| <= scale: the variance is at most scale^2 <= eps
        z = np.clip(z, -1.0, 1.0)
    return loc + scale * z


def _ensure_valid(valid, splits, members, min_count, every_rank=False):
    """``valid`` with the first positions of each group made valid up to ``min_count``.

    ``every_rank``: also the first position of every rank that has rows.
    """
    valid = valid.copy()
    starts = np.concatenate([[0], np.cumsum(splits)])
    if every_rank:
        for lo, hi in itertools.pairwise(starts):
            if hi > lo and not valid[lo:hi].any():
                valid[lo:hi].reshape(-1)[0] = True  # a view: valid is C-contiguous
    for group in members:
        rows = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in group])
        flat = valid[rows].reshape(-1)
        short = min_count - int(flat.sum())
        if short > 0:
            flat[np.flatnonzero(~flat)[:short]] = True
            valid[rows] = flat.reshape(valid[rows].shape)
    return valid
