"""Flax adapter: ``flax.linen.BatchNorm(axis_name="batch")`` under ``jax.pmap`` and ``shard_map``.

One worker process (``python -m refsyncbn.adapters.flax CASES_DIR OUT_DIR``)
with ``XLA_FLAGS=--xla_force_host_platform_device_count=W`` host devices and
``JAX_ENABLE_X64=1`` (float64 cases stay float64; float32 ones stay float32).
Each case runs ``nn.BatchNorm(use_running_average=not training,
axis=<channel axis>, momentum, epsilon, axis_name="batch",
axis_index_groups=<groups>)`` on ``world_size`` devices, once under
``jax.pmap`` (the outputs) and once under ``jax.shard_map`` over a 1-D mesh
(the variant ``"shard_map"``, for cases without process groups: shard_map
has no ``axis_index_groups``); ``jax.vjp`` inside the mapped function gives
``dx`` and the device's own parameter gradients (what a data-parallel step
all-reduces afterwards).

pmap needs one shape on every device, so uneven local batches are written
the way Flax users write them: every device's batch is padded with zero rows
to the largest local batch and ``mask=`` marks the real rows (and the case's
own mask, if any). Flax then averages each device's masked ``E[x]`` and
``E[x^2]`` with ``lax.pmean``: equal weight per device, as the ``flax``
preset says.
"""

from __future__ import annotations

import sys

import numpy as np

from ..layouts import get_layout
from ._worker import momentum_for, run_all

__all__ = [
    "DEVIATIONS",
    "LABEL",
    "PRESET",
    "VARIANCE",
    "commands",
    "known_deviation",
    "label",
    "main",
    "unsupported",
]

PRESET = "flax"
#: Flax's default ``use_fast_variance=True``: ``E[x^2] - E[x]^2`` (for the error model).
VARIANCE = "naive"
LABEL = (
    "flax.linen.BatchNorm(axis_name=...) over XLA host devices under jax.pmap "
    "(rows '<case>') and jax.shard_map (rows '<case>@shard_map'); uneven batches padded "
    "and masked"
)
_EMPTY = (
    "an empty device's parameter gradients are NaN: Flax cannot hold an empty "
    "batch, so the device carries padded rows (dy = 0, masked out) and 0 * NaN "
    "statistics gives NaN, while the flax preset's empty device contributes exact "
    "zeros (its NaN statistics in the whole group are modelled by the preset)"
)
_SUMMED = (
    "under shard_map the parameter gradients are the group's sums, not the device's "
    "own: the parameters enter the mapped function replicated, and JAX transposes that "
    "broadcast into a psum (the flax preset's 'local' is pmap's behaviour)"
)
_RAGGED = (
    "process groups of unequal sizes give wrong statistics outside the first group: "
    "lax.pmean divides every group's psum by one group size (jax/_src/lax/parallel.py "
    "assumes all groups are the same size; JAX rejects unequal groups only when "
    "lowering for TPU, on CPU the result is silently wrong)"
)
#: Documented ways in which Flax differs from the ``flax`` preset or the oracle, each with
#: the outputs it can explain (``None``: every output).
DEVIATIONS = {
    "use_fast_variance=True (the default): the variance is E[x^2] - E[x]^2 in the input's "
    "precision (at least float32), so it loses digits like (|mean|/std)^2; the error model "
    "declares variance='naive'": None,
    _EMPTY: ("dweight", "dbias"),
    _RAGGED: None,
    _SUMMED: ("dweight", "dbias"),
}


def label() -> str:
    """What runs: :data:`LABEL`."""
    return LABEL


def unsupported(case) -> str:
    """Why Flax cannot state ``case`` ('' when it can: every case, through padding and masks)."""
    return ""


def known_deviation(case, variant="") -> str:
    """The entry of :data:`DEVIATIONS` that explains a failure on ``case`` ('' if none)."""
    if case.training and case.groups is not None and len({len(g) for g in case.groups}) > 1:
        return _RAGGED
    if case.training and 0 in case.splits:
        return _EMPTY
    if variant == "shard_map" and case.weight is not None and case.dy is not None:
        return _SUMMED
    return ""


