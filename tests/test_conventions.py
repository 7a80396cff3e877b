"""Each preset's rules, checked against numbers worked out by hand below.

Data (one channel, NC): rank 0 holds [0, 2], rank 1 holds [4, 6, 8, 10];
running statistics before the step: mean 10, var 2.

* count weighting: mean 30/6 = 5; sum (x - 5)^2 = 25+9+1+1+9+25 = 70, so the
  biased var is 70/6 = 35/3 and the unbiased (global count) 70/5 = 14.
* equal weighting: rank means 1 and 7 -> mean 4; rank E[x^2] = 4/2 = 2 and
  216/4 = 54 -> E[x^2] = 28, var = 28 - 16 = 12; unbiased with the LOCAL
  count (ChainerMN): 12 * 2/1 = 24 on rank 0, 12 * 4/3 = 16 on rank 1.
* running = old * keep + batch * (1 - keep): keep = momentum ("retain") or
  1 - momentum ("update", PyTorch).
"""

from __future__ import annotations

import numpy as np
import pytest

from refsyncbn import SimulatedWorld, backward, forward
from refsyncbn.conventions import CONVENTIONS, Convention, get_convention

SHARDS = [np.array([[0.0], [2.0]]), np.array([[4.0], [6.0], [8.0], [10.0]])]
RM0, RV0 = 10.0, 2.0

# name: (mean, var, running_mean, running_var per rank, default eps, dbias per rank
#        with dy = 1, running_mean with an explicit momentum of 0.25)
HAND = {
    # keep 0.9: 10*.9 + 5*.1 = 9.5; 2*.9 + (35/3)*.1 = 1.8 + 7/6
    "reference": (5.0, 35 / 3, 9.5, [1.8 + 7 / 6] * 2, 1e-5, [2.0, 4.0], 6.25),
    # update 0.1 (keep 0.9): unbiased global 14 -> 1.8 + 1.4; momentum .25 keeps .75
    "torch": (5.0, 35 / 3, 9.5, [3.2, 3.2], 1e-5, [2.0, 4.0], 8.75),
    # equal weighting, keep 0.9: 9 + .4; 1.8 + 1.2
    "paddle": (4.0, 12.0, 9.4, [3.0, 3.0], 1e-5, [2.0, 4.0], 5.5),
    # count, unbiased global 14, keep 0.9; parameter gradients summed: 2 + 4
    "mindspore": (5.0, 35 / 3, 9.5, [3.2, 3.2], 1e-5, [6.0, 6.0], 6.25),
    # keep 0.99: 9.9 + .05; 1.98 + (35/3)*.01
    "keras": (5.0, 35 / 3, 9.95, [1.98 + 7 / 60] * 2, 1e-3, [2.0, 4.0], 6.25),
    # equal, keep 0.99: 9.9 + .04; 1.98 + .12
    "flax": (4.0, 12.0, 9.94, [2.1, 2.1], 1e-5, [2.0, 4.0], 5.5),
    # equal, unbiased LOCAL (24, 16), keep 0.9: 1.8 + 2.4, 1.8 + 1.6; gradients averaged
    "chainermn": (4.0, 12.0, 9.4, [4.2, 3.4], 2e-5, [3.0, 3.0], 5.5),
}


def _step(convention, **kwargs):
    def body(comm, x):
        res = forward(
            x,
            np.ones(1),
            np.zeros(1),
            running_mean=np.array([RM0]),
            running_var=np.array([RV0]),
            data_format="NC",
            convention=convention,
            comm=comm,
            **kwargs,
        )
        return res, backward(np.ones_like(x), res.saved)

    return SimulatedWorld(2).run(body, SHARDS)


def test_every_preset_has_a_hand_worked_row():
    assert sorted(HAND) == sorted(CONVENTIONS)


@pytest.mark.parametrize("name", list(HAND))
class TestPreset:
    def test_weighting_gives_the_hand_mean_and_variance(self, name):
        mean, var = HAND[name][:2]
        for res, _ in _step(name):
            np.testing.assert_allclose(res.saved.mean, [mean], rtol=1e-15)
            np.testing.assert_allclose(res.saved.var, [var], rtol=1e-14)

    def test_running_statistics_follow_momentum_and_correction(self, name):
        _, _, rm, rvs = HAND[name][:4]
        for (res, _), rv in zip(_step(name), rvs, strict=True):
            np.testing.assert_allclose(res.running_mean, [rm], rtol=1e-15)
            np.testing.assert_allclose(res.running_var, [rv], rtol=1e-15)

    def test_momentum_has_the_preset_meaning(self, name):
        for res, _ in _step(name, momentum=0.25):
            np.testing.assert_allclose(res.running_mean, [HAND[name][6]], rtol=1e-15)

    def test_default_eps_is_added_to_the_variance(self, name):
        mean, var, eps = HAND[name][0], HAND[name][1], HAND[name][4]
        res, _ = _step(name)[0]
        expected = (np.array([0.0, 2.0]) - mean) / np.sqrt(var + eps)
        np.testing.assert_allclose(res.y[:, 0], expected, rtol=1e-14)
        # eps matters at this precision: var alone would be off by eps / (2 var).
        assert abs(res.y[0, 0] + mean / np.sqrt(var)) > 1e-3 * eps

    def test_default_param_grads_reduction(self, name):
        for (_, g), dbias in zip(_step(name), HAND[name][5], strict=True):
            np.testing.assert_allclose(g.dbias, [dbias], rtol=1e-15)


