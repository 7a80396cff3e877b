"""Sparse COO: the container, and Paddle's sparse BatchNorm/SyncBatchNorm on its values."""

from __future__ import annotations

import numpy as np
import pytest

from refsyncbn import SimulatedWorld
from refsyncbn.cases import Case
from refsyncbn.compat.paddle import sparse
from refsyncbn.layer import BatchNorm as GenericBatchNorm
from refsyncbn.sparse import SparseCooTensor
from tests._layers import mismatches


class TestPaddleWorkedExample:
    """paddle 3.3.1 CPU: 1x4 grid, C=2, sites 0 and 2 hold [1, 2] and [3, 0]."""

    def test_reproduces_paddle_exactly(self):
        x = SparseCooTensor(
            np.array([[0, 0], [0, 2]]), np.array([[1.0, 2.0], [3.0, 0.0]]), (1, 4, 2)
        )
        bn = sparse.BatchNorm(2, data_format="NHWC")
        y = bn(x)
        k = 1.0 / np.sqrt(1.0 + 1e-5)
        np.testing.assert_allclose(bn._saved.mean, [2.0, 1.0], rtol=0, atol=0)
        np.testing.assert_allclose(bn._saved.var, [1.0, 1.0], rtol=0, atol=0)
        np.testing.assert_allclose(y.values, [[-k, k], [k, -k]], rtol=1e-15)
        np.testing.assert_array_equal(
            np.round(y.values, 6), [[-0.999995, 0.999995], [0.999995, -0.999995]]
        )
        assert y.indices is x.indices and y.shape == x.shape
        np.testing.assert_array_equal(bn.running_mean, np.float32([0.2, 0.1]))
        np.testing.assert_array_equal(bn.running_var, np.float32([1.0, 1.0]))


class TestStatisticsOverStoredSites:
    def test_implicit_zeros_excluded_explicit_zeros_and_duplicates_included(self):
        values = np.array([[1.0], [0.0], [5.0], [5.0]])  # explicit 0; site 3 twice
        x = SparseCooTensor(np.array([[0, 0, 0, 0], [0, 1, 3, 3]]), values, (1, 6, 1))
        dense_bn = GenericBatchNorm(1, data_format="NC", dtype=np.float64)
        expected = dense_bn(values)  # the 4 stored rows only
        got = sparse.BatchNorm(1, data_format="NHWC")(x)
        np.testing.assert_allclose(got.values, expected, rtol=1e-12)

    @pytest.mark.parametrize("nnz", [(3, 0, 5), (0, 4, 1, 2)])
    def test_sync_matches_oracle_on_uneven_nnz(self, nnz):
        rng = np.random.default_rng(30)
        values, dy = rng.normal(2.0, 3.0, (sum(nnz), 3)), rng.normal(size=(sum(nnz), 3))
        w, b = rng.uniform(0.5, 2, 3), rng.normal(size=3)
        case = Case(
            x=values,
            running_mean=np.zeros(3),
            running_var=np.ones(3),
            splits=nnz,
            data_format="NC",
            convention="paddle",
            eps=1e-5,
            momentum=0.9,
            weight=w,
            bias=b,
            dy=dy,
        )
        shape = (2, 4, 4, 4, 3)

        def body(comm, rank):
            start, stop = case.bounds(rank)
            n = stop - start
            rng_idx = np.random.default_rng(rank)  # duplicates likely: 128 sites
            idx = np.stack([rng_idx.integers(0, s, n) for s in shape[:-1]])
            x = SparseCooTensor(idx, values[start:stop], shape)
            layer = sparse.SyncBatchNorm(3, comm=comm)
            layer.load_state_dict(
                {
                    **layer.state_dict(),
                    "weight": w,
                    "bias": b,
                    "running_mean": np.zeros(3),
                    "running_var": np.ones(3),
                }
            )
            y = layer(x)
            dx = layer.backward(x.with_values(dy[start:stop]))
            assert y.indices is x.indices and dx.indices is x.indices
            return {
                "y": y.values,
                "dx": dx.values,
                "dweight": layer.weight_grad,
                "dbias": layer.bias_grad,
                "running_mean": layer.running_mean,
                "running_var": layer.running_var,
            }

        got = SimulatedWorld(len(nnz)).run(body, list(range(len(nnz))))
        assert mismatches(got, case) == []


class TestCooContainer:
    def test_from_dense_and_back(self):
        dense = np.zeros((2, 3, 2))
        dense[0, 1] = [1.0, 0.0]
        dense[1, 2] = [0.0, -2.0]
        coo = SparseCooTensor.from_dense(dense)
        assert coo.nnz == 2 and coo.indices.tolist() == [[0, 1], [1, 2]]
        np.testing.assert_array_equal(coo.to_dense(), dense)

    def test_from_scipy_style_coordinates_sums_duplicates_when_densified(self):
        coo = SparseCooTensor.from_coords(
            (np.array([1, 1]), np.array([2, 2])), np.array([[1.0], [2.0]]), (3, 4, 1)
        )
        assert coo.to_dense()[1, 2, 0] == 3.0 and coo.nnz == 2

    @pytest.mark.parametrize(
        "indices,values,shape,exc,name",
        [
            (np.zeros((2, 2), int), np.zeros((2, 1)), (3, 1), ValueError, "indices has shape"),
            (np.array([[0, 5]]), np.zeros((2, 1)), (3, 1), ValueError, r"indices\[0, 1\] is 5"),
            (np.zeros((1, 2)), np.zeros((2, 1)), (3, 1), TypeError, "indices has dtype"),
            (np.zeros((1, 2), int), np.zeros((2, 1)), (3, 2), ValueError, "shape is"),
            (np.zeros((1, 2), int), np.zeros(2), (3, 1), ValueError, "values has shape"),
            (np.zeros((1, 2), int), np.zeros((2, 1)), (3.0, 1), TypeError, "shape is"),
        ],
    )
    def test_invalid_construction(self, indices, values, shape, exc, name):
        with pytest.raises(exc, match=name):
            SparseCooTensor(indices, values, shape)


class TestSparseLayerErrors:
    def test_dense_input_is_rejected_naming_x(self):
        with pytest.raises(TypeError, match="x is a ndarray"):
            sparse.BatchNorm(2)(np.ones((1, 2, 2, 2, 2)))

    def test_sparse_batchnorm_accepts_ndhwc_and_nhwc_only(self):
        with pytest.raises(ValueError, match="data_format"):
            sparse.BatchNorm(2, data_format="NCHW")

    def test_mask_and_dense_dy_are_rejected(self):
        x = SparseCooTensor(np.array([[0, 1]]), np.array([[1.0], [2.0]]), (2, 1))
        bn = sparse.BatchNorm(1, data_format="NHWC")
        with pytest.raises(ValueError, match="mask"):
            bn(x, mask=np.ones(2, bool))
        bn(x)
        with pytest.raises(TypeError, match="dy is a ndarray"):
            bn.backward(np.ones((2, 1)))

    def test_convert_replaces_sparse_batchnorm(self):
        bn = sparse.BatchNorm(4)
        model = sparse.SyncBatchNorm.convert_sync_batchnorm({"bn": bn})
        assert type(model["bn"]) is sparse.SyncBatchNorm and model["bn"].weight is bn.weight
