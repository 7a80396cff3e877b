"""Every kernel backend against exact arithmetic and against the others.

Truth is computed with :class:`fractions.Fraction` from the float inputs (each
float is an exact rational), so no backend is checked against its own
formula. Shapes cover both loop orders of the fused backends (rows of ``B``
elements for NCHW-like views, ``(A, C*B)`` columns for NHWC/NC/short NCL),
non-contiguous views, masks, empty batches, NaN/Inf and the hard regime
``|mean| / std = 1e8``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest


def _has_cuda() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: CuPy imports but cannot run
        return False


HAS_NUMBA = importlib.util.find_spec("numba") is not None
HAS_CUDA = _has_cuda()
NUMBA = pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="needs numba"))
CUPY = pytest.param(
    "cupy", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CuPy and a CUDA device")
)
BACKENDS = ["numpy", NUMBA, CUPY]

# (A, C, B): rows order (B >= 32), columns order (B == 1, short B)
SHAPES = [(3, 2, 40), (5, 3, 1), (4, 3, 5)]
U64 = 2.0**-53


@pytest.fixture(params=["one-block", "four-row-sweeps", "row-sweeps"])
def block_sizes(monkeypatch, request):
    """The kernels' blocking as tiny arrays get it, and as large arrays do.

    ``one-block``: the default sizes, so a tiny array is a single block (Numba's
    column moments then skip the combination of blocks). The others cut blocks
    of 8 elements, so that tiny exact-arithmetic cases merge several blocks.
    Numba's column kernels sweep several rows at a time only for operands in
    cache (``_L2_BYTES``); ``row-sweeps`` turns that off, so that the
    row-by-row sweeps of large arrays are checked against exact arithmetic too.
    """
    if request.param == "one-block":
        return request.param
    for name in ("numpy", "numba"):
        if name == "numpy" or HAS_NUMBA:
            monkeypatch.setattr(_backend(name).module, "_BLOCK", 8)
    if request.param == "row-sweeps" and HAS_NUMBA:
        monkeypatch.setattr(_backend("numba").module, "_L2_BYTES", 0)
    return request.param


class _Backend:
    """A backend module called with NumPy arrays: CuPy's arguments and results are
    moved to and from the device, the others pass through."""

    def __init__(self, name):
        self.module = importlib.import_module(f"refsyncbn.kernels._{name}")
        self.cp = importlib.import_module("cupy") if name == "cupy" else None

    def __getattr__(self, attr):
        fn = getattr(self.module, attr)
        if self.cp is None:
            return fn
        cp = self.cp

        def on_device(*args, **kwargs):
            out = fn(*[cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args], **kwargs)
            return tuple(map(cp.asnumpy, out)) if isinstance(out, tuple) else cp.asnumpy(out)

        return on_device


def _backend(name):
    return _Backend(name)


def _data(shape, dtype, *, loc=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (loc + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def _mask(shape, seed=1):
    a, _, b = shape
    return np.random.default_rng(seed).random((a, 1, b)) < 0.6


def _views(shape, dtype):
    """``x3`` C-contiguous and the same values through a non-contiguous view."""
    x, dy = _data(shape, dtype)
    a, c, b = shape
    big = np.zeros((a, 2 * c, b + 3), dtype=dtype)
    big[:, ::2, 1 : b + 1] = x
    return [(x, dy), (big[:, ::2, 1 : b + 1], dy)]


def _exact_moments(x3, mask3):
    """Exact per-channel mean and M2 as Fractions (valid positions only)."""
    a, c, b = x3.shape
    out = []
    for ch in range(c):
        vals = [
            Fraction(float(x3[i, ch, j]))
            for i in range(a)
            for j in range(b)
            if mask3 is None or mask3[i, 0, j]
        ]
        if not vals:
            out.append((Fraction(0), Fraction(0)))
            continue
        mean = sum(vals) / len(vals)
        out.append((mean, sum((v - mean) ** 2 for v in vals)))
    return out


def _check_moments(mean, m2, x3, mask3, *, k=8, contract=True):
    """Mean within ``k u64 (|mean| + std)``, M2 within ``k n u64 (1 + |mean| / std) M2``.

    The accuracy contract (DESIGN section 2) allows the ``|mean| / std`` factor;
    ``contract=False`` drops it (what a merge free of first-order mean rounding
    reaches).
    """
    for ch, (em, em2) in enumerate(_exact_moments(x3, mask3)):
        n = x3.shape[0] * x3.shape[2] if mask3 is None else int(mask3.sum())
        std = float(em2 / n) ** 0.5 if n else 0.0
        assert abs(Fraction(float(mean[ch])) - em) <= k * U64 * (abs(float(em)) + std), ch
        ratio = abs(float(em)) / std if contract and std else 0.0
        assert abs(Fraction(float(m2[ch])) - em2) <= k * max(n, 1) * U64 * (1 + ratio) * float(
            em2
        ), ch


def _check_rounded(y, exact, size, dtype):
    """``y`` is ``exact`` rounded once to ``dtype`` after float64 work on terms of ``size``.

    Allowed: half an ulp of ``dtype`` (relative 1e-4 slack for double rounding) plus
    ``4 u64 size`` for the float64 operations before the store.
    """
    half_ulp = 0.5 * float(np.spacing(dtype(abs(float(exact))))) * 1.0001
    err = float(abs(Fraction(float(y)) - exact))
    assert err <= half_ulp + 4 * U64 * size, (float(y), float(exact), err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.usefixtures("block_sizes")
class TestAgainstExactArithmetic:
    def test_moments(self, backend, shape, dtype, masked):
        k = _backend(backend)
        mask3 = _mask(shape) if masked else None
        for x3, _ in _views(shape, dtype):
            mean, m2 = k.moments(x3, mask3, xp=np)
            assert mean.dtype == m2.dtype == np.float64 and mean.shape == (shape[1],)
            _check_moments(mean, m2, x3, mask3)

    def test_normalize_is_rounded_once(self, backend, shape, dtype, masked):
        k = _backend(backend)
        rng = np.random.default_rng(2)
        c = shape[1]
        mean, scale, shift = rng.standard_normal(c), rng.random(c) + 0.5, rng.standard_normal(c)
        for x3, _ in _views(shape, dtype):
            y = k.normalize(x3, mean, scale, shift, xp=np, dtype=dtype)
            assert y.dtype == dtype and y.shape == shape
            for i, ch, j in np.ndindex(*shape[:2], min(shape[2], 50)):
                d = (Fraction(float(x3[i, ch, j])) - Fraction(mean[ch])) * Fraction(scale[ch])
                _check_rounded(y[i, ch, j], d + Fraction(shift[ch]), abs(d) + abs(shift[ch]), dtype)

    def test_grad_sums(self, backend, shape, dtype, masked):
        k = _backend(backend)
        mean = np.random.default_rng(3).standard_normal(shape[1])
        for x3, dy3 in _views(shape, dtype):
            a, b = k.grad_sums(dy3, x3, mean, np.ones_like(mean), xp=np)
            for ch in range(shape[1]):
                g = [Fraction(float(v)) for v in dy3[:, ch, :].ravel()]
                d = [Fraction(float(v)) - Fraction(mean[ch]) for v in x3[:, ch, :].ravel()]
                ea, eb = sum(g), sum(gi * di for gi, di in zip(g, d, strict=True))
                n = len(g)
                assert abs(Fraction(float(a[ch])) - ea) <= 2 * n * U64 * sum(abs(v) for v in g)
                assert abs(Fraction(float(b[ch])) - eb) <= 3 * n * U64 * sum(
                    abs(gi * di) for gi, di in zip(g, d, strict=True)
                )

    def test_grad_input_is_rounded_once(self, backend, shape, dtype, masked):
        k = _backend(backend)
        rng = np.random.default_rng(4)
        c = shape[1]
        mask3 = _mask(shape) if masked else None
        mean, k_dy, k_x, k_0 = rng.standard_normal((4, c))
        for x3, dy3 in _views(shape, dtype):
            dx = k.grad_input(dy3, x3, mean, k_dy, k_x, k_0, mask3, xp=np, dtype=dtype)
            assert dx.dtype == dtype and dx.shape == shape
            for i, ch, j in np.ndindex(*shape[:2], min(shape[2], 50)):
                valid = mask3 is None or mask3[i, 0, j]
                ex = Fraction(k_dy[ch]) * Fraction(float(dy3[i, ch, j]))
                if valid:
                    ex -= Fraction(k_x[ch]) * (
                        Fraction(float(x3[i, ch, j])) - Fraction(mean[ch])
                    ) + Fraction(k_0[ch])
                size = (
                    abs(k_dy[ch] * float(dy3[i, ch, j]))
                    + abs(k_x[ch] * (float(x3[i, ch, j]) - mean[ch]))
                    + abs(k_0[ch])
                )
                _check_rounded(dx[i, ch, j], ex, size, dtype)


@pytest.mark.parametrize("backend", [NUMBA])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.usefixtures("block_sizes")
def test_fused_moments_have_no_first_order_mean_rounding(backend, shape):
    """The fused moments (sums about a fixed pivot near the mean, never a rounded
    running mean) stay within ``k n u64`` of exact at ``|mean| / std = 1e8``,
    without the contract's factor."""
    x3, _ = _data(shape, np.float64, loc=1e8)
    mean, m2 = _backend(backend).moments(x3, None, xp=np)
    _check_moments(mean, m2, x3, None, contract=False)


