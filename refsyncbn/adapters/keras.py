"""Keras adapter: ``keras.layers.BatchNormalization(synchronized=True)`` under MirroredStrategy.

One worker process (``python -m refsyncbn.adapters.keras CASES_DIR OUT_DIR``,
``KERAS_BACKEND=tensorflow``) splits the CPU into ``W`` logical devices
(``tf.config.set_logical_device_configuration``) and runs each case under
``tf.distribute.MirroredStrategy`` over the first ``world_size`` of them:
every replica gets its own local batch (uneven and empty ones included,
through ``experimental_distribute_values_from_function``), calls the layer
with ``training=`` in a ``tf.GradientTape`` and takes ``dx`` and its own
parameter gradients with ``output_gradients=dy``, inside ``strategy.run``.
The layer all-reduces per-replica sums of ``x`` and ``x^2`` and the counts
(count weighting), then ``var = E[x^2] - E[x]^2``.

Not expressible: process groups (MirroredStrategy reduces over all
replicas) and masks on channel-first formats (Keras expands a mask on the
last axis).
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

PRESET = "keras"
#: ``ops.moments(..., synchronized=True)`` computes ``E[x^2] - E[x]^2`` (for the error model).
VARIANCE = "naive"
LABEL = (
    "keras.layers.BatchNormalization(synchronized=True), TensorFlow backend, under "
    "tf.distribute.MirroredStrategy over logical CPU devices"
)
_MASK = (
    "a mask turns synchronization off: with mask= the layer computes masked moments of "
    "the local batch only (and divides by count + 1e-7)"
)
_MASK_ONE_CHANNEL = (
    "with mask= and a single channel the layer raises IndexError: its masked "
    "moments end in ops.squeeze without an axis, which drops the channel axis"
)
#: Documented ways in which Keras differs from the ``keras`` preset or the oracle, each with
#: the outputs it can explain (``None``: every output).
DEVIATIONS = {
    "the synchronized variance is E[x^2] - E[x]^2 from all-reduced sums, in the input's "
    "precision (float32 for float32), so it loses digits like (|mean|/std)^2; the error model "
    "declares variance='naive'": None,
    _MASK: None,
    _MASK_ONE_CHANNEL: None,
}


def label() -> str:
    """What runs: :data:`LABEL`."""
    return LABEL


def unsupported(case) -> str:
    """Why Keras cannot state ``case`` ('' when it can)."""
    if case.groups is not None:
        return "MirroredStrategy all-reduces over every replica: no process groups"
    if (
        case.mask is not None
        and not get_layout(case.data_format).channels_last
        and case.data_format != "NC"
    ):
        return "Keras expands mask= on the last axis: channel-last formats only"
    return ""


def known_deviation(case, variant="") -> str:
    """The entry of :data:`DEVIATIONS` that explains a failure on ``case`` ('' if none)."""
    if case.mask is None or not case.training:
        return ""
    return _MASK_ONE_CHANNEL if case.running_mean.shape == (1,) else _MASK


def commands(cases_dir, out_dir, worlds) -> list:
    """One worker per world size ``W`` (the cases of ``W`` ranks, one MirroredStrategy)."""
    env = {
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    return [
        (["refsyncbn.adapters.keras", str(cases_dir), str(out_dir), str(w)], env) for w in worlds
    ]


def _run_case(case, strategy) -> list:
    """Every rank's outputs of the synchronized Keras layer under MirroredStrategy."""
    import keras
    import tensorflow as tf

    axis = get_layout(case.data_format).channel_axis
    w = case.world_size
    affine = case.weight is not None
    dtype = case.x.dtype.name
    with strategy.scope():
        layer = keras.layers.BatchNormalization(
            axis=axis,
            momentum=momentum_for(case, "retain"),
            epsilon=case.eps,
            center=affine,
            scale=affine,
            synchronized=True,
            dtype=dtype,
        )
        layer.build((None, *case.x.shape[1:]))
        if affine:
            layer.gamma.assign(case.weight)
            layer.beta.assign(case.bias)
        layer.moving_mean.assign(case.running_mean)
        layer.moving_variance.assign(case.running_var)
    shards = [case.shard(r) for r in range(w)]
    dy_of = [s.get("dy", np.zeros_like(s["x"])) for s in shards]

    def local(values):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values[ctx.replica_id_in_sync_group])
        )

    xs, dys = local([s["x"] for s in shards]), local(dy_of)
    masks = local([s["mask"] for s in shards]) if case.mask is not None else None

    @tf.function
    def step(x, dy, mask=None):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=case.training, mask=mask)
        grads = tape.gradient(y, [x, *layer.trainable_variables], output_gradients=dy)
        return (
            y,
            *grads,
            tf.identity(layer.moving_mean.value),
            tf.identity(layer.moving_variance.value),
        )

    args = (xs, dys) if masks is None else (xs, dys, masks)
    res = [strategy.experimental_local_results(v) for v in strategy.run(step, args=args)]
    outs = []
    for r in range(w):
        y, dx, *rest = (None if v[r] is None else np.asarray(v[r]) for v in res)
        out = {"y": y, "running_mean": rest[-2], "running_var": rest[-1]}
        if case.dy is not None:
            out["dx"] = dx
            if affine:  # trainable variables: gamma, beta
                out.update(dweight=rest[0], dbias=rest[1])
        outs.append(out)
    return outs


def main(argv) -> int:
    """Worker: run the ``W``-rank cases of ``CASES_DIR``, write ``OUT_DIR/<case>/rank{r}.npz``.

    One process and one MirroredStrategy per world size: a second strategy in
    the same process reuses collective instance keys, and TF then mixes the
    two strategies' all-reduces ("Shape mismatch in the collective instance").
    """
    import tensorflow as tf

    cases_dir, out_dir, world = argv[0], argv[1], int(argv[2])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * world
    )
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{r}" for r in range(world)])
    return run_all(
        cases_dir,
        out_dir,
        lambda case: _run_case(case, strategy),
        lambda case: case.world_size == world,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
