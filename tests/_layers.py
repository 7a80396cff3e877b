"""Run a layer factory on a Case (SimulatedWorld or MPI) and compare with the float64 oracle."""

from __future__ import annotations

import numpy as np

from refsyncbn import SimulatedWorld
from refsyncbn.cases import Case
from refsyncbn.layouts import get_layout
from refsyncbn.testing.oracle import expected_outputs

KEYS = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")


def make_case(
    rng, shape, splits, *, data_format, convention, momentum, groups=None, mask=False, training=True
) -> Case:
    """A float64 case with random x, dy, affine parameters and running statistics."""
    x = rng.normal(1.5, 2.0, size=shape)
    c = get_layout(data_format).channels(shape)
    m = None
    if mask:
        m = rng.random(get_layout(data_format).mask_shape(shape)) < 0.7
    return Case(
        x=x,
        running_mean=rng.normal(size=c),
        running_var=rng.uniform(0.5, 2.0, c),
        splits=tuple(splits),
        data_format=data_format,
        convention=convention,
        eps=1e-5,
        momentum=momentum,
        training=training,
        weight=rng.uniform(0.5, 2, c),
        bias=rng.normal(size=c),
        dy=rng.normal(size=shape),
        mask=m,
        groups=groups,
    )


def channels(case) -> int:
    return get_layout(case.data_format).channels(case.x.shape)


def run_rank(layer, case, rank, *, state=None):
    """One rank's outputs of ``layer`` on ``case`` (parameters loaded from the case)."""
    if state is None:
        state = {
            "weight": case.weight,
            "bias": case.bias,
            "running_mean": case.running_mean,
            "running_var": case.running_var,
        }
    layer.load_state_dict({**layer.state_dict(), **state})
    shard = case.shard(rank)
    y = layer(shard["x"], mask=shard.get("mask"))
    dx = layer.backward(shard["dy"])
    return {
        "y": y,
        "dx": dx,
        "dweight": layer.weight_grad,
        "dbias": layer.bias_grad,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
    }


def run_simulated(case, make_layer, **kw):
    """``make_layer(world_comm)`` on every rank of ``case`` under SimulatedWorld."""

    def body(comm, rank):
        return run_rank(make_layer(comm), case, rank, **kw)

    return SimulatedWorld(case.world_size).run(body, list(range(case.world_size)))


def mismatches(results, case, *, keys=KEYS, rtol=1e-9, atol=1e-10, param_grads=None) -> list:
    """Human-readable differences between per-rank ``results`` and the oracle."""
    expected = expected_outputs(case, param_grads=param_grads)
    bad = []
    for rank, (got, want) in enumerate(zip(results, expected, strict=True)):
        for key in keys:
            g, w = got[key], want[key]
            if w is None or g is None:
                if (w is None) != (g is None):
                    bad.append(f"rank {rank} {key}: got {g!r}, expected {w!r}")
                continue
            g = np.asarray(g, dtype=np.float64)
            if g.shape != np.shape(w) or not np.allclose(g, w, rtol=rtol, atol=atol):
                err = np.max(np.abs(g - w)) if g.shape == np.shape(w) else "shape"
                bad.append(f"rank {rank} {key}: max abs error {err}")
    return bad
