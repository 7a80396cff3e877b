"""refsyncbn.SyncBatchNorm / BatchNorm / convert_sync_batchnorm against the float64 oracle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from refsyncbn import RankError, SimulatedWorld
from refsyncbn.layer import BatchNorm, Sequential, SyncBatchNorm, convert_sync_batchnorm
from refsyncbn.sparse import SparseCooTensor
from tests._layers import channels, make_case, mismatches, run_simulated


def sync_layer(case, **kw):
    def make(comm):
        return SyncBatchNorm(
            channels(case),
            data_format=case.data_format,
            convention=case.convention,
            momentum=case.momentum,
            comm=comm,
            process_groups=case.groups,
            dtype=np.float64,
            **kw,
        )

    return make


class TestSyncBatchNormMatchesOracle:
    @pytest.mark.parametrize(
        "data_format,shape",
        [("NCHW", (7, 3, 2, 2)), ("NHWC", (7, 2, 2, 3)), ("NC", (7, 3)), ("NLC", (7, 4, 3))],
    )
    @pytest.mark.parametrize("convention", ["reference", "paddle", "torch", "mindspore"])
    def test_uneven_shards_with_an_empty_rank(self, data_format, shape, convention):
        rng = np.random.default_rng(1)
        momentum = {"torch": 0.1}.get(convention, 0.9)
        case = make_case(
            rng,
            shape,
            (1, 0, 4, 2),
            data_format=data_format,
            convention=convention,
            momentum=momentum,
        )
        assert mismatches(run_simulated(case, sync_layer(case)), case) == []

    def test_process_groups_synchronize_within_each_group(self):
        rng = np.random.default_rng(2)
        case = make_case(
            rng,
            (9, 2, 3),
            (1, 3, 2, 3),
            data_format="NCL",
            convention="reference",
            momentum=0.9,
            groups=[[0, 2], [3, 1]],
        )
        assert mismatches(run_simulated(case, sync_layer(case)), case) == []

    @pytest.mark.parametrize("convention", ["reference", "paddle"])
    def test_mask_uses_valid_positions_with_exact_weighting(self, convention):
        rng = np.random.default_rng(3)
        case = make_case(
            rng,
            (6, 2, 5),
            (2, 1, 3),
            data_format="NCL",
            convention=convention,
            momentum=0.9,
            mask=True,
        )
        assert mismatches(run_simulated(case, sync_layer(case)), case) == []

    def test_eval_uses_running_statistics_and_keeps_them(self):
        rng = np.random.default_rng(4)
        case = make_case(
            rng,
            (5, 2, 3),
            (2, 3),
            data_format="NCL",
            convention="reference",
            momentum=0.9,
            training=False,
        )

        def make(comm):
            return sync_layer(case)(comm).eval()

        assert mismatches(run_simulated(case, make), case) == []

    def test_plain_batchnorm_differs_from_sync_on_uneven_data(self):
        """Negative control: per-rank batch norm is not the synchronized result."""
        rng = np.random.default_rng(5)
        case = make_case(
            rng, (6, 2), (1, 5), data_format="NC", convention="reference", momentum=0.9
        )
        local = run_simulated(case, lambda comm: BatchNorm(2, data_format="NC", dtype=np.float64))
        assert mismatches(local, case, keys=("y",)) != []


class TestLayerState:
    def test_inputs_are_never_mutated(self):
        rng = np.random.default_rng(6)
        x, dy = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
        w, rm = rng.normal(size=3), np.zeros(3)
        copies = [a.copy() for a in (x, dy, w, rm)]
        bn = BatchNorm(3, data_format="NC", dtype=np.float64)
        bn.load_state_dict({**bn.state_dict(), "weight": w, "running_mean": rm})
        bn(x)
        bn.backward(dy)
        for a, b in zip((x, dy, w, rm), copies, strict=True):
            np.testing.assert_array_equal(a, b)
        assert bn.running_mean is not rm

    def test_running_stats_follow_momentum_over_steps(self):
        bn = BatchNorm(1, momentum=0.5, data_format="NC", dtype=np.float64)
        bn(np.array([[1.0], [3.0]]))
        bn(np.array([[5.0], [7.0]]))
        # mean: 0 -> 0.5*0 + 0.5*2 = 1 -> 0.5*1 + 0.5*6 = 3.5; var: 1 -> 1 -> 1
        np.testing.assert_allclose(bn.running_mean, [3.5])
        np.testing.assert_allclose(bn.running_var, [1.0])
        assert bn.num_batches_tracked == 2

    def test_state_dict_round_trips_through_npz(self, tmp_path):
        rng = np.random.default_rng(7)
        bn = BatchNorm(3, data_format="NC")
        bn(rng.normal(size=(5, 3)).astype(np.float32))
        bn.save(tmp_path / "bn.npz")
        other = BatchNorm(3, data_format="NC")
        other.load(tmp_path / "bn.npz")
        for key, value in bn.state_dict().items():
            np.testing.assert_array_equal(other.state_dict()[key], value)
        assert other.num_batches_tracked == 1 and other.running_mean.dtype == np.float32

    def test_load_state_dict_names_bad_keys_and_shapes(self):
        bn = BatchNorm(3)
        with pytest.raises(ValueError, match=r"missing keys \['bias'"):
            bn.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "bias"})
        with pytest.raises(ValueError, match=r"state_dict\['weight'\] has shape \(4,\)"):
            bn.load_state_dict({**bn.state_dict(), "weight": np.ones(4)})

    def test_backward_before_forward_raises(self):
        with pytest.raises(RuntimeError, match="before forward"):
            BatchNorm(2).backward(np.ones((2, 2, 1, 1)))

    def test_affine_false_has_no_parameters_or_gradients(self):
        bn = BatchNorm(2, affine=False, data_format="NC")
        bn(np.array([[1.0, 2.0], [3.0, 5.0]]))
        bn.backward(np.ones((2, 2)))
        assert bn.weight is None and bn.weight_grad is None and "weight" not in bn.state_dict()

    @pytest.mark.parametrize(
        "kwargs,exc,name",
        [
            ({"num_features": 2.0}, TypeError, "num_features"),
            ({"num_features": 0}, ValueError, "num_features"),
            ({"num_features": 2, "eps": -1.0}, ValueError, "eps"),
            ({"num_features": 2, "momentum": 1.5}, ValueError, "momentum"),
            ({"num_features": 2, "data_format": "CHWN"}, ValueError, "data_format"),
            ({"num_features": 2, "convention": "caffe"}, ValueError, "convention"),
        ],
    )
    def test_invalid_arguments_raise_naming_them(self, kwargs, exc, name):
        with pytest.raises(exc, match=name):
            SyncBatchNorm(**kwargs)

    def test_channel_mismatch_raises_on_every_rank(self):
        def body(comm, c):
            return SyncBatchNorm(2, data_format="NC", comm=comm)(np.ones((2, c)))

        with pytest.raises(RankError) as info:
            SimulatedWorld(2).run(body, [2, 3])
        assert set(info.value.errors) == {0, 1}
        assert all(isinstance(e, ValueError) for e in info.value.errors.values())


class Block:
    def __init__(self):
        self.norm = BatchNorm(4)
        self.pair = (BatchNorm(4), "not a layer")


class TestConvertSyncBatchnorm:
    def test_converts_nested_layers_sharing_arrays(self):
        shared = BatchNorm(4)
        shared.train(False)
        model = {"seq": Sequential(BatchNorm(4), shared), "blocks": [Block(), shared], "other": 3}
        model["self"] = model  # a cycle
        weight, rm = shared.weight, shared.running_mean
        out = convert_sync_batchnorm(model)
        assert out is model
        new = model["seq"][1]
        assert type(new) is SyncBatchNorm and model["blocks"][1] is new
        assert new.weight is weight and new.running_mean is rm and new.training is False
        block = model["blocks"][0]
        assert type(block.norm) is SyncBatchNorm and type(block.pair[0]) is SyncBatchNorm
        assert block.pair[1] == "not a layer" and model["other"] == 3

    def test_converted_layer_keeps_options_and_counter(self):
        bn = BatchNorm(3, eps=1e-3, momentum=0.8, data_format="NHWC", convention="keras")
        bn(np.ones((2, 1, 1, 3)))
        new = convert_sync_batchnorm(bn)
        assert (
            new.eps,
            new.momentum,
            new.data_format,
            new.convention.name,
            new.num_batches_tracked,
        ) == (1e-3, 0.8, "NHWC", "keras", 1)

    def test_sync_layers_are_left_alone(self):
        layer = SyncBatchNorm(2)
        assert convert_sync_batchnorm([layer])[0] is layer


class TestOtherNamespaces:
    def test_parameters_and_outputs_stay_in_the_layer_namespace(self):
        xp = pytest.importorskip("array_api_strict", reason="needs array-api-strict")
        x = np.random.default_rng(8).normal(size=(6, 2))

        def body(comm, rows):
            layer = SyncBatchNorm(2, data_format="NC", comm=comm, xp=xp, dtype=xp.float64)
            y = layer(xp.asarray(x[rows]))
            layer.backward(xp.ones_like(y))
            return y, layer.running_mean, layer.weight_grad

        out = SimulatedWorld(2).run(body, [slice(0, 1), slice(1, 6)])
        assert all(type(a) is type(xp.asarray(0.0)) for a in out[0])
        ref = BatchNorm(2, data_format="NC", dtype=np.float64)
        np.testing.assert_allclose(
            np.concatenate([np.asarray(o[0]) for o in out]), ref(x), rtol=1e-12
        )


def _every_layer_class():
    """``(name, factory(C), input of C channels, channel axis)`` for every layer class."""
    from refsyncbn.compat import mindspore, paddle, torch

    dense = np.random.default_rng(9).normal(size=(2, 3, 2, 2))
    coo = SparseCooTensor(
        np.array([[0, 0, 0], [0, 1, 3]]), np.random.default_rng(10).normal(size=(3, 3)), (1, 4, 3)
    )
    return [
        ("BatchNorm", lambda c: BatchNorm(c), dense),
        ("SyncBatchNorm", lambda c: SyncBatchNorm(c), dense),
        ("torch.BatchNorm", lambda c: torch.BatchNorm(c), dense),
        ("torch.SyncBatchNorm", lambda c: torch.SyncBatchNorm(c), dense),
        ("paddle.BatchNorm", lambda c: paddle.BatchNorm(c), dense),
        ("paddle.SyncBatchNorm", lambda c: paddle.SyncBatchNorm(c), dense),
        ("paddle.sparse.BatchNorm", lambda c: paddle.sparse.BatchNorm(c), coo),
        ("paddle.sparse.SyncBatchNorm", lambda c: paddle.sparse.SyncBatchNorm(c), coo),
        ("mindspore.SyncBatchNorm", lambda c: mindspore.SyncBatchNorm(c), dense),
    ]


LAYER_CLASSES = _every_layer_class()
STATE = ("weight", "bias", "running_mean", "running_var")


def _as_rows(x):
    """``(positions, C)`` float64 view of a dense NCHW input or of COO values."""
    if isinstance(x, SparseCooTensor):
        return np.asarray(x.values, np.float64)
    return np.moveaxis(np.asarray(x, np.float64), 1, -1).reshape(-1, x.shape[1])


@pytest.mark.parametrize(("name", "make", "x"), LAYER_CLASSES, ids=[c[0] for c in LAYER_CLASSES])
class TestEveryLayerOwnsItsState:
    def test_no_two_state_arrays_share_memory(self, name, make, x):
        layer = make(3)
        arrays = {k: getattr(layer, k) for k in STATE}
        for a, b in itertools.combinations(STATE, 2):
            assert not np.shares_memory(arrays[a], arrays[b]), f"{name}: {a} aliases {b}"

    def test_setting_parameters_in_place_leaves_running_statistics_alone(self, name, make, x):
        layer = make(3)
        layer.weight[...] = 2.0
        layer.bias[...] = 3.0
        np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
        np.testing.assert_array_equal(layer.running_var, np.ones(3))
        layer.running_mean[...] = 5.0
        layer.running_var[...] = 7.0
        np.testing.assert_array_equal(layer.weight, np.full(3, 2.0))
        np.testing.assert_array_equal(layer.bias, np.full(3, 3.0))

    def test_eval_before_the_first_step_uses_the_set_parameters(self, name, make, x):
        layer = make(3).eval()
        layer.weight[...] = [2.0, -1.0, 0.5]
        layer.bias[...] = [3.0, 0.0, -4.0]
        y = layer(x)
        eps = layer.eps
        # Running statistics 0 and 1: y = x / sqrt(1 + eps) * weight + bias, float64.
        want = _as_rows(x) / np.sqrt(1.0 + eps) * [2.0, -1.0, 0.5] + [3.0, 0.0, -4.0]
        np.testing.assert_allclose(_as_rows(y), want, rtol=1e-12, atol=1e-12)


def _converters():
    """``(name, plain layer with eps=0.5 on (N, C) input, convert)`` for each converter."""
    from refsyncbn.compat import paddle, torch

    return [
        ("refsyncbn", lambda: BatchNorm(2, eps=0.5, data_format="NC"), convert_sync_batchnorm),
        ("torch", lambda: torch.BatchNorm(2, eps=0.5), torch.SyncBatchNorm.convert_sync_batchnorm),
        (
            "paddle",
            lambda: paddle.BatchNorm(2, epsilon=0.5, data_format="NC"),
            paddle.SyncBatchNorm.convert_sync_batchnorm,
        ),
    ]


CONVERTERS = _converters()


@pytest.mark.parametrize(("name", "make", "convert"), CONVERTERS, ids=[c[0] for c in CONVERTERS])
class TestConversionKeepsEps:
    def test_converted_layer_normalizes_with_the_old_eps(self, name, make, convert):
        new = convert([make()])[0]
        assert type(new).__name__ == "SyncBatchNorm"
        x = np.array([[1.0, -2.0], [3.0, 6.0]])
        # Batch variance 1 and 16: y = (x - mean) / sqrt(var + 0.5), float64.
        want = (x - [2.0, 2.0]) / np.sqrt([1.5, 16.5])
        np.testing.assert_allclose(new(x), want, rtol=1e-12)
        want_eval = x / np.sqrt(1.5)  # running statistics 0 and 1, untouched in eval
        np.testing.assert_allclose(convert([make()])[0].eval()(x), want_eval, rtol=1e-12)


class TestSaveLoad:
    def test_strict_load_rejects_unexpected_keys_in_the_file(self, tmp_path):
        bn = BatchNorm(2, data_format="NC")
        np.savez(tmp_path / "extra.npz", **bn.state_dict(), momentum=np.array(0.5))
        with pytest.raises(ValueError, match=r"unexpected keys \['momentum'\]"):
            bn.load(tmp_path / "extra.npz")
        bn.load(tmp_path / "extra.npz", strict=False)  # non-strict: the extra key is ignored
        assert bn.momentum == 0.9

    def test_strict_load_rejects_parameters_a_layer_without_affine_lacks(self, tmp_path):
        BatchNorm(2, data_format="NC").save(tmp_path / "affine.npz")
        with pytest.raises(ValueError, match=r"unexpected keys \['bias', 'weight'\]"):
            BatchNorm(2, affine=False, data_format="NC").load(tmp_path / "affine.npz")

    @pytest.mark.parametrize(
        ("saved", "layer"), [(np.float64, np.float32), (np.float32, np.float64)]
    )
    def test_load_converts_to_the_layer_dtype(self, tmp_path, saved, layer):
        src = BatchNorm(2, data_format="NC", dtype=saved)
        src(np.array([[1.0, 2.0], [4.0, 8.0]], dtype=saved))
        src.save(tmp_path / "bn.npz")
        dst = BatchNorm(2, data_format="NC", dtype=layer)
        dst.load(tmp_path / "bn.npz")
        for key in STATE:
            value = getattr(dst, key)
            assert value.dtype == layer, f"{key} has dtype {value.dtype}; expected {layer}"
            np.testing.assert_array_equal(value, getattr(src, key).astype(layer))
        assert dst.num_batches_tracked == 1