def commands(cases_dir, out_dir, worlds) -> list:
    """One worker, host devices for the largest world: ``(argv for python -m, extra env)``."""
    env = {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(worlds)}",
        "JAX_ENABLE_X64": "1",
        "JAX_PLATFORMS": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    return [(["refsyncbn.adapters.flax", str(cases_dir), str(out_dir)], env)]


def _padded(case, key, n_max, fill):
    """``key``'s per-rank slices, padded along axis 0 to ``n_max``, stacked: ``(W, n_max, ...)``."""
    parts = []
    for r in range(case.world_size):
        a = case.shard(r)[key]
        pad = np.full((n_max - len(a), *a.shape[1:]), fill, a.dtype)
        parts.append(np.concatenate([a, pad]))
    return np.stack(parts)


def _run_case(case) -> dict:
    """Every rank's outputs of ``nn.BatchNorm``, under ``jax.pmap`` and under ``jax.shard_map``."""
    import flax.linen as nn
    import jax

    axis = get_layout(case.data_format).channel_axis
    w, n_max = case.world_size, max(max(case.splits), 1)
    x = _padded(case, "x", n_max, 0)
    dy = np.zeros_like(x) if case.dy is None else _padded(case, "dy", n_max, 0)
    rows = np.arange(n_max)[None, :] < np.array(case.splits)[:, None]  # (W, n_max)
    mask = rows.reshape(w, n_max, *[1] * (x.ndim - 2)) & np.ones(x.shape, bool)
    if case.mask is not None:
        mask = mask & np.expand_dims(_padded(case, "mask", n_max, False), axis + 1)
    affine = case.weight is not None
    model = nn.BatchNorm(
        use_running_average=not case.training,
        axis=axis,
        momentum=momentum_for(case, "retain"),
        epsilon=case.eps,
        use_bias=affine,
        use_scale=affine,
        axis_name="batch",
        axis_index_groups=case.groups,
        param_dtype=case.x.dtype,
    )
    params = {"scale": case.weight, "bias": case.bias} if affine else {}
    stats = {"mean": case.running_mean, "var": case.running_var}

    def step(x, dy, mask):
        def f(x, params):
            y, upd = model.apply(
                {"params": params, "batch_stats": stats}, x, mask=mask, mutable=["batch_stats"]
            )
            return y, upd["batch_stats"]

        y, vjp, new = jax.vjp(f, x, params, has_aux=True)
        dx, dparams = vjp(dy)
        return y, dx, dparams, new

    def per_device(tree):  # shard_map: a leading device axis for per-device results
        return jax.tree.map(lambda a: a[None], tree)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:w]), ("batch",))
    rows = jax.sharding.PartitionSpec("batch")
    sharded = jax.shard_map(
        lambda x, dy, mask: per_device(step(x[0], dy[0], mask[0])),
        mesh=mesh,
        in_specs=rows,
        out_specs=rows,
    )
    outs = {"pmap": _per_rank(case, jax.pmap(step, axis_name="batch")(x, dy, mask))}
    if case.groups is None:  # shard_map has no axis_index_groups (NotImplementedError)
        outs["shard_map"] = _per_rank(case, sharded(x, dy, mask))
    return outs


def _per_rank(case, results) -> list:
    """Per rank, the outputs of the mapped step (device axis first), padding removed."""
    y, dx, dparams, new = results
    outs = []
    for r, n in enumerate(case.splits):
        out = {
            "y": np.asarray(y[r][:n]),
            "running_mean": np.asarray(new["mean"][r]),
            "running_var": np.asarray(new["var"][r]),
        }
        if case.dy is not None:
            out["dx"] = np.asarray(dx[r][:n])
            if case.weight is not None:
                out.update(
                    dweight=np.asarray(dparams["scale"][r]), dbias=np.asarray(dparams["bias"][r])
                )
        outs.append(out)
    return outs


def main(argv) -> int:
    """Worker: run every case of ``CASES_DIR``, write ``OUT_DIR/<case>/rank{r}.npz``."""
    return run_all(*argv, _run_case)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
