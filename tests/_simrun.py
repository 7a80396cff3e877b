"""Run a :class:`refsyncbn.cases.Case` in a SimulatedWorld with :func:`refsyncbn.cases.run_rank`."""

from __future__ import annotations

from refsyncbn import SimulatedWorld
from refsyncbn.cases import run_rank


def run_case(case, *, param_grads=None, **kwargs):
    """Every world rank's outputs with the statistics, in rank order.

    ``param_grads`` defaults to the convention's reduction (the oracle's
    default); ``kwargs`` go to :func:`refsyncbn.cases.run_rank`.
    """
    return SimulatedWorld(case.world_size).run(
        lambda comm: run_rank(case, comm, param_grads=param_grads, statistics=True, **kwargs)
    )
