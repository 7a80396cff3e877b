"""The non-NumPy path: array-api-strict arrays on a non-default device.

array-api-strict allows only what the standard allows (no NumPy fallbacks,
no implicit device transfers), so these runs prove the core is written
against the standard and keeps every result on the input's device.
"""

from __future__ import annotations

import numpy as np
import pytest
from _simrun import run_case
from hypothesis import given, settings
from test_functional import assert_matches_oracle

from refsyncbn import backward, forward
from refsyncbn.testing.strategies import cases

xp = pytest.importorskip("array_api_strict", reason="needs array-api-strict (test extra)")
DEVICE = xp.Device("device1")
STRICT_ARRAY = type(xp.asarray(0.0))
# array-api-strict has no float16; the other dtypes of the strategies.
DTYPES = ["float32", "float64"]


def _to_strict(a):
    return xp.asarray(a, device=DEVICE)


def _to_numpy(a):
    return None if a is None else np.asarray(a.to_device(xp.Device("CPU_DEVICE")))


class TestArrayApiStrictOnANonDefaultDevice:
    @settings(max_examples=25)
    @given(case=cases(dtypes=DTYPES))
    def test_results_stay_on_the_device_and_equal_numpy(self, case):
        strict = run_case(case, convert=_to_strict, param_grads="sum")
        ref = run_case(case, param_grads="sum")
        host = []
        for r, out in enumerate(strict):
            for key, value in out.items():
                if value is None:
                    assert ref[r][key] is None, key
                    continue
                assert isinstance(value, STRICT_ARRAY), f"rank {r}: {key} is a {type(value)}"
                assert value.device == DEVICE, f"rank {r}: {key} is on {value.device}"
            host.append({k: _to_numpy(v) for k, v in out.items()})
        # Same float64 algorithm on both paths: within the oracle rule of each other.
        assert_matches_oracle(case, host, ref)

    def test_single_rank_forward_backward_without_a_communicator(self):
        rng = np.random.default_rng(0)
        xn, dyn = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
        wn, bn = rng.normal(size=3), rng.normal(size=3)
        res = forward(
            _to_strict(xn),
            _to_strict(wn),
            _to_strict(bn),
            running_mean=_to_strict(np.zeros(3)),
            running_var=_to_strict(np.ones(3)),
            data_format="NCL",
        )
        g = backward(_to_strict(dyn), res.saved)
        ref = forward(
            xn, wn, bn, running_mean=np.zeros(3), running_var=np.ones(3), data_format="NCL"
        )
        gref = backward(dyn, ref.saved)
        for got, want in (
            (res.y, ref.y),
            (res.running_var, ref.running_var),
            (g.dx, gref.dx),
            (g.dweight, gref.dweight),
            (g.dbias, gref.dbias),
        ):
            assert got.device == DEVICE
            np.testing.assert_allclose(_to_numpy(got), want, rtol=1e-13, atol=1e-14)
