"""refsyncbn.compat.torch against the float64 oracle under the TORCH convention."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from refsyncbn import RankError, SimulatedWorld
from refsyncbn.comm import group_comm
from refsyncbn.compat.torch import BatchNorm, SyncBatchNorm
from refsyncbn.layer import Sequential
from tests._layers import make_case, mismatches, run_rank, run_simulated

HAS_TORCH = importlib.util.find_spec("torch") is not None


def torch_layer(case, **kw):
    def make(comm):
        pg = group_comm(comm, case.groups)
        return SyncBatchNorm(
            case.x.shape[1], momentum=case.momentum, process_group=pg, dtype=np.float64, **kw
        )

    return make


class TestMatchesOracle:
    @pytest.mark.parametrize(
        "data_format,shape",
        [("NC", (7, 3)), ("NCL", (7, 3, 4)), ("NCHW", (7, 2, 3, 2)), ("NCDHW", (7, 2, 2, 2, 2))],
    )
    def test_uneven_shards_with_an_empty_rank(self, data_format, shape):
        case = make_case(
            np.random.default_rng(10),
            shape,
            (2, 0, 1, 4),
            data_format=data_format,
            convention="torch",
            momentum=0.1,
        )
        assert mismatches(run_simulated(case, torch_layer(case)), case) == []

    def test_process_group_from_group_comm(self):
        case = make_case(
            np.random.default_rng(11),
            (8, 3),
            (3, 1, 2, 2),
            data_format="NC",
            convention="torch",
            momentum=0.1,
            groups=[[0, 3], [1, 2]],
        )
        assert mismatches(run_simulated(case, torch_layer(case)), case) == []

    def test_momentum_none_is_a_cumulative_average(self):
        # After 3 tracked batches, the 4th update has factor 1/4.
        case = make_case(
            np.random.default_rng(12),
            (6, 2),
            (2, 4),
            data_format="NC",
            convention="torch",
            momentum=0.25,
        )

        def body(comm, rank):
            layer = torch_layer(case)(comm)
            layer.momentum = None
            out = run_rank(
                layer,
                case,
                rank,
                state={
                    "weight": case.weight,
                    "bias": case.bias,
                    "running_mean": case.running_mean,
                    "running_var": case.running_var,
                    "num_batches_tracked": 3,
                },
            )
            assert layer.num_batches_tracked == 4
            return out

        got = SimulatedWorld(2).run(body, [0, 1])
        assert mismatches(got, case) == []

    def test_without_running_stats_eval_still_uses_batch_statistics(self):
        case = make_case(
            np.random.default_rng(13),
            (5, 2),
            (3, 2),
            data_format="NC",
            convention="torch",
            momentum=0.1,
        )

        def body(comm, rank):
            layer = torch_layer(case, track_running_stats=False)(comm).eval()
            out = run_rank(layer, case, rank, state={"weight": case.weight, "bias": case.bias})
            assert layer.running_mean is None and layer.num_batches_tracked is None
            return out

        got = SimulatedWorld(2).run(body, [0, 1])
        assert mismatches(got, case, keys=("y", "dx", "dweight", "dbias")) == []

    def test_single_value_per_channel_raises_only_in_a_one_rank_group(self):
        # PyTorch's check is `size == 1 and world_size < 2`
        def body(comm, n):
            layer = SyncBatchNorm(2, process_group=comm)
            layer(np.ones((n, 2)))
            return layer.running_var

        for running_var in SimulatedWorld(2).run(body, [1, 0]):
            assert np.isnan(running_var).all()
        with pytest.raises(RankError) as info:
            SimulatedWorld(1).run(body, [1])
        assert all("more than 1 value" in str(e) for e in info.value.errors.values())


class TestValidation:
    @pytest.mark.parametrize(
        "kwargs,exc,name",
        [
            ({"num_features": "3"}, TypeError, "num_features"),
            ({"num_features": 0}, ValueError, "num_features"),
            ({"num_features": 3, "eps": -1e-5}, ValueError, "eps"),
            ({"num_features": 3, "momentum": -0.1}, ValueError, "momentum"),
            ({"num_features": 3, "process_group": [[0, 1]]}, TypeError, "process_group"),
        ],
    )
    def test_invalid_arguments(self, kwargs, exc, name):
        with pytest.raises(exc, match=name):
            SyncBatchNorm(**kwargs)

    @pytest.mark.parametrize("shape", [(4,), (2, 2, 1, 1, 1, 1)])
    def test_input_must_have_2_to_5_dimensions(self, shape):
        with pytest.raises(ValueError, match="x has shape"):
            BatchNorm(2)(np.ones(shape))


class TestConvert:
    def test_shares_parameters_stats_and_counter(self):
        bn = BatchNorm(3, momentum=None)
        bn(np.arange(6.0).reshape(2, 3))
        model = SyncBatchNorm.convert_sync_batchnorm(Sequential(bn, [bn]))
        new = model[0]
        assert type(new) is SyncBatchNorm and model[1][0] is new
        assert new.weight is bn.weight and new.running_var is bn.running_var
        assert new.momentum is None and new.num_batches_tracked == 1


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch==2.13.0 (CPU)")
class TestAgainstTorch:
    @pytest.mark.parametrize("momentum", [0.1, None])
    def test_global_batch_matches_torch_batchnorm(self, momentum):
        import torch

        rng = np.random.default_rng(14)
        x, dy = rng.normal(size=(6, 3, 4)), rng.normal(size=(6, 3, 4))
        ref = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
        xt = torch.tensor(x, requires_grad=True)
        for _ in range(2):
            yt = ref(xt)
        yt.backward(torch.tensor(dy))
        layer = BatchNorm(3, momentum=momentum, dtype=np.float64)
        for _ in range(2):
            y = layer(x)
        dx = layer.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer.weight_grad, ref.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(layer.running_var, ref.running_var.numpy(), rtol=1e-12)
        assert layer.num_batches_tracked == int(ref.num_batches_tracked)
