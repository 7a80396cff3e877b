"""Run a :class:`refsyncbn.cases.Case` through the functional core in a SimulatedWorld."""

from __future__ import annotations

from refsyncbn import SimulatedWorld, backward, forward
from refsyncbn.comm import group_comm


def run_rank(comm, case, rank, *, variance=None, param_grads=None, convert=None,
             **overrides):
    """One world rank's forward (and backward with ``case.dy``) as a dict of outputs.

    ``comm`` is the world communicator; the rank's group communicator is split
    from it. ``convert`` maps each NumPy input array to the namespace under
    test (default: NumPy itself). ``overrides`` replace forward arguments.
    """
    def conv(a):
        return a if a is None or convert is None else convert(a)

    sub = group_comm(comm, case.groups)
    shard = {k: conv(v) for k, v in case.shard(rank).items()}
    kwargs = dict(running_mean=conv(case.running_mean), running_var=conv(case.running_var),
                  training=case.training, eps=case.eps, momentum=case.momentum,
                  data_format=case.data_format, convention=case.convention,
                  variance=case.variance if variance is None else variance,
                  mask=shard.get("mask"), comm=sub)
    kwargs.update(overrides)
    res = forward(shard["x"], conv(case.weight), conv(case.bias), **kwargs)
    out = {"y": res.y, "mean": res.saved.mean, "var": res.saved.var,
           "running_mean": res.running_mean, "running_var": res.running_var}
    if case.dy is not None:
        g = backward(shard["dy"], res.saved, param_grads=param_grads)
        out.update(dx=g.dx, dweight=g.dweight, dbias=g.dbias)
    return out


def run_case(case, **kwargs):
    """Every world rank's outputs (see :func:`run_rank`), in rank order."""
    world = SimulatedWorld(case.world_size)
    return world.run(lambda comm, r: run_rank(comm, case, r, **kwargs),
                     list(range(case.world_size)))
