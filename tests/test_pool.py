"""The output pool: recycled memory for large outputs, never handed out while in use.

Most tests lower the pool's size threshold so that small arrays go through
it; one allocates at the real threshold (``np.empty`` touches no page, so
it is cheap).
"""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

import refsyncbn
from refsyncbn.kernels import _pool


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    """An empty pool, with the environment switch unset, for every test."""
    monkeypatch.delenv(_pool.ENV_VAR, raising=False)
    monkeypatch.setattr(_pool, "_free", [])


@pytest.fixture
def pool_everything(monkeypatch):
    """Every output of at least one byte goes through the pool."""
    monkeypatch.setattr(_pool, "THRESHOLD", 1)


def _address(a) -> int:
    return a.__array_interface__["data"][0]


def test_small_arrays_are_plain():
    a = _pool.empty((3, 4), np.float64)
    assert a.flags.owndata and a.shape == (3, 4) and a.dtype == np.float64


def test_large_array_is_reused_after_release():
    shape = (_pool.THRESHOLD // 8,)
    a = _pool.empty(shape, np.float64)
    assert not a.flags.owndata and a.flags.c_contiguous and a.flags.writeable
    first = _address(a)
    del a
    b = _pool.empty(shape, np.float64)
    assert _address(b) == first
    c = _pool.empty((_pool.THRESHOLD // 4,), np.float32)  # same bytes, other dtype: reused too
    assert _address(c) != first  # b holds that buffer: c gets another one


@pytest.mark.usefixtures("pool_everything")
def test_a_view_keeps_the_buffer():
    a = _pool.empty((4, 5), np.float64)
    first = _address(a)
    v = a.T[::2]  # a view of a view: its base chain still holds the lease
    del a
    gc.collect()
    b = _pool.empty((4, 5), np.float64)
    assert not np.shares_memory(b, v)
    del v
    c = _pool.empty((4, 5), np.float64)
    assert _address(c) == first


@pytest.mark.usefixtures("pool_everything")
def test_keeps_the_newest_buffers_up_to_keep():
    arrays = [_pool.empty((7,), np.float64) for _ in range(_pool.KEEP + 2)]
    addresses = [_address(a) for a in arrays]
    while arrays:  # released in allocation order
        arrays.pop(0)
    assert [_address(b) for b in _pool._free] == addresses[2:]


@pytest.mark.usefixtures("pool_everything")
def test_only_same_size_buffers_are_reused():
    a = _pool.empty((9,), np.float64)
    del a
    b = _pool.empty((8,), np.float64)  # a larger buffer is not handed out either
    assert len(_pool._free) == 1 and b.nbytes == 64


@pytest.mark.usefixtures("pool_everything")
def test_environment_switch_turns_it_off(monkeypatch):
    _pool.empty((8,), np.float64)  # released at once
    assert len(_pool._free) == 1
    monkeypatch.setenv(_pool.ENV_VAR, "0")
    a = _pool.empty((8,), np.float64)
    assert a.flags.owndata and _pool._free == []


@pytest.mark.usefixtures("pool_everything")
def test_concurrent_threads_never_share_a_live_buffer():
    """Four threads allocate, fill, check and drop outputs: no array is overwritten."""
    errors = []

    def work(tid):
        held = []
        for i in range(300):
            a = _pool.empty((64,), np.float64)
            a.fill(tid * 1000 + i)
            held.append((a, tid * 1000 + i))
            if len(held) > 3:
                b, value = held.pop(0)
                if not (b == value).all():
                    errors.append((tid, i))
        for b, value in held:
            if not (b == value).all():
                errors.append((tid, "end"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.usefixtures("pool_everything")
def test_outputs_kept_across_steps_are_never_overwritten():
    """A training loop that keeps some outputs: later steps write elsewhere, same values."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 5, 4))
    dy = rng.standard_normal(x.shape)
    kept = []
    for step in range(6):
        res = refsyncbn.forward(x + step, data_format="NCHW")
        dx = refsyncbn.backward(dy, res.saved).dx
        if step % 2 == 0:
            kept.append((res.y[:, 1], res.y[:, 1].copy(), dx.copy(), dx))
    for view, value, dx_value, dx in kept:
        np.testing.assert_array_equal(view, value)
        np.testing.assert_array_equal(dx, dx_value)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_pooled_outputs_are_bitwise_the_unpooled_ones(monkeypatch, backend):
    """Three simulated ranks, every output pooled vs none: the same bytes."""
    if backend == "numba":
        pytest.importorskip("numba")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 4, 6)) * 3 + 1e4
    dy = rng.standard_normal(x.shape)
    shards = [(x[:4], dy[:4]), (x[4:4], dy[4:4]), (x[4:], dy[4:])]

    def step(comm, shard):
        res = refsyncbn.forward(shard[0], data_format="NCL", comm=comm, backend=backend)
        return res.y, refsyncbn.backward(shard[1], res.saved).dx

    plain = refsyncbn.SimulatedWorld(3).run(step, shards)
    monkeypatch.setattr(_pool, "THRESHOLD", 1)
    pooled = [refsyncbn.SimulatedWorld(3).run(step, shards) for _ in range(3)]
    for run in pooled:
        for (y0, dx0), (y1, dx1) in zip(plain, run, strict=True):
            assert y1.tobytes() == y0.tobytes() and dx1.tobytes() == dx0.tobytes()


def test_disabled_restores_the_environment(monkeypatch):
    with _pool.disabled():
        assert _pool.empty((_pool.THRESHOLD,), np.uint8).flags.owndata
    assert _pool.ENV_VAR not in os.environ
    monkeypatch.setenv(_pool.ENV_VAR, "1")
    with _pool.disabled():
        pass
    assert os.environ[_pool.ENV_VAR] == "1"