def _check_moments_tight(mean, m2, x3, mask3, k):
    """Mean within ``k u64 (|mean| + std)`` and M2 within ``k u64 M2`` of exact: no
    factor of the element or block count (what a compensated combination reaches)."""
    for ch, (em, em2) in enumerate(_exact_moments(x3, mask3)):
        n = x3.shape[0] * x3.shape[2] if mask3 is None else int(mask3.sum())
        std = float(em2 / n) ** 0.5
        assert abs(Fraction(float(mean[ch])) - em) <= k * U64 * (abs(float(em)) + std), ch
        assert abs(Fraction(float(m2[ch])) - em2) <= k * U64 * float(em2), ch


def _outlier_cases():
    """A far-off first block in each loop order: a first row (rows of B = 32), a
    first block of rows (NC; with the fixture's 8-element blocks), the first
    column of each channel (short NCL, columns folded into channels), masked."""
    rng = np.random.default_rng(3)
    rows = 1e-3 * rng.standard_normal((150, 2, 32))
    rows[0] += 37.123456789
    nc = 1e-3 * rng.standard_normal((300, 2, 1))
    nc[:8] += 37.123456789
    ncl = 1e-3 * rng.standard_normal((100, 2, 5))
    ncl[:, :, 0] += 37.123456789
    mask = rng.random((100, 1, 5)) < 0.7
    return [(rows, None), (nc, None), (ncl, None), (ncl, mask)]


