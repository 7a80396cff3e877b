"""refsyncbn.compat.paddle (dense) against the float64 oracle under the PADDLE convention."""

from __future__ import annotations

import numpy as np
import pytest

from refsyncbn import SimulatedWorld
from refsyncbn.compat.paddle import BatchNorm, SyncBatchNorm
from refsyncbn.layer import Sequential
from tests._layers import channels, make_case, mismatches, run_rank, run_simulated


def paddle_layer(case, data_format, **kw):
    def make(comm):
        return SyncBatchNorm(
            channels(case), momentum=case.momentum, data_format=data_format, comm=comm, **kw
        )

    return make


class TestMatchesOracle:
    # (the layer's data_format, the case's layout): Paddle names a family, not a rank.
    @pytest.mark.parametrize(
        "layer_format,case_format,shape",
        [
            ("NCHW", "NC", (7, 3)),
            ("NCHW", "NCL", (7, 3, 2)),
            ("NCL", "NCDHW", (7, 2, 2, 1, 2)),
            ("NHWC", "NLC", (7, 2, 3)),
            ("NDHWC", "NHWC", (7, 2, 2, 3)),
            ("NLC", "NC", (7, 3)),
        ],
    )
    def test_equal_rank_weighting_on_uneven_shards(self, layer_format, case_format, shape):
        case = make_case(
            np.random.default_rng(20),
            shape,
            (1, 4, 0, 2),
            data_format=case_format,
            convention="paddle",
            momentum=0.9,
        )
        got = run_simulated(case, paddle_layer(case, layer_format))
        assert mismatches(got, case) == []

    def test_frozen_weight_and_bias_have_no_gradient(self):
        case = make_case(
            np.random.default_rng(21),
            (5, 2),
            (2, 3),
            data_format="NC",
            convention="paddle",
            momentum=0.9,
        )
        case = type(case)(**{**case.__dict__, "weight": np.ones(2), "bias": np.zeros(2)})

        def body(comm, rank):
            layer = paddle_layer(case, "NC", weight_attr=False, bias_attr=False)(comm)
            out = run_rank(layer, case, rank)
            assert out["dweight"] is None and out["dbias"] is None
            return out

        got = SimulatedWorld(2).run(body, [0, 1])
        assert mismatches(got, case, keys=("y", "dx", "running_mean", "running_var")) == []

    @pytest.mark.parametrize(("weight_attr", "bias_attr"), [(False, None), (None, False)])
    def test_each_frozen_flag_drops_only_its_own_gradient(self, weight_attr, bias_attr):
        x = np.array([[1.0, -2.0], [3.0, 6.0], [5.0, 2.0]])
        dy = np.array([[0.5, 1.0], [-1.0, 2.0], [4.0, -0.25]])
        bn = BatchNorm(2, data_format="NC", weight_attr=weight_attr, bias_attr=bias_attr)
        bn(x)
        bn.backward(dy)
        xhat = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-5)
        grads = {"weight": (dy * xhat).sum(axis=0), "bias": dy.sum(axis=0)}
        for name, attr in (("weight", weight_attr), ("bias", bias_attr)):
            got = getattr(bn, f"{name}_grad")
            if attr is False:
                assert got is None, f"{name}_attr=False but {name}_grad is {got}"
            else:
                np.testing.assert_allclose(got, grads[name], rtol=1e-6, atol=1e-6)

    def test_differs_from_count_weighting_when_ranks_are_uneven(self):
        case = make_case(
            np.random.default_rng(22),
            (5, 2),
            (1, 4),
            data_format="NC",
            convention="paddle",
            momentum=0.9,
        )
        counted = make_case(
            np.random.default_rng(22),
            (5, 2),
            (1, 4),
            data_format="NC",
            convention="reference",
            momentum=0.9,
        )
        got = run_simulated(case, paddle_layer(case, "NC"))
        assert mismatches(got, counted, keys=("y",)) != []


class TestUseGlobalStats:
    def test_true_uses_running_statistics_without_updating(self):
        bn = BatchNorm(1, data_format="NC", use_global_stats=True)
        y = bn(np.array([[2.0], [4.0]]))
        np.testing.assert_allclose(
            y, [[2.0 / np.sqrt(1 + 1e-5)], [4.0 / np.sqrt(1 + 1e-5)]], rtol=1e-6
        )
        assert bn.num_batches_tracked == 0 and bn.running_mean[0] == 0

    def test_false_uses_and_tracks_batch_statistics_in_eval(self):
        bn = BatchNorm(1, data_format="NC", use_global_stats=False).eval()
        y = bn(np.array([[2.0], [4.0]]))
        np.testing.assert_allclose(y.ravel(), [-1, 1], rtol=1e-5)
        np.testing.assert_allclose(bn.running_mean, [0.3], rtol=1e-6)


class TestValidation:
    @pytest.mark.parametrize(
        "kwargs,exc,name",
        [
            ({"num_features": 2, "data_format": "NWC"}, ValueError, "data_format"),
            ({"num_features": 2, "weight_attr": "w"}, TypeError, "weight_attr"),
            ({"num_features": 2, "bias_attr": 1.0}, TypeError, "bias_attr"),
            ({"num_features": 2.5}, TypeError, "num_features"),
            ({"num_features": 2, "momentum": 2.0}, ValueError, "momentum"),
            ({"num_features": 2, "epsilon": -1.0}, ValueError, "eps"),
        ],
    )
    def test_invalid_arguments(self, kwargs, exc, name):
        with pytest.raises(exc, match=name):
            SyncBatchNorm(**kwargs)

    def test_use_global_stats_must_be_none_or_bool(self):
        with pytest.raises(TypeError, match="use_global_stats"):
            BatchNorm(2, use_global_stats="yes")

    def test_signature_has_momentum_before_epsilon(self):
        layer = SyncBatchNorm(2, 0.8, 1e-3)
        assert (layer.momentum, layer.epsilon) == (0.8, 1e-3)


class TestConvert:
    def test_shares_parameters_and_running_stats(self):
        bn = BatchNorm(3, momentum=0.7, data_format="NHWC", weight_attr=False)
        model = SyncBatchNorm.convert_sync_batchnorm(Sequential(bn))
        new = model[0]
        assert type(new) is SyncBatchNorm and new.weight is bn.weight
        assert new.running_mean is bn.running_mean and new.momentum == 0.7
        assert new.data_format == "NHWC" and new.weight_requires_grad is False
