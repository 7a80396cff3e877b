"""State-machine property: one rank deviates at a random step in a random field.

A program is a sequence of calls every rank makes on a SimulatedWorld (a layer
built with process groups, functional forward in training or eval, functional
backward, layer forward + backward). In a deviating run one rank changes one
field of one call (training flag, eps, momentum, convention, variance, dtype,
mask, affine parameters, running statistics, param_grads, process groups), or
makes an extra call, or skips one. Properties: without deviation every rank
returns bitwise-identical statistics; with one, every rank raises ValueError
(a skipped call may instead end in CollectiveTimeout once the others wait for
it), no rank hangs, and no deviating run completes on every rank.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsyncbn import RankError, SimulatedWorld, backward, forward
from refsyncbn.comm import CollectiveTimeout
from refsyncbn.comm.simulated import PeerAborted
from refsyncbn.layer import SyncBatchNorm

C = 3
FIELDS = {
    "forward": [
        "training",
        "eps",
        "momentum",
        "convention",
        "variance",
        "dtype",
        "mask",
        "affine",
        "running",
        "skip",
        "extra",
    ],
    "backward": ["param_grads", "dtype", "skip", "extra"],
    "layer": ["training", "skip"],
    "build": ["groups"],
}


@st.composite
def programs(draw):
    """(size, steps, deviation) with deviation ``None`` or ``(step, rank, field)``."""
    size = draw(st.integers(2, 3))
    steps = [("build", None)]
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(
            st.sampled_from(
                ["forward", "layer"] + (["backward"] if steps[-1][0] == "forward" else [])
            )
        )
        steps.append((kind, draw(st.booleans())))  # training flag / affine for backward
    deviation = None
    if draw(st.booleans()):
        i = draw(st.integers(0, len(steps) - 1))
        deviation = (i, draw(st.integers(0, size - 1)), draw(st.sampled_from(FIELDS[steps[i][0]])))
    return size, steps, deviation


def _run(comm, steps, deviation):
    """Run the program on this rank; the statistics it saw (the same on every rank), in order."""
    rng = np.random.default_rng(comm.rank)
    seen, saved = [], None
    layer = None
    for i, (kind, flag) in enumerate(steps):
        field = deviation[2] if deviation and deviation[:2] == (i, comm.rank) else None
        if field == "skip" or (kind == "backward" and saved is None):
            continue  # (a rank that skipped the forward has nothing to differentiate)
        if field == "extra":
            forward(
                np.ones((2, C)),
                running_mean=np.zeros(C),
                running_var=np.ones(C),
                training=False,
                data_format="NC",
                comm=comm,
            )
        x = rng.standard_normal((comm.rank + 1, C)) * 3 + 1
        if kind == "build":
            groups = (
                [[r] for r in range(comm.size)] if field == "groups" else [list(range(comm.size))]
            )
            layer = SyncBatchNorm(C, data_format="NC", process_groups=groups, comm=comm)
        elif kind == "layer":
            if flag != (field == "training"):
                layer.train()
            else:
                layer.eval()
            layer(x)
            layer.backward(np.ones_like(x))
            seen += [layer.running_mean.tobytes(), layer._saved.mean.tobytes()]
        elif kind == "forward":
            kw = {
                "training": flag,
                "eps": 1e-5,
                "momentum": 0.9,
                "convention": "reference",
                "variance": "stable",
                "mask": None,
            }
            w = b = np.ones(C)
            rm, rv = np.zeros(C), np.ones(C)
            if field in ("training", "eps", "momentum", "convention", "variance", "mask"):
                kw[field] = {
                    "training": not flag,
                    "eps": np.nextafter(1e-5, 1),
                    "momentum": 0.5,
                    "convention": "torch",
                    "variance": "naive",
                    "mask": np.ones(x.shape[0], bool),
                }[field]
            x = x.astype(np.float32) if field == "dtype" else x
            w = b = None if field == "affine" else w
            rm = rv = None if field == "running" else rm
            res = forward(
                x,
                w,
                b,
                running_mean=rm,
                running_var=rv if rm is not None else None,
                data_format="NC",
                comm=comm,
                **kw,
            )
            saved = res.saved
            seen += [saved.mean.tobytes(), saved.var.tobytes()]
        else:
            dy = np.ones(saved.shape, np.float32 if field == "dtype" else np.float64)
            pg = "sum" if field == "param_grads" else "local"
            backward(dy, saved, param_grads=pg)
    return seen


@pytest.mark.timeout(120)
@settings(max_examples=60)
@given(program=programs())
def test_every_deviation_raises_on_every_rank_and_none_hangs(program):
    size, steps, deviation = program
    world = SimulatedWorld(size, timeout=0.5)
    if deviation is None:
        out = world.run(lambda comm: _run(comm, steps, None))
        assert all(o == out[0] for o in out)
        return
    with pytest.raises(RankError) as info:
        world.run(lambda comm: _run(comm, steps, deviation))
    errors = info.value.errors
    if deviation[2] == "skip":
        assert all(
            isinstance(e, (ValueError, CollectiveTimeout, PeerAborted)) for e in errors.values()
        ), info.value
        assert any(isinstance(e, (ValueError, CollectiveTimeout)) for e in errors.values())
    else:
        assert sorted(errors) == list(range(size)), info.value
        assert all(type(e) is ValueError for e in errors.values()), info.value
