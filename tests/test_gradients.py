"""Hand-derived backward == central finite differences of the forward (float64).

The loss is ``L = sum over world ranks of <dy_r, y_r>``. Its derivative with
respect to an element of the GLOBAL batch is that element's ``dx`` on the rank
holding it; with respect to ``weight``/``bias`` (shared by every rank) it is the
sum over groups of the group-summed parameter gradient, which is what
``backward(..., param_grads="sum")`` returns on each rank of a group.

Step and tolerance: each element of channel ``c`` is perturbed by ``h = 1e-5
sigma_c`` (``sigma_c = sqrt(var_c + eps)``, the scale on which ``y`` varies).
The central difference then errs by ``h**2 |L'''| / 6 ~ 1e-10`` relative
(truncation) plus ``u |L| / h`` (rounding, ``u = 1.1e-16``), ~1e-9 of the
gradient scale for these sizes; we allow 1e-6 of the largest gradient
magnitude of the tensor plus that rounding term, bounded per element as
``16 u sum |dy * y| / h`` (see ``_close``). The loss is evaluated with the default ``stable`` variance:
``naive`` computes ``E[x^2] - mean^2``, whose float64 rounding is amplified by
``mean^2 / var`` (e.g. 650 for two values 2.87 and 3.10), which divided by ``h``
would swamp the comparison; both algorithms have the same exact gradient.
A missing or wrong term of the chain rule (a
``1/m`` or ``1/(R n_r)`` factor, a dropped mean or variance path) is off by
1e-2 or more.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _simrun import run_case
from hypothesis import given, settings

from refsyncbn.cases import Case
from refsyncbn.conventions import CONVENTIONS
from refsyncbn.layouts import get_layout
from refsyncbn.testing.oracle import expected_outputs
from refsyncbn.testing.strategies import cases

REL = 1e-6


def _loss(case, **changes) -> float:
    """``sum_r <dy_r, y_r>`` of ``case`` with ``changes`` applied (forward only)."""
    probe = dataclasses.replace(case, dy=None, **changes)
    outs = run_case(probe)
    return sum(float(np.sum(case.shard(r)["dy"] * o["y"])) for r, o in enumerate(outs))


def _central(case, name, steps):
    """Central differences of the loss with respect to every element of ``case.<name>``."""
    base = getattr(case, name)
    grad = np.zeros(base.shape)
    for i in np.ndindex(base.shape):
        h = steps[i]
        plus, minus = base.copy(), base.copy()
        plus[i] += h
        minus[i] -= h
        grad[i] = (_loss(case, **{name: plus}) - _loss(case, **{name: minus})) / (2 * h)
    return grad


def _close(name, analytic, fd, steps, loss_scale):
    """``|analytic - fd| <= REL * scale + rounding``, element by element.

    ``rounding``: the loss is a sum of products whose float64 evaluation errs by
    at most a few ``u * sum |dy * y|`` (``loss_scale``); the central difference
    divides twice that by ``2 h``. It matters where the gradient itself is tiny
    (two values per channel: ``y = +-1`` whatever ``x``), where ``REL * scale``
    alone would ask for more digits than the loss carries.
    """
    scale = np.abs(fd).max() + np.abs(analytic).max()
    allowed = REL * scale + 16 * np.finfo(np.float64).eps * loss_scale / steps
    err = np.abs(analytic - fd)
    worst = np.unravel_index(np.argmax(err - allowed), err.shape)
    assert (err <= allowed).all(), (
        f"{name}: backward differs from central differences by {err[worst]:.3g} at {worst} "
        f"(allowed {allowed[worst]:.3g})\nbackward:\n{analytic}\nfinite differences:\n{fd}"
    )


def check_against_finite_differences(case):
    """Assert dx, and dweight/dbias with affine, equal central differences of the loss."""
    layout = get_layout(case.data_format)
    want = expected_outputs(case)  # used only for the step sizes (sigma per group)
    groups = case.groups or [list(range(case.world_size))]
    sigma_rows = []
    for r in range(case.world_size):
        sigma = np.sqrt(want[r]["var"] + case.eps)
        shape = [1] * case.x.ndim
        shape[layout.channel_axis] = -1
        sigma_rows.append(np.broadcast_to(sigma.reshape(shape), case.shard(r)["x"].shape))
    steps = 1e-5 * np.concatenate(sigma_rows)
    got = run_case(case, param_grads="sum")
    loss_scale = sum(float(np.abs(case.shard(r)["dy"] * g["y"]).sum()) for r, g in enumerate(got))
    dx = np.concatenate([g["dx"] for g in got])
    _close("dx", dx, _central(case, "x", steps), steps, loss_scale)
    if case.weight is None:
        assert all(g["dweight"] is None and g["dbias"] is None for g in got)
        return
    for name in ("weight", "bias"):
        analytic = sum(got[g[0]]["d" + name] for g in groups)
        p = getattr(case, name)
        p_steps = 1e-6 * (1 + np.abs(p))
        _close("d" + name, analytic, _central(case, name, p_steps), p_steps, loss_scale)


def _fixed_case(convention, affine, masked):
    """NCL data over 3 ranks with splits (3, 0, 2): uneven, rank 1 empty."""
    rng = np.random.default_rng(7)
    shape = (5, 2, 2)
    x = rng.normal(size=shape) * [[[1.5], [0.4]]] + [[[2.0], [-1.0]]]
    mask = None
    if masked:
        mask = np.array([[True, False], [True, True], [False, True], [True, False], [False, True]])
    return Case(
        x=x,
        dy=rng.normal(size=shape),
        weight=np.array([1.3, -0.7]) if affine else None,
        bias=np.array([0.2, 0.5]) if affine else None,
        running_mean=np.zeros(2),
        running_var=np.ones(2),
        splits=(3, 0, 2),
        data_format="NCL",
        convention=convention,
        eps=CONVENTIONS[convention].eps,
        momentum=CONVENTIONS[convention].momentum,
        mask=mask,
    )


class TestBackwardMatchesCentralDifferences:
    @pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
    @pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
    @pytest.mark.parametrize(
        "convention", [n for n, c in CONVENTIONS.items() if c.empty_rank == "skip"]
    )  # flax: NaN
    def test_on_uneven_shards_with_an_empty_rank(self, convention, affine, masked):
        # Equal-weight conventions (paddle, flax, chainermn) included: their backward
        # is the exact gradient of their own forward.
        check_against_finite_differences(_fixed_case(convention, affine, masked))

    def test_with_non_contiguous_groups(self):
        case = dataclasses.replace(
            _fixed_case("paddle", True, False), splits=(2, 1, 0, 2), groups=[[0, 2], [1, 3]]
        )
        check_against_finite_differences(case)

    @settings(max_examples=15)
    @given(
        case=cases(dtypes=["float64"], dy=True, max_channels=2, max_local_batch=2, max_spatial=4)
    )
    def test_on_random_cases(self, case):
        check_against_finite_differences(case)