# (case, blocking): every case with blocks of 8 elements, swept four rows at a time
# and row by row (as large arrays are); with the default blocks too, except NC,
# which is then a single block and combines nothing.
_FAR_OFF = [(case, sweeps) for case in range(4) for sweeps in ("four-row", "row")] + [
    (case, "one-block") for case in (0, 2, 3)
]


@pytest.mark.parametrize("backend", [NUMBA])
@pytest.mark.parametrize(("case", "blocking"), _FAR_OFF)
def test_a_far_off_block_costs_no_accuracy(backend, case, blocking, monkeypatch):
    """One block far from the rest: its large term in the combination does not carry
    rounding of the order of the block count (it did: 1.4e3 u in M2). Within 4 u
    with blocks of 8 elements; 8 u where one block holds a whole column of 100
    rows, whose sum about the pivot rounds as any sum of 100 terms does."""
    module = _backend(backend).module
    if blocking != "one-block":
        monkeypatch.setattr(module, "_BLOCK", 8)
    if blocking == "row":
        monkeypatch.setattr(module, "_L2_BYTES", 0)
    x3, mask3 = _outlier_cases()[case]
    mean, m2 = module.moments(x3, mask3, xp=np)
    _check_moments_tight(mean, m2, x3, mask3, 8 if blocking == "one-block" else 4)


