"""Every kernel backend against float64 formulas, exact arithmetic and the NumPy backend.

Backends: ``numpy`` on NumPy arrays, ``numpy`` on array-api-strict arrays
(its generic array-API path), ``numba`` and ``cupy`` (skipped where they
cannot run, saying why). The oracle is plain float64 NumPy written here
(``x.astype(float64)`` reduced over axes 0 and 2) or exact fractions. The
NumPy backend's ``_BLOCK`` is shrunk in some cases so that its kernels run
over many tiles, including a partial one.

Every backend computes in float64 and rounds once, so float64 sums agree with
the formulas to ~1e-12 relative, outputs are correctly rounded (half an ulp
of the float64 answer plus a float64-sized slack) and two backends are at
most 1 ulp apart.
"""

from __future__ import annotations

import importlib
import warnings
from fractions import Fraction

import array_api_strict as xps
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsyncbn import SimulatedWorld, forward, kernels
from refsyncbn.kernels import _numpy

# (A, C, B): one tile; row tiles with a partial last one; a row longer than a
# tile (cut along B); many channels of one element.
SHAPES = [(37, 5, 1), (9, 3, 7), (7, 300, 1), (6, 4, 40), (5, 3, 100), (3, 2, 1100)]
DTYPES = [np.float32, np.float64]
TOL = 1e-12  # float64 arithmetic on exactly converted inputs
U64 = 2.0**-53


class Backend:
    """A backend under test: its module and how arrays reach it and come back."""

    def __init__(self, name):
        self.name = name
        module = "numpy" if name == "numpy-strict" else name
        try:
            self.mod = importlib.import_module(f"refsyncbn.kernels._{module}")
        except ImportError as exc:
            pytest.skip(f"backend {module!r} cannot be imported: {exc}")
        self.xp, self.to, self.back = np, (lambda a: a), np.asarray
        if name == "numpy-strict":
            self.xp, self.to = xps, xps.asarray
        elif name == "cupy":
            import array_api_compat
            import cupy

            try:
                cupy.cuda.runtime.getDeviceCount()
            except cupy.cuda.runtime.CUDARuntimeError:
                pytest.skip("needs CuPy and a CUDA device")
            self.xp = array_api_compat.array_namespace(cupy.zeros(1))
            self.to, self.back = cupy.asarray, cupy.asnumpy

    def __call__(self, fn, *args, **kwargs):
        """``fn`` of the backend on converted arrays, results converted back to NumPy."""
        args = [None if a is None else self.to(a) if isinstance(a, np.ndarray) else a for a in args]
        dtype = kwargs.pop("dtype", None)
        if dtype is not None:
            kwargs["dtype"] = getattr(self.xp, np.dtype(dtype).name)
        out = getattr(self.mod, fn)(*args, xp=self.xp, **kwargs)
        return tuple(self.back(o) for o in out) if isinstance(out, tuple) else self.back(out)


@pytest.fixture(scope="module", params=["numpy", "numpy-strict", "numba", "cupy"])
def backend(request):
    return Backend(request.param)