class TestConventionRecord:
    def test_presets_by_name(self):
        assert get_convention("paddle") is CONVENTIONS["paddle"]
        custom = Convention("mine", 0.5, "update", "biased", "equal", 0.0)
        assert get_convention(custom) is custom

    @pytest.mark.parametrize(
        ("field", "value", "match"),
        [
            ("momentum_meaning", "decay", "Convention.momentum_meaning is 'decay'"),
            ("running_var", "unbiased", "Convention.running_var is 'unbiased'"),
            ("weighting", "mean", "Convention.weighting is 'mean'"),
            ("param_grads", "avg", "Convention.param_grads is 'avg'"),
            ("single_value", "nan", "Convention.single_value is 'nan'"),
            ("empty_rank", "zero", "Convention.empty_rank is 'zero'"),
            ("momentum", 2.0, r"Convention.momentum is 2.0; expected a float in \[0, 1\]"),
            ("eps", -1e-5, "Convention.eps is -1e-05; expected a float >= 0"),
        ],
    )
    def test_bad_field_is_named(self, field, value, match):
        fields = {
            "name": "x",
            "momentum": 0.9,
            "momentum_meaning": "retain",
            "running_var": "biased",
            "weighting": "count",
            "eps": 1e-5,
            field: value,
        }
        with pytest.raises(ValueError, match=match):
            Convention(**fields)


def test_torch_preset_matches_pytorch_batch_norm_on_the_global_batch():
    torch = pytest.importorskip("torch", reason="needs torch (optional cross-check)")
    x = torch.tensor(np.concatenate(SHARDS), dtype=torch.float64)
    rm, rv = torch.tensor([RM0], dtype=torch.float64), torch.tensor([RV0], dtype=torch.float64)
    y = torch.nn.functional.batch_norm(x, rm, rv, training=True, momentum=0.1, eps=1e-5)
    ours = _step("torch")
    np.testing.assert_allclose(np.concatenate([r.y for r, _ in ours]), y.numpy(), rtol=1e-12)
    for res, _ in ours:
        np.testing.assert_allclose(res.running_mean, rm.numpy(), rtol=1e-14)
        np.testing.assert_allclose(res.running_var, rv.numpy(), rtol=1e-14)


def _train(convention, shards, mask=None):
    """Every rank's forward and backward (dy = 1) on ``shards`` (one channel, NC)."""

    def body(comm, r):
        m = None if mask is None else mask[r]
        res = forward(
            shards[r],
            np.ones(1),
            np.zeros(1),
            running_mean=np.array([RM0]),
            running_var=np.array([RV0]),
            data_format="NC",
            convention=convention,
            mask=m,
            comm=comm,
        )
        return res, backward(np.ones_like(shards[r]), res.saved)

    return SimulatedWorld(len(shards)).run(body, list(range(len(shards))))


EMPTY = (np.zeros((0, 1)), np.array([[4.0], [6.0], [8.0], [10.0]]))


class TestEdgeCasesFollowTheFrameworks:
    """Rules read from the frameworks' source (README, Conventions)."""

    def test_flax_empty_device_makes_every_statistic_of_the_group_nan(self):
        # flax/linen/normalization.py: x.mean(where=mask) of nothing is NaN; lax.pmean spreads it
        for (res, grads), shard in zip(_train("flax", EMPTY), EMPTY, strict=True):
            assert np.isnan(res.y).all() and res.y.shape == shard.shape
            assert np.isnan(res.running_mean).all() and np.isnan(res.running_var).all()
            assert np.isnan(grads.dx).all()
        # no element on rank 0: its local parameter gradients are empty sums
        assert _train("flax", EMPTY)[0][1].dweight.tolist() == [0.0]

    def test_flax_device_with_no_valid_position_is_empty_too(self):
        shards = [np.array([[0.0], [2.0]]), EMPTY[1]]
        mask = [np.array([False, False]), np.ones(4, bool)]
        for res, _ in _train("flax", shards, mask):
            assert np.isnan(res.y).all()

    def test_paddle_skips_the_empty_rank(self):
        # equal weighting over the non-empty rank: mean 7, var 5 (by hand)
        for res, _ in _train("paddle", EMPTY):
            assert res.running_mean.tolist() == [10.0 * 0.9 + 7.0 * 0.1]
            np.testing.assert_allclose(res.running_var, [2.0 * 0.9 + 5.0 * 0.1], rtol=1e-15)

    def test_torch_one_value_in_a_group_of_two_gives_a_nan_running_var(self):
        # torch/nn/modules/_functions.py raises only if size == 1 and world_size < 2;
        # batch_norm_gather_stats_with_counts then divides M2 = 0 by count - 1 = 0
        shards = [np.zeros((0, 1)), np.array([[3.0]])]
        for res, _ in _train("torch", shards):
            assert np.isnan(res.running_var).all()
            assert res.running_mean.tolist() == [10.0 * 0.9 + 3.0 * 0.1]
        assert _train("torch", shards)[1][0].y.tolist() == [[0.0]]  # x - mean = 0

    def test_torch_one_value_alone_raises(self):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            forward(np.array([[3.0]]), data_format="NC", convention="torch")

    def test_the_oracle_agrees(self):
        from refsyncbn.cases import Case
        from refsyncbn.testing import expected_outputs

        for conv, shards in (("flax", EMPTY), ("torch", [np.zeros((0, 1)), [[3.0]]])):
            x = np.concatenate([np.asarray(s, float) for s in shards])
            case = Case(
                x=x,
                running_mean=np.array([RM0]),
                running_var=np.array([RV0]),
                splits=tuple(len(s) for s in shards),
                data_format="NC",
                convention=conv,
                momentum=CONVENTIONS[conv].momentum,
            )
            with np.errstate(invalid="ignore"):
                exp = expected_outputs(case)
            ours = _train(conv, [np.asarray(s, float) for s in shards])
            for e, (res, _) in zip(exp, ours, strict=True):
                np.testing.assert_array_equal(e["running_var"], res.running_var)
                np.testing.assert_array_equal(e["y"], res.y)
