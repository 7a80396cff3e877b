"""The agreement on every call, the watchdog, and owner-computes ``combine`` (SimulatedWorld).

Every divergence must raise ``ValueError`` on EVERY rank, naming the first
differing rank and field; equal calls (including float fields equal to the
last bit) must pass. The owner-computes combination is checked bitwise
against the same rank-ordered function applied to the whole stack by the test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refsyncbn import RankError, SimulatedWorld, backward, forward
from refsyncbn.comm import TIMEOUT_ENV, CollectiveTimeout, LocalComm
from refsyncbn.comm._plan import OWNER_MIN_BYTES, block_width
from refsyncbn.comm._watchdog import resolve_timeout, wait
from refsyncbn.comm.agreement import MAX_FIELDS, agree
from refsyncbn.comm.counting import CountingComm
from refsyncbn.comm.simulated import PeerAborted

pytestmark = pytest.mark.timeout(60)

X = np.arange(24.0).reshape(4, 3, 2)
BASE = {"running_mean": np.zeros(3), "running_var": np.ones(3), "data_format": "NCL"}


def _every_rank_raises(body, size=3, timeout=10.0):
    """Run ``body`` on ``size`` ranks; assert every rank raised ValueError; the messages."""
    with pytest.raises(RankError) as info:
        SimulatedWorld(size, timeout=timeout).run(body)
    errors = info.value.errors
    assert sorted(errors) == list(range(size)), info.value
    assert all(type(e) is ValueError for e in errors.values()), info.value
    return {r: str(e) for r, e in errors.items()}


def _forward_with(deviation, rank=1):
    """Every rank calls forward(X, **BASE); ``rank`` also passes ``deviation``."""

    def body(comm):
        kwargs = {**BASE, **(deviation if comm.rank == rank else {})}
        return forward(kwargs.pop("x", X), comm=comm, **kwargs).y

    return body


class TestForwardSignature:
    @pytest.mark.parametrize(
        ("deviation", "message"),
        [
            (
                {"x": X[:, :2], "running_mean": np.zeros(2), "running_var": np.ones(2)},
                "rank 1 passed 2 channels, rank 0 passed 3 channels",
            ),
            (
                {"x": X.astype(np.float32)},
                "rank 1 passed dtype float32, rank 0 passed dtype float64",
            ),
            (
                {"x": X.reshape(4, 2, 3), "data_format": "NLC"},
                "rank 1 passed data_format NLC, rank 0 passed data_format NCL",
            ),
            ({"variance": "naive"}, "rank 1 passed variance naive, rank 0 passed variance stable"),
            (
                {"convention": "torch", "momentum": 0.1},
                "rank 1 passed momentum_meaning update, rank 0 passed momentum_meaning retain",
            ),
            (
                {"convention": "paddle"},
                "rank 1 passed weighting equal, rank 0 passed weighting count",
            ),
            (
                {"eps": np.nextafter(1e-5, 1.0)},
                "rank 1 passed eps=1.0000000000000003e-05, rank 0 passed eps=1e-05",
            ),
            (
                {"momentum": 0.9000000000000001},
                "rank 1 passed momentum=0.9000000000000001, rank 0 passed momentum=0.9",
            ),
            ({"mask": np.ones((4, 2), bool)}, "rank 1 passed mask given, rank 0 passed mask None"),
            (
                {"running_mean": None, "running_var": None},
                "rank 1 passed running statistics None, rank 0 passed running statistics given",
            ),
        ],
    )
    def test_a_different_field_on_one_rank_raises_on_every_rank_naming_it(self, deviation, message):
        errors = _every_rank_raises(_forward_with(deviation))
        for text in errors.values():
            assert text == f"forward: {message}; every rank of the group must agree"

    def test_conventions_with_the_same_weighting_but_other_rules_are_caught(self):
        # The case: torch and reference both weight by count; the running
        # statistics would silently differ. The first differing rule is named.
        errors = _every_rank_raises(_forward_with({"convention": "torch"}))
        assert (
            "rank 1 passed momentum_meaning update, rank 0 passed momentum_meaning retain"
            in (errors[0])
        )

    def test_the_same_call_on_every_rank_passes_and_equal_floats_pass(self):
        def body(comm):
            return forward(X, comm=comm, eps=1e-5, momentum=0.9, **BASE).y.tobytes()

        out = SimulatedWorld(3).run(body)
        assert len(set(out)) == 1

    def test_the_first_differing_rank_is_named(self):
        def body(comm):
            eps = {0: 1e-5, 1: 1e-5, 2: 1e-3, 3: 1e-4}[comm.rank]
            return forward(X, comm=comm, eps=eps, **BASE)

        errors = _every_rank_raises(body, size=4)
        assert all("rank 2 passed eps=0.001, rank 0 passed eps=1e-05" in e for e in errors.values())

    def test_a_bad_format_on_one_rank_is_named_by_the_others(self):
        errors = _every_rank_raises(_forward_with({"data_format": "NXC"}, rank=2))
        assert errors[2].startswith("data_format is 'NXC'; expected one of")
        for r in (0, 1):
            assert errors[r].startswith(
                "forward: rank(s) [2] of the group rejected their own inputs"
            )


class TestCallSequences:
    def test_eval_on_one_rank_while_the_others_train_raises_instead_of_hanging(self):
        errors = _every_rank_raises(_forward_with({"training": False}))
        for text in errors.values():
            assert (
                "forward: rank 1 is in forward(training=False) call #1, rank 0 in "
                "forward(training=True) call #1; every rank of the group must make the same "
                "calls in the same order"
            ) == text

    def test_a_second_forward_on_one_rank_while_the_others_go_to_backward(self):
        def body(comm):
            res = forward(X, comm=comm, **BASE)
            if comm.rank == 1:
                return forward(X, comm=comm, **{**BASE, "training": False})
            return backward(np.ones_like(X), res.saved)

        errors = _every_rank_raises(body)
        body_text = "rank 1 is in forward(training=False) call #2, rank 0 in backward call #1"
        assert (
            errors[1] == f"forward: {body_text}; every rank of the group must make the "
            f"same calls in the same order"
        )
        for r in (0, 2):
            assert errors[r].startswith(f"backward: {body_text}")

    @pytest.mark.parametrize(
        ("deviation", "message"),
        [
            (
                {"param_grads": "sum"},
                "rank 2 passed param_grads sum, rank 0 passed param_grads local",
            ),
            (
                {"dy": np.ones_like(X, dtype=np.float32)},
                "rank 2 passed dtype float32, rank 0 passed dtype float64",
            ),
        ],
    )
    def test_backward_fields_differ(self, deviation, message):
        def body(comm):
            res = forward(X, np.ones(3), np.zeros(3), comm=comm, **BASE)
            kw = dict(deviation) if comm.rank == 2 else {}
            return backward(kw.pop("dy", np.ones_like(X)), res.saved, **kw)

        errors = _every_rank_raises(body)
        assert all(
            e == f"backward: {message}; every rank of the group must agree" for e in errors.values()
        )

    def test_ranks_back_in_step_after_a_caught_mismatch_work_again(self):
        def body(comm):
            try:
                forward(X, comm=comm, **{**BASE, "training": comm.rank != 1})
            except ValueError:
                pass
            return forward(X, comm=comm, **BASE).y.tobytes()

        assert len(set(SimulatedWorld(3).run(body))) == 1

    def test_a_rank_that_skips_a_call_times_the_others_out_naming_the_call(self):
        def body(comm):
            if comm.rank != 1:
                forward(X, comm=comm, **BASE)

        with pytest.raises(RankError) as info:
            SimulatedWorld(3, timeout=0.3).run(body)
        errors = info.value.errors
        assert sorted(errors) == [0, 2]
        timeouts = [str(e) for e in errors.values() if isinstance(e, CollectiveTimeout)]
        assert timeouts and all(
            isinstance(e, (CollectiveTimeout, PeerAborted)) for e in errors.values()
        )
        assert (
            "SimulatedWorld: forward(training=True) call #1 (agreement) did not complete "
            "within 0.3 s on the simulated world"
        ) in timeouts[0]
        assert "rank(s) [1] never arrived" in timeouts[0]


class TestCost:
    def _tally(self, size, body):
        def step(comm):
            counting = CountingComm(comm)
            body(counting)
            return counting.tally.calls

        return SimulatedWorld(size).run(step) if size > 1 else [step(LocalComm())]

    def test_eval_passes_cost_one_tiny_agreement_and_no_data(self):
        def body(comm):
            res = forward(X, comm=comm, **{**BASE, "training": False})
            backward(np.ones_like(X), res.saved)

        assert self._tally(2, body) == [{"agree": 2, "data": 0}] * 2

    def test_a_one_rank_communicator_skips_the_agreement(self):
        def body(comm):
            res = forward(X, comm=comm, **BASE)
            backward(np.ones_like(X), res.saved)

        # ... and, having nothing to combine, no data collective either
        assert self._tally(1, body) == [{"agree": 0, "data": 0}]
        assert SimulatedWorld(1).run(lambda c: self._tally(1, body)) == [[{"agree": 0, "data": 0}]]

    def test_too_many_fields_is_a_programming_error(self):
        fields = {f"f{i}": 0 for i in range(MAX_FIELDS + 1)}
        with pytest.raises(
            ValueError, match=f"agree: {MAX_FIELDS + 1} fields given; expected at most {MAX_FIELDS}"
        ):
            agree(LocalComm(), "demo", None, fields)
        SimulatedWorld(2).run(
            lambda comm: agree(comm, "demo", None, dict(list(fields.items())[:MAX_FIELDS]))
        )


def _chan(records, *, xp):
    """Exact-style (n, mean, M2) combination in rank order, per channel (a combine fn)."""
    n, mean, m2 = records[0, 0], records[0, 1], records[0, 2]
    for r in range(1, records.shape[0]):
        nb, mb, m2b = records[r, 0], records[r, 1], records[r, 2]
        tot = n + nb
        delta = mb - mean
        safe = xp.where(tot > 0, tot, 1.0)
        mean = mean + delta * nb / safe
        m2 = m2 + m2b + delta * delta * n * nb / safe
        n = tot
    return xp.stack([n, mean, m2, xp.sqrt(m2)])


class TestOwnerComputes:
    def test_the_size_threshold_is_decided_on_both_sides(self):
        c = -(-OWNER_MIN_BYTES // (4 * 3 * 8))  # P = 4 ranks, k = 3 rows: the first c at it
        assert block_width(4, 3, c) == -(-c // 4)
        assert block_width(4, 3, c - 1) is None
        assert block_width(4, 3, 3) is None  # tiny records
        assert block_width(4096, 3, 64) == 1  # fewer channels than ranks: padded blocks
        assert block_width(2, 3, 10**6) is None  # two ranks: all-gather moves no more
        assert block_width(1, 3, 10**6) is None  # one rank

    @pytest.mark.parametrize(
        ("size", "c"),
        [
            (2, 4096),
            (3, 5000),
            (5, 1003),
            (8, 4099),
            (4, 65536),
            (3, 7),
            (64, 48),
            (3, 20000),
            (8, 6007),
            (160, 300),
            (300, 200),
        ],
    )
    def test_bitwise_equal_to_the_function_on_the_whole_stack(self, size, c):
        rng = np.random.default_rng(size * c)
        records = np.stack(
            [
                np.stack(
                    [
                        rng.integers(0, 50, c).astype(float),
                        rng.standard_normal(c) * 10.0 ** rng.integers(-8, 8, c),
                        rng.uniform(0, 5, c),
                    ]
                )
                for _ in range(size)
            ]
        )
        want = _chan(records, xp=np)
        out = SimulatedWorld(size).run(
            lambda comm, rec: comm.combine(rec, _chan, xp=np), list(records)
        )
        for got in out:
            assert got.shape == (4, c)
            assert got.tobytes() == want.tobytes()


class _Request:
    """A stand-in MPI request that completes after ``polls`` calls to ``Test``."""

    def __init__(self, polls):
        self.polls, self.tests = polls, 0

    def Test(self):
        self.tests += 1
        return self.tests > self.polls


class TestWaitLoop:
    def test_returns_once_the_request_completes(self):
        for polls in (0, 3, 40):
            request = _Request(polls)
            wait(request, 5.0, lambda: "never")
            assert request.tests == polls + 1

    def test_raises_the_described_timeout_after_the_deadline(self):
        request = _Request(10**12)
        with pytest.raises(CollectiveTimeout, match=r"^demo call #7 expired$"):
            wait(request, 0.05, lambda: "demo call #7 expired")
        assert request.tests > 1  # polled, then gave up

    def test_timeouts_are_positive_seconds(self, monkeypatch):
        monkeypatch.delenv(TIMEOUT_ENV, raising=False)
        assert resolve_timeout(None, 600.0, "X") == 600.0
        assert resolve_timeout(math.inf, 600.0, "X") == math.inf
        monkeypatch.setenv(TIMEOUT_ENV, "0.25")
        assert resolve_timeout(None, 600.0, "X") == 0.25
        assert resolve_timeout(3, 600.0, "X") == 3.0
        monkeypatch.setenv(TIMEOUT_ENV, "-1")
        with pytest.raises(ValueError, match=r"X: REFSYNCBN_TIMEOUT is -1\.0; expected a number"):
            resolve_timeout(None, 600.0, "X")
