"""The NumPy kernels against float64 formulas, on NumPy arrays and through array-api-strict.

The oracle is written here with plain float64 NumPy (``x.astype(float64)``
reduced over axes 0 and 2); the generic array-API path is run through
array-api-strict arrays, so both paths are checked against the oracle and
against each other. ``_BLOCK`` is shrunk in some cases so that every kernel
runs over several blocks and the widened column blocks leave a tail.

Both paths compute in float64 and round once, so sums (float64) must agree to
~1e-12 relative and float32 outputs must be correctly rounded: within half a
unit in the last place of the float64 answer (plus a float64-sized slack).
"""

from __future__ import annotations

import array_api_strict as xps
import numpy as np
import pytest

from refsyncbn.kernels import _numpy as _moments

# (A, C, B) shapes reaching each kernel: column sums and passes on widened blocks
# with a tail (B < _MIN_ROW, C * B < _MIN_WIDTH), the same cut into column chunks
# (C * B >= _MIN_WIDTH), row sums with widened or chunked column-block passes, row
# sums with channel-slab passes (B >= _MIN_SLAB).
SHAPES = [(37, 5, 1), (9, 3, 7), (7, 300, 1), (6, 4, 40), (5, 3, 100), (3, 2, 1100)]
DTYPES = [np.float32, np.float64]
TOL = 1e-12  # float64 arithmetic on exactly converted inputs