@pytest.fixture(params=[None, 64], ids=["block-default", "block-64"])
def block(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(_numpy, "_BLOCK", request.param)
    return request.param


def _data(shape, dtype, *, loc=0.5, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, scale, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    c = shape[1]
    mean = x.astype(np.float64).mean(axis=(0, 2)) + rng.normal(0, 0.1, c)
    return x, dy, mean, rng.normal(1.0, 0.5, c), rng.normal(0.0, 1.0, c)


def _col(v):
    return v[None, :, None]


def _assert_rounded_once(got, ref, dtype):
    """``got`` is ``ref`` rounded to ``dtype``, up to float64-sized slack."""
    assert got.dtype == dtype
    bound = np.finfo(dtype).eps / 2 * np.abs(ref) + TOL * (1 + np.abs(ref))
    err = np.abs(got.astype(np.float64) - ref)
    assert (err <= bound).all(), f"max error {err.max():.3g}, {int((err > bound).sum())} over"


def _mask(shape, seed=1):
    mask = np.random.default_rng(seed).random((shape[0], 1, shape[2])) < 0.6
    mask[0] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
class TestMatchFloat64Formulas:
    @pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
    def test_moments(self, backend, shape, dtype, block, masked):
        x, *_ = _data(shape, dtype)
        mask = _mask(shape) if masked else None
        valid = np.broadcast_to(np.ones((1, 1, 1), bool) if mask is None else mask, shape)
        x64 = np.where(valid, x.astype(np.float64), 0.0)
        n = int(valid[:, 0].sum())
        mean_ref = x64.sum(axis=(0, 2)) / n
        m2_ref = np.where(valid, (x64 - _col(mean_ref)) ** 2, 0.0).sum(axis=(0, 2))
        mean, m2 = backend("moments", x, mask)
        assert backend("count", x, mask) == n
        np.testing.assert_allclose(mean, mean_ref, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(m2, m2_ref, rtol=TOL * 10)

    def test_grad_sums(self, backend, shape, dtype, block):
        x, dy, mean, invstd, _ = _data(shape, dtype)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        a_ref = dy64.sum(axis=(0, 2))
        b_ref = (dy64 * (x64 - _col(mean))).sum(axis=(0, 2)) * invstd
        scale = np.abs(dy64).sum(axis=(0, 2)) * (1 + np.abs(x64 - _col(mean)).max())
        a, b = backend("grad_sums", dy, x, mean, invstd)
        np.testing.assert_array_less(np.abs(a - a_ref), TOL * scale)
        np.testing.assert_array_less(np.abs(b - b_ref), TOL * scale * np.abs(invstd))

    def test_normalize(self, backend, shape, dtype, block):
        x, _, mean, scale, shift = _data(shape, dtype)
        ref = (x.astype(np.float64) - _col(mean)) * _col(scale) + _col(shift)
        _assert_rounded_once(backend("normalize", x, mean, scale, shift, dtype=dtype), ref, dtype)

    @pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
    def test_grad_input(self, backend, shape, dtype, block, masked):
        x, dy, mean, k_dy, k_x = _data(shape, dtype)
        k_0 = k_x[::-1].copy()
        mask = _mask(shape) if masked else None
        corr = _col(k_x) * (x.astype(np.float64) - _col(mean)) + _col(k_0)
        ref = _col(k_dy) * dy.astype(np.float64) - (corr if mask is None else mask * corr)
        dx = backend("grad_input", dy, x, mean, k_dy, k_x, k_0, mask, dtype=dtype)
        _assert_rounded_once(dx, ref, dtype)


class TestExactMoments:
    @pytest.mark.parametrize("offset", [0.0, 1e4, 1e6, 1e8, -1e8])
    def test_mean_and_m2_within_u_kappa_of_exact(self, backend, block, offset):
        rng = np.random.default_rng(2)
        x = offset + rng.standard_normal((50, 2, 3))
        mean, m2 = backend("moments", x, None)
        for j in range(2):
            vals = [Fraction(float(v)) for v in x[:, j].ravel()]
            mu = sum(vals) / len(vals)
            exact_m2 = sum((v - mu) ** 2 for v in vals)
            kappa = 1 + abs(offset) / float(exact_m2 / len(vals)) ** 0.5
            assert abs(Fraction(float(mean[j])) - mu) <= 4 * U64 * abs(mu) + 4 * U64
            assert abs(Fraction(float(m2[j])) - exact_m2) <= 16 * U64 * kappa * exact_m2

    def test_sum_of_squares_would_lose_every_digit_here(self):
        # the negative control: Q - S^2/n on the same data at offset 1e8
        x = 1e8 + np.random.default_rng(2).standard_normal(150)
        naive = (x * x).sum() - x.sum() ** 2 / x.size
        exact = sum((Fraction(float(v)) - sum(map(Fraction, x)) / x.size) ** 2 for v in x)
        assert abs(Fraction(float(naive)) - exact) > exact / 10


class TestBackendsAgree:
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
    @pytest.mark.parametrize("shape", [(9, 3, 7), (5, 3, 100), (37, 5, 1)], ids=str)
    def test_within_one_ulp_of_the_numpy_backend(self, backend, shape, dtype):
        x, dy, _, k, _ = _data(shape, dtype, loc=1e3)
        mask = _mask(shape)
        ref, got = Backend("numpy"), backend
        mean, m2 = ref("moments", x, mask)
        mean_b, m2_b = got("moments", x, mask)
        np.testing.assert_allclose(mean_b, mean, rtol=8 * U64 * 1e3)
        np.testing.assert_allclose(m2_b, m2, rtol=8 * U64 * 1e3)
        invstd = 1 / np.sqrt(m2 / 50 + 1e-5)
        pairs = [
            ("normalize", (x, mean, invstd, k), {}),
            ("grad_input", (dy, x, mean, k, invstd * k, k[::-1].copy(), mask), {}),
        ]
        for fn, args, kw in pairs:
            one, two = ref(fn, *args, dtype=dtype, **kw), got(fn, *args, dtype=dtype, **kw)
            ulp = np.spacing(np.maximum(np.abs(one), np.abs(two)).astype(dtype))
            assert (np.abs(one.astype(np.float64) - two) <= ulp).all(), fn
        a, b = ref("grad_sums", dy, x, mean, invstd)
        a_b, b_b = got("grad_sums", dy, x, mean, invstd)
        scale = np.abs(dy.astype(np.float64)).sum(axis=(0, 2))
        assert (np.abs(a - a_b) <= TOL * scale).all()
        assert (np.abs(b - b_b) <= TOL * scale * 1e3 * invstd).all()

    @settings(max_examples=30)
    @given(
        shape=st.tuples(st.integers(1, 12), st.integers(1, 4), st.integers(1, 40)),
        dtype=st.sampled_from(DTYPES),
        log_offset=st.floats(0, 8),
        masked=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
    def test_random_shapes_and_large_offsets(self, backend, shape, dtype, log_offset, masked, seed):
        if dtype == np.float32:
            log_offset = min(log_offset, 6.0)
        x, dy, _, k, _ = _data(shape, dtype, loc=10.0**log_offset, scale=1.0, seed=seed)
        mask = _mask(shape, seed) if masked else None
        ref = Backend("numpy")
        mean, m2 = ref("moments", x, mask)
        mean_b, m2_b = backend("moments", x, mask)
        kappa = 1 + 10.0**log_offset
        # A sum's rounding scales with sum |x|, not with |sum x|: x = 1 + N(0, 1) can
        # have a mean near 0 (seen: mean 0.075 from values ~1, backends 1.4e-16 apart).
        valid = np.ones_like(x, bool) if mask is None else np.broadcast_to(mask, x.shape)
        abs_mean = np.where(valid, np.abs(x.astype(np.float64)), 0).sum(axis=(0, 2)) / valid.sum(
            axis=(0, 2)
        )
        assert (np.abs(mean_b - mean) <= 8 * U64 * abs_mean).all()
        assert (np.abs(m2_b - m2) <= 16 * U64 * kappa * m2 + 1e-300).all()
        invstd = 1 / np.sqrt(m2 / max(1, shape[0] * shape[2]) + 1e-5)
        for fn, args in (
            ("normalize", (x, mean, invstd, k)),
            ("grad_input", (dy, x, mean, k, invstd * k, k[::-1].copy(), mask)),
        ):
            one, two = ref(fn, *args, dtype=dtype), backend(fn, *args, dtype=dtype)
            ulp = np.spacing(np.maximum(np.abs(one), np.abs(two)).astype(dtype))
            assert (np.abs(one.astype(np.float64) - two) <= ulp).all(), fn


class TestSpecialValues:
    def test_nan_and_inf_stay_in_their_channel(self, backend):
        x, *_ = _data((4, 3, 200), np.float32)
        x[1, 0, 5] = np.inf
        x[2, 1, 7] = np.nan
        mean, m2 = backend("moments", x, None)
        assert np.isposinf(mean[0]) and np.isnan(m2[0]) and np.isnan(mean[1])
        assert np.isfinite(mean[2]) and np.isfinite(m2[2])

    def test_nan_at_masked_out_positions_is_ignored(self, backend):
        x, *_ = _data((6, 2, 5), np.float64)
        mask = _mask(x.shape)
        x[~np.broadcast_to(mask, x.shape)] = np.nan
        mean, m2 = backend("moments", x, mask)
        assert np.isfinite(mean).all() and np.isfinite(m2).all()

    @pytest.mark.parametrize("shape", [(0, 3, 4), (4, 3, 0)], ids=str)
    def test_no_element_gives_zero_moments_and_empty_outputs(self, backend, shape):
        x = np.zeros(shape)
        mean, m2 = backend("moments", x, None)
        np.testing.assert_array_equal(mean, np.zeros(3))
        np.testing.assert_array_equal(m2, np.zeros(3))
        a, _ = backend("grad_sums", x, x, mean, np.ones(3))
        np.testing.assert_array_equal(a, np.zeros(3))
        assert backend("normalize", x, mean, np.ones(3), mean, dtype=np.float64).shape == shape
        assert backend("count", x, np.zeros((shape[0], 1, shape[2]), bool)) == 0

    def test_float32_squares_beyond_float32_range_are_summed_in_float64(self, backend):
        x = np.array([[[-3e20, 3e20, 1e20, -1e20]]], dtype=np.float32)
        _, m2 = backend("moments", x, None)
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(m2, ((x64 - x64.mean()) ** 2).sum(), rtol=1e-12)

    def test_a_constant_channel_has_its_exact_mean_and_zero_m2(self, backend, block):
        x = np.full((30, 2, 7), 0.1)
        x[:, 1] = 1e150 / 3
        mean, m2 = backend("moments", x, None)
        np.testing.assert_array_equal(mean, [0.1, 1e150 / 3])
        np.testing.assert_array_equal(m2, [0.0, 0.0])


class TestSelection:
    @pytest.mark.parametrize(("dtype", "name"), [("float32", "cupy"), ("float16", "numpy")])
    def test_auto_sends_only_what_the_cupy_backend_supports_to_it(self, monkeypatch, dtype, name):
        # A stand-in CuPy backend (no GPU here): float16 CuPy arrays go to the generic code.
        class FakeCupyBackend:
            NAME = "cupy"

            @staticmethod
            def supports(x):
                return x.dtype in (np.float32, np.float64)

        monkeypatch.setitem(kernels._loaded, "cupy", FakeCupyBackend)
        monkeypatch.setattr(kernels, "is_cupy_array", lambda x: True)
        monkeypatch.delenv(kernels.ENV_VAR, raising=False)
        assert kernels.select(np.zeros(3, dtype)).NAME == name

    def test_every_backend_implements_the_interface(self):
        for name in kernels.available():
            mod = importlib.import_module(f"refsyncbn.kernels._{name}")
            assert mod.NAME == name
            for fn in (
                "supports",
                "count",
                "moments",
                "normalize",
                "grad_sums",
                "grad_input",
                "scales",
                "coefficients",
            ):
                assert callable(getattr(mod, fn)), (name, fn)
        assert "numpy" in kernels.available()

    def test_keyword_beats_environment(self, monkeypatch):
        monkeypatch.setenv(kernels.ENV_VAR, "nonsense")
        assert kernels.select(np.zeros(3), backend="numpy").NAME == "numpy"
        with pytest.raises(
            ValueError,
            match=f"the environment variable {kernels.ENV_VAR} is "
            f"'nonsense'; expected one of numpy, numba, cupy",
        ):
            kernels.select(np.zeros(3))

    def test_anything_but_numpy_float32_float64_goes_to_numpy(self):
        assert kernels.select(np.zeros(3, np.float16)).NAME == "numpy"
        assert kernels.select(xps.zeros(3)).NAME == "numpy"

    def test_forward_records_the_backend_and_rejects_a_bad_one_on_every_rank(self):
        x = np.arange(8.0).reshape(4, 2)
        assert forward(x, data_format="NC", backend="numpy").saved.kernels.NAME == "numpy"

        def body(comm, name):
            return forward(x, data_format="NC", backend=name, comm=comm)

        with pytest.raises(Exception) as info:
            SimulatedWorld(2).run(body, ["numpy", "fortran"])
        errors = info.value.errors
        assert sorted(errors) == [0, 1]
        assert "backend is 'fortran'; expected one of numpy, numba, cupy" in str(errors[1])
        assert isinstance(errors[0], ValueError) and "1" in str(errors[0])

    def test_a_forced_backend_that_cannot_run_the_input_says_so(self, monkeypatch):
        class NoGo:
            NAME = "numba"

            @staticmethod
            def supports(x):
                return False

        monkeypatch.setitem(kernels._loaded, "numba", NoGo)
        with pytest.raises(
            TypeError,
            match="backend is 'numba', which cannot run x of type ndarray and dtype float16",
        ):
            kernels.select(np.zeros(3, np.float16), backend="numba")

    def test_missing_numba_falls_back_to_numpy_warning_once(self, monkeypatch):
        real = kernels._load

        def load(name):
            if name == "numba":
                raise ModuleNotFoundError("No module named 'numba'", name="numba")
            return real(name)

        monkeypatch.setattr(kernels, "_load", load)
        monkeypatch.setattr(kernels, "_warned", [])
        monkeypatch.delenv(kernels.ENV_VAR, raising=False)
        with pytest.warns(kernels.BackendWarning, match="numba cannot be imported"):
            assert kernels.select(np.zeros(3)).NAME == "numpy"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.select(np.zeros(3)).NAME == "numpy"
