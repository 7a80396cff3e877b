"""refsyncbn.compat.mindspore against the float64 oracle under the MINDSPORE convention."""

from __future__ import annotations

import numpy as np
import pytest

from refsyncbn import RankError, SimulatedWorld
from refsyncbn.compat.mindspore import SyncBatchNorm
from tests._layers import make_case, mismatches, run_simulated


def ms_layer(case, **kw):
    def make(comm):
        return SyncBatchNorm(
            case.x.shape[1], momentum=case.momentum, process_groups=case.groups, comm=comm, **kw
        )

    return make


class TestMatchesOracle:
    @pytest.mark.parametrize("data_format,shape", [("NC", (7, 3)), ("NCHW", (7, 2, 3, 2))])
    def test_uneven_shards_with_an_empty_rank(self, data_format, shape):
        case = make_case(
            np.random.default_rng(40),
            shape,
            (3, 0, 4),
            data_format=data_format,
            convention="mindspore",
            momentum=0.9,
        )
        assert mismatches(run_simulated(case, ms_layer(case)), case) == []

    def test_process_groups_and_summed_parameter_gradients(self):
        case = make_case(
            np.random.default_rng(41),
            (10, 2, 2, 2),
            (1, 4, 3, 2),
            data_format="NCHW",
            convention="mindspore",
            momentum=0.8,
            groups=[[0, 2], [1, 3]],
        )
        assert mismatches(run_simulated(case, ms_layer(case)), case, param_grads="sum") == []

    @pytest.mark.parametrize(
        "ubs,training,batch",
        [(None, True, True), (None, False, False), (True, False, True), (False, True, False)],
    )
    def test_use_batch_statistics(self, ubs, training, batch):
        case = make_case(
            np.random.default_rng(42),
            (6, 2),
            (2, 4),
            data_format="NC",
            convention="mindspore",
            momentum=0.9,
            training=batch,
        )

        def make(comm):
            return ms_layer(case, use_batch_statistics=ubs)(comm).train(training)

        assert mismatches(run_simulated(case, make), case) == []

    def test_affine_false_keeps_initial_gamma_without_gradient(self):
        bn = SyncBatchNorm(2, affine=False, gamma_init=2.0, beta_init=np.array([0.5, -0.5]))
        y = bn(np.array([[1.0, 1.0], [3.0, 5.0]]))
        np.testing.assert_allclose(y, [[-1.5, -2.5], [2.5, 1.5]], rtol=1e-4)
        bn.backward(np.ones((2, 2)))
        assert bn.weight_grad is None and bn.bias_grad is None


class TestChecks:
    @pytest.mark.parametrize(
        "kwargs,exc,name",
        [
            ({"num_features": 2.0}, TypeError, "num_features"),
            ({"num_features": True}, TypeError, "num_features"),
            ({"num_features": 0}, ValueError, "num_features"),
            ({"num_features": 2, "eps": 1}, TypeError, "eps"),
            ({"num_features": 2, "momentum": 1.1}, ValueError, "momentum"),
            ({"num_features": 2, "momentum": -0.1}, ValueError, "momentum"),
            ({"num_features": 2, "affine": 1}, TypeError, "affine"),
            ({"num_features": 2, "use_batch_statistics": 1}, ValueError, "use_batch_statistics"),
            ({"num_features": 2, "process_groups": (0, 1)}, TypeError, "process_groups"),
            ({"num_features": 2, "process_groups": [(0,)]}, TypeError, "process_groups"),
            ({"num_features": 2, "process_groups": [[0, 1]]}, ValueError, "process_groups"),
            ({"num_features": 2, "gamma_init": "xavier_uniform"}, ValueError, "gamma_init"),
            ({"num_features": 2, "beta_init": "he_uniform"}, ValueError, "beta_init"),
            ({"num_features": 2, "moving_mean_init": "glorot"}, ValueError, "moving_mean_init"),
            ({"num_features": 2, "moving_var_init": np.ones(3)}, ValueError, "moving_var_init"),
            ({"num_features": 2, "gamma_init": [1.0, 1.0]}, TypeError, "gamma_init"),
        ],
    )
    def test_documented_errors_name_the_argument(self, kwargs, exc, name):
        with pytest.raises(exc, match=name):
            SyncBatchNorm(**kwargs)  # one rank: rank 1 is out of range

    def test_duplicate_rank_in_process_groups(self):
        def body(comm):
            return SyncBatchNorm(2, process_groups=[[0, 1], [1]], comm=comm)

        with pytest.raises(RankError) as info:
            SimulatedWorld(2).run(body)
        assert all(
            isinstance(e, ValueError) and "rank 1" in str(e) for e in info.value.errors.values()
        )

    def test_initializers_by_name_number_and_array(self):
        np.random.seed(0)  # noqa: NPY002 - the initializers draw from the global generator
        bn = SyncBatchNorm(
            500,
            gamma_init="normal",
            beta_init="uniform",
            moving_mean_init=0.5,
            moving_var_init=np.full(500, 2.0),
        )
        assert bn.gamma.dtype == np.float32 and abs(float(bn.gamma.std()) - 0.01) < 0.002
        assert float(np.abs(bn.beta).max()) <= 0.07 and float(bn.beta.std()) > 0.03
        assert (bn.moving_mean == 0.5).all() and (bn.moving_variance == 2.0).all()
        assert (SyncBatchNorm(2, gamma_init="ONES").gamma == 1).all()

    def test_array_initializers_are_copied(self):
        init = np.ones(3, np.float32)
        bn = SyncBatchNorm(3, gamma_init=init, moving_var_init=init)
        bn.gamma[...] = 2.0
        np.testing.assert_array_equal(bn.moving_variance, np.ones(3))
        np.testing.assert_array_equal(init, np.ones(3))

    @pytest.mark.parametrize("shape", [(4, 2, 3), (2, 2, 1, 1, 1)])
    def test_only_2d_and_4d_inputs(self, shape):
        def body(comm):
            return SyncBatchNorm(2, comm=comm)(np.ones(shape))

        with pytest.raises(RankError) as info:
            SimulatedWorld(2).run(body)
        assert all(
            isinstance(e, ValueError) and "4-D" in str(e) for e in info.value.errors.values()
        )