def _data(shape, dtype, *, loc=0.5, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, scale, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    c = shape[1]
    mean = x.astype(np.float64).mean(axis=(0, 2)) + rng.normal(0, 0.1, c)
    return x, dy, mean, rng.normal(1.0, 0.5, c), rng.normal(0.0, 1.0, c)


def _col(v):
    return v[None, :, None]


def _strict(a):
    return xps.asarray(a)


def _np(a):
    return np.asarray(a)


def _assert_rounded_once(got, ref, dtype):
    """``got`` is ``ref`` rounded to ``dtype``, up to float64-sized slack."""
    assert got.dtype == dtype
    bound = np.finfo(dtype).eps / 2 * np.abs(ref) + TOL * (1 + np.abs(ref))
    err = np.abs(got.astype(np.float64) - ref)
    assert (err <= bound).all(), f"max error {err.max():.3g}, {int((err > bound).sum())} over"


@pytest.fixture(params=[None, 64], ids=["block-default", "block-64"])
def block(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(_moments, "_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
class TestNumpyKernelsMatchFloat64:
    def test_sum_and_m2_matches_two_pass_float64(self, shape, dtype, block):
        x, *_ = _data(shape, dtype)
        x64 = x.astype(np.float64)
        n = shape[0] * shape[2]
        s_ref = x64.sum(axis=(0, 2))
        m2_ref = ((x64 - _col(s_ref / n)) ** 2).sum(axis=(0, 2))
        mean, m2 = _moments.moments(x, None, xp=np)
        mean_gen, m2_gen = _moments.moments(_strict(x), None, xp=xps)
        for got in (mean, _np(mean_gen)):
            np.testing.assert_allclose(got * n, s_ref, rtol=TOL, atol=TOL * n)
        for got in (m2, _np(m2_gen)):
            np.testing.assert_allclose(got, m2_ref, rtol=TOL * 10)

    def test_grad_sums_match_float64(self, shape, dtype, block):
        x, dy, mean, *_ = _data(shape, dtype)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        a_ref = dy64.sum(axis=(0, 2))
        b_ref = (dy64 * (x64 - _col(mean))).sum(axis=(0, 2))
        scale = np.abs(dy64).sum(axis=(0, 2)) * (1 + np.abs(x64 - _col(mean)).max())
        a, b = _moments.grad_sums(dy, x, mean, np.ones_like(mean), xp=np)
        a_gen, b_gen = _moments.grad_sums(_strict(dy), _strict(x), _strict(mean),
                                          _strict(np.ones_like(mean)), xp=xps)
        for got_a, got_b in ((a, b), (_np(a_gen), _np(b_gen))):
            np.testing.assert_array_less(np.abs(got_a - a_ref), TOL * scale)
            np.testing.assert_array_less(np.abs(got_b - b_ref), TOL * scale)

    def test_normalize_matches_float64(self, shape, dtype, block):
        x, _, mean, scale, shift = _data(shape, dtype)
        ref = (x.astype(np.float64) - _col(mean)) * _col(scale) + _col(shift)
        y = _moments.normalize(x, mean, scale, shift, xp=np, dtype=x.dtype)
        y_gen = _moments.normalize(_strict(x), _strict(mean), _strict(scale), _strict(shift),
                                   xp=xps, dtype=_strict(x).dtype)
        for got in (y, _np(y_gen)):
            _assert_rounded_once(got, ref, dtype)

    def test_grad_input_matches_float64(self, shape, dtype, block):
        x, dy, mean, k_dy, k_x = _data(shape, dtype)
        k_0 = k_x[::-1].copy()
        ref = (_col(k_dy) * dy.astype(np.float64)
               - (_col(k_x) * (x.astype(np.float64) - _col(mean)) + _col(k_0)))
        dx = _moments.grad_input(dy, x, mean, k_dy, k_x, k_0, None, xp=np, dtype=x.dtype)
        dx_gen = _moments.grad_input(*map(_strict, (dy, x, mean, k_dy, k_x, k_0)), None,
                                     xp=xps, dtype=_strict(x).dtype)
        for got in (dx, _np(dx_gen)):
            _assert_rounded_once(got, ref, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_mean_1000_std_2_normalizes_within_1e_5(shape, block):
    x, dy, *_ = _data(shape, np.float32, loc=1000.0, scale=2.0, seed=3)
    x64 = x.astype(np.float64)
    n = shape[0] * shape[2]
    mean = x64.mean(axis=(0, 2))
    var = ((x64 - _col(mean)) ** 2).mean(axis=(0, 2))
    mean_k, m2 = _moments.moments(x, None, xp=np)
    np.testing.assert_allclose(m2 / n, var, rtol=1e-6)
    invstd = 1 / np.sqrt(var + 1e-5)
    y = _moments.normalize(x, mean_k, invstd, np.zeros_like(invstd), xp=np, dtype=x.dtype)
    np.testing.assert_allclose(y, (x64 - _col(mean)) * _col(invstd), rtol=0, atol=1e-5)
    dy = dy + np.float32(1.0)  # a large sum dy exposes an error in the mean's low part
    dy64 = dy.astype(np.float64)
    a, b = _moments.grad_sums(dy, x, mean, np.ones_like(mean), xp=np)
    b_ref = (dy64 * (x64 - _col(mean))).sum(axis=(0, 2))
    bound = 1e-6 * np.abs(dy64 * (x64 - _col(mean))).sum(axis=(0, 2))
    np.testing.assert_array_less(np.abs(b - b_ref), bound)
    np.testing.assert_allclose(a, dy64.sum(axis=(0, 2)), rtol=1e-6)


def test_non_finite_values_give_the_generic_result():
    x, *_ = _data((4, 3, 200), np.float32)
    x[1, 0, 5] = np.inf
    x[2, 1, 7] = np.nan
    fast = _moments.moments(x, None, xp=np)
    generic = _moments.moments(_strict(x), None, xp=xps)
    for got, want in zip(fast, generic, strict=True):
        np.testing.assert_array_equal(got, _np(want))
    assert np.isposinf(fast[0][0]) and np.isnan(fast[1][0]) and np.isnan(fast[0][1])
    assert np.isfinite(fast[0][2]) and np.isfinite(fast[1][2])


def test_float32_squares_beyond_float32_range_are_summed_in_float64():
    x = np.array([[[-3e20, 3e20, 1e20, -1e20]]], dtype=np.float32)
    mean, m2 = _moments.moments(x, None, xp=np)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(m2, ((x64 - x64.mean()) ** 2).sum(), rtol=1e-12)
    assert np.isfinite(mean).all()


@pytest.mark.parametrize("why", ["non-contiguous", "masked", "float16"])
def test_inputs_outside_the_fast_path_still_match_float64(why):
    x, *_ = _data((5, 3, 40), np.float32)
    mask3 = None
    if why == "non-contiguous":
        x = x[:, :, ::2]
    elif why == "masked":
        mask3 = np.random.default_rng(1).random((5, 1, 40)) < 0.5
    else:
        x = x.astype(np.float16)
    valid = np.ones(x.shape, bool) if mask3 is None else np.broadcast_to(mask3, x.shape)
    x64 = np.where(valid, x.astype(np.float64), 0.0)
    n = int(valid[:, 0].sum())
    mean_k, m2 = _moments.moments(x, mask3, xp=np)
    mean = x64.sum(axis=(0, 2)) / n
    np.testing.assert_allclose(mean_k * n, x64.sum(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(m2, np.where(valid, (x64 - _col(mean)) ** 2, 0).sum(axis=(0, 2)),
                               rtol=1e-12)