@pytest.mark.parametrize("backend", [NUMBA])
@pytest.mark.parametrize("case", range(4))
def test_a_far_pivot_is_replaced_by_the_mean(backend, case, monkeypatch):
    """A pivot 1e4 standard deviations from the mean (what an unlucky sample
    could give) is detected and the combination redone about the mean."""
    module = _backend(backend).module
    monkeypatch.setattr(module, "_BLOCK", 8)
    monkeypatch.setattr(module, "_sample_mean_rows", lambda x, mask: np.full(x.shape[1], 1e3))
    monkeypatch.setattr(
        module, "_sample_mean_cols", lambda x, mask, nb: np.full(x.shape[1] // nb, 1e3)
    )
    x3, mask3 = _outlier_cases()[case]
    mean, m2 = module.moments(x3, mask3, xp=np)
    _check_moments_tight(mean, m2, x3, mask3, 4)


class TestTheChecksCanFail:
    """Negative controls: each check rejects values just outside its bound."""

    def test_the_moment_check_rejects_the_sumsq_formula(self):
        """``Q - S^2 / n`` in float64 fails the moment check at ``|mean| / std = 1e8``."""
        x3, _ = _data((3, 2, 40), np.float64, loc=1e8)
        n = x3.shape[0] * x3.shape[2]
        s, q = x3.sum(axis=(0, 2)), (x3 * x3).sum(axis=(0, 2))
        with pytest.raises(AssertionError):
            _check_moments(s / n, q - s * s / n, x3, None)

    def test_the_moment_check_rejects_values_just_outside_its_bounds(self):
        x3, _ = _data((3, 2, 40), np.float64, loc=1e8)
        n, ratio = 120, 1e8  # |mean| / std ~ 1e8 (std ~ 1)
        mean, m2 = (
            np.array([float(v) for v in col]) for col in zip(*_exact_moments(x3, None), strict=True)
        )
        _check_moments(mean, m2, x3, None, contract=False)
        with pytest.raises(AssertionError):
            _check_moments(mean * (1 + 9 * U64) + 9 * U64, m2, x3, None)
        _check_moments(mean, m2 * (1 + 7 * n * U64 * ratio), x3, None)
        with pytest.raises(AssertionError):
            _check_moments(mean, m2 * (1 + 10 * n * U64 * ratio), x3, None)
        _check_moments(mean, m2 * (1 + 7 * n * U64), x3, None, contract=False)
        with pytest.raises(AssertionError):
            _check_moments(mean, m2 * (1 + 9 * n * U64), x3, None, contract=False)
        _check_moments_tight(mean, m2 * (1 + 2 * U64), x3, None, 4)
        with pytest.raises(AssertionError):
            _check_moments_tight(mean, m2 * (1 + 6 * U64), x3, None, 4)

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_the_rounding_check_rejects_one_ulp_off(self, dtype):
        exact = Fraction(1, 3)
        y = dtype(1 / 3)
        _check_rounded(y, exact, 0.0, dtype)
        with pytest.raises(AssertionError):
            _check_rounded(np.nextafter(y, dtype(1)), exact, 0.0, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.usefixtures("block_sizes")
class TestHardRegimes:
    @pytest.mark.parametrize("shape", SHAPES)
    def test_moments_exact_enough_at_mean_over_std_1e8(self, backend, shape):
        x3, _ = _data(shape, np.float64, loc=1e8)
        mean, m2 = _backend(backend).moments(x3, None, xp=np)
        _check_moments(mean, m2, x3, None)

    @pytest.mark.parametrize("shape", [(4, 2, 40), (9, 2, 1)])
    def test_far_apart_blocks_combine_exactly(self, backend, shape):
        x3, _ = _data(shape, np.float64)
        x3[: shape[0] // 2] += 1e6  # two populations, one per half of the batch
        mean, m2 = _backend(backend).moments(x3, None, xp=np)
        _check_moments(mean, m2, x3, None)

    @pytest.mark.parametrize("shape", [(0, 3, 5), (0, 3, 40), (2, 3, 0)])
    def test_no_element_gives_zero_moments_and_empty_outputs(self, backend, shape):
        k = _backend(backend)
        x3 = np.zeros(shape, np.float32)
        mean, m2 = k.moments(x3, None, xp=np)
        assert mean.tolist() == m2.tolist() == [0.0] * 3
        z = np.zeros(3)
        assert k.normalize(x3, z, z, z, xp=np, dtype=np.float32).shape == shape
        assert k.grad_sums(x3, x3, z, z, xp=np)[0].tolist() == [0.0] * 3
        assert k.grad_input(x3, x3, z, z, z, z, None, xp=np, dtype=np.float32).shape == shape

    def test_all_masked_channel_positions_give_zero_moments(self, backend):
        x3 = np.full((2, 2, 40), np.nan)
        mean, m2 = _backend(backend).moments(x3, np.zeros((2, 1, 40), bool), xp=np)
        assert mean.tolist() == m2.tolist() == [0.0, 0.0]

    @pytest.mark.parametrize("shape", [(3, 3, 40), (6, 3, 1)])
    def test_nan_and_inf_stay_in_their_channel(self, backend, shape, block_sizes):
        k = _backend(backend)
        x3, _ = _data(shape, np.float32)
        x3[1, 0, 0], x3[2, 1, 0] = np.inf, np.nan
        mean, m2 = k.moments(x3, None, xp=np)
        assert not np.isfinite(m2[0]) and np.isnan(mean[1]) and np.isnan(m2[1])
        if (
            block_sizes == "one-block"
        ):  # one +Inf in one block: the plain mean (merges may give NaN)
            assert mean[0] == np.inf
        _check_moments(mean[2:], m2[2:], x3[:, 2:], None)
        y = k.normalize(x3, mean, np.ones(3), np.zeros(3), xp=np, dtype=np.float32)
        assert np.isfinite(y[:, 2]).all() and not np.isfinite(y[:, :2]).any()

    def test_masked_out_nan_is_ignored(self, backend):
        k = _backend(backend)
        shape = (3, 2, 40)
        x3, dy3 = _data(shape, np.float64)
        mask3 = _mask(shape)
        x3[~np.broadcast_to(mask3, shape)] = np.nan
        mean, m2 = k.moments(x3, mask3, xp=np)
        _check_moments(mean, m2, x3, mask3)
        dx = k.grad_input(
            dy3, x3, mean, np.ones(2), np.ones(2), np.ones(2), mask3, xp=np, dtype=np.float64
        )
        assert np.isfinite(dx).all()


def _assert_within_one_ulp(a, b):
    """Same shape and dtype, same NaN/Inf positions, finite values at most 1 ulp apart."""
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(a[np.isinf(a)], b[np.isinf(a)])
    fin = np.isfinite(a) & np.isfinite(b)
    ulp = np.spacing(np.maximum(np.abs(a[fin]), np.abs(b[fin])))
    assert (np.abs(a[fin] - b[fin]) <= ulp).all(), np.max(np.abs(a[fin] - b[fin]) / ulp)


# larger shapes: several tiles of the NumPy backend and several blocks of the fused ones
AGREE_SHAPES = [(3, 4, 5000), (2, 2, 70000), (3000, 8, 1), (64, 1024, 1), (4, 3, 5), (700, 6, 7)]


@pytest.mark.parametrize("other", [NUMBA, CUPY])
@pytest.mark.parametrize("shape", AGREE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", ["plain", "masked", "strided", "nonfinite"])
def test_backends_agree(other, shape, dtype, variant):
    """A fused backend vs numpy: moments within float64 rounding; given the same
    statistics, the gradient sums within float64 rounding and outputs at most 1 ulp apart."""
    x3, dy3 = _data(shape, dtype, loc=1e3, seed=5)
    mask3 = _mask(shape) if variant == "masked" else None
    if variant == "strided":
        x3 = np.ascontiguousarray(x3[::-1].transpose(2, 1, 0)).transpose(2, 1, 0)[::-1]
        assert not x3.flags.c_contiguous
    if variant == "nonfinite":
        x3[0, 0, 0], x3[-1, 1, -1], dy3[0, -1, 0] = np.inf, np.nan, np.inf
    results = {}
    shared = None
    for name in ("numpy", other):
        k = _backend(name)
        with np.errstate(all="ignore"):
            mean, m2 = k.moments(x3, mask3, xp=np)
            shared = mean if shared is None else shared
            c = shape[1]
            scale, shift = np.linspace(0.5, 2, c), np.linspace(-1, 1, c)
            y = k.normalize(x3, shared, scale, shift, xp=np, dtype=dtype)
            a, b = k.grad_sums(dy3, x3, shared, scale, xp=np)
            dx = k.grad_input(dy3, x3, shared, scale, shift, scale * 0.1, mask3, xp=np, dtype=dtype)
        results[name] = (mean, m2, y, a, b, dx)
    (mean0, m20, y0, a0, b0, dx0), (mean1, m21, y1, a1, b1, dx1) = results.values()
    n = shape[0] * shape[2]
    for v0, v1, tol in (
        (mean0, mean1, 4 * U64),
        (m20, m21, 4 * n * U64),
        (a0, a1, 2 * n * U64),
        (b0, b1, 2 * n * U64),
    ):
        # a channel with Inf/NaN is non-finite on both (Inf or NaN: documented either way)
        fin = np.isfinite(v0)
        np.testing.assert_array_equal(fin, np.isfinite(v1))
        # sums of terms of size ~|x| (mean 1e3): relative to the sums of magnitudes
        big = np.abs(v0[fin]) + (1e3 * n if v0 is not mean0 else 1e3)
        assert (np.abs(v0[fin] - v1[fin]) <= tol * big).all()
    _assert_within_one_ulp(y0, y1)
    _assert_within_one_ulp(dx0, dx1)


def _channel_vectors():
    """Per-channel float64 vectors with the awkward values: 0, tiny, huge, Inf, NaN."""
    rng = np.random.default_rng(11)
    v = np.abs(rng.standard_normal(12)) * 10.0 ** rng.integers(-8, 8, 12)
    v[:5] = [0.0, 1e-300, 1e300, np.inf, np.nan]
    return v


@pytest.mark.parametrize("backend", [NUMBA, CUPY])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("wdtype", [None, np.float32, np.float64, np.float16])
def test_scales_are_bitwise_those_of_plain_numpy(backend, eps, wdtype):
    """Each operation rounded as NumPy rounds it: the same bytes on every backend,
    with the 1 / 0 = inf of IEEE arithmetic (no error, no warning)."""
    var = _channel_vectors()
    rng = np.random.default_rng(12)
    weight = bias = None
    if wdtype is not None:
        weight = rng.standard_normal(var.size).astype(wdtype)
        bias = rng.standard_normal(var.size).astype(wdtype)
    with np.errstate(all="ignore"):
        invstd = 1.0 / np.sqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.astype(np.float64)
        shift = np.zeros(var.size) if bias is None else bias.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _backend(backend).scales(var, eps, weight, bias, xp=np)
    for g, e in zip(got, (invstd, scale, shift), strict=True):
        assert g.dtype == np.float64 and g.tobytes() == e.tobytes()


@pytest.mark.parametrize("backend", [NUMBA, CUPY])
def test_coefficients_are_bitwise_those_of_plain_numpy(backend):
    v = _channel_vectors()
    k_dy, kinvstd, a, b = v, v[::-1].copy(), np.roll(v, 3), -np.roll(v, 5)
    with np.errstate(all="ignore"):
        expected = (k_dy * (kinvstd * b * 0.1), k_dy * a * 0.1)
    got = _backend(backend).coefficients(k_dy, kinvstd, a, b, 0.1, xp=np)
    for g, e in zip(got, expected, strict=True):
        assert g.tobytes() == e.tobytes()


def test_one_ulp_check_rejects_two_ulps():
    a = np.array([1.0, 2.0], np.float32)
    _assert_within_one_ulp(a, np.nextafter(a, np.float32(3)))
    with pytest.raises(AssertionError):
        _assert_within_one_ulp(a, np.nextafter(np.nextafter(a, np.float32(3)), np.float32(3)))


@pytest.mark.parametrize(
    "fmt, shape",
    [("NCHW", (4, 3, 6, 7)), ("NHWC", (4, 6, 7, 3)), ("NC", (9, 5)), ("NCL", (4, 3, 5))],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_public_forward_backward_agree_across_backends(fmt, shape, dtype):
    """The functional core gives the same results whichever backend runs.

    float32: at most 1 ulp apart; float64: within the float64 rounding of the
    statistics (each backend's mean may differ in its last bit).
    """
    if not HAS_NUMBA:
        pytest.skip("needs numba")
    from refsyncbn.functional import backward, forward

    x, dy = _data(shape, dtype, loc=3.0, seed=7)
    c = shape[1] if fmt.startswith("NC") else shape[-1]
    w, b = np.linspace(0.5, 2, c).astype(dtype), np.linspace(-1, 1, c).astype(dtype)
    out = {}
    for name in ("numpy", "numba"):
        res = forward(x, w, b, data_format=fmt, backend=name)
        g = backward(dy, res.saved)
        out[name] = (res.y, g.dx, g.dweight, g.dbias)
    for u, v in zip(out["numpy"], out["numba"], strict=True):
        if dtype == np.float32:
            _assert_within_one_ulp(u, v)
        else:
            np.testing.assert_allclose(u, v, rtol=64 * U64, atol=64 * U64 * 4 * x.size)


def test_without_numba_the_numpy_backend_runs_and_says_so_once():
    """numba that cannot import: one BackendWarning naming the way out, then numpy kernels."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["numba"] = None  # import numba now fails
        import numpy as np
        from refsyncbn.functional import backward, forward
        x = np.arange(12.0, dtype=np.float32).reshape(4, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = [forward(x, data_format="NC").saved.kernels.NAME for _ in range(3)]
        print(names, [type(w.message).__name__ for w in caught])
        print(caught[0].message)
    """)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    first, message = proc.stdout.splitlines()[:2]
    assert first == "['numpy', 'numpy', 'numpy'] ['BackendWarning']"
    assert "numba" in message and "REFSYNCBN_BACKEND=numpy" in message


@pytest.mark.parametrize("dy_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 3, 40), (4, 3, 1)])
def test_dy_of_another_float_dtype_than_x(dy_dtype, shape):
    """x float32 with dy float16/float64: the same dx on every backend, in x's dtype."""
    if not HAS_NUMBA:
        pytest.skip("needs numba")
    from refsyncbn.functional import backward, forward

    x, dy = _data(shape, np.float32, seed=8)
    x = x.reshape(shape[0], shape[1], -1)
    dx = {}
    for name in ("numpy", "numba"):
        res = forward(x, data_format="NCL", backend=name)
        dx[name] = backward(dy.astype(dy_dtype).reshape(x.shape), res.saved).dx
    assert dx["numba"].dtype == np.float32
    _assert_within_one_ulp(dx["numpy"], dx["numba"])
