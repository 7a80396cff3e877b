"""Real-framework adapters: a framework's own SyncBatchNorm, run across ranks on CPU.

Each adapter runs the framework's code on a :class:`refsyncbn.cases.Case` and
returns what :func:`refsyncbn.cases.run_rank` returns on every world rank
(``y``, ``dx``, ``dweight``, ``dbias`` as this rank's local contribution, the
new ``running_mean``/``running_var``), so that the checker
(:mod:`refsyncbn.testing.checker`) can hold the framework to the oracle:

``torch``
    ``torch.nn.SyncBatchNorm`` in one process per rank over the gloo backend
    (loopback only). torch refuses SyncBatchNorm on CPU and has no CPU kernels
    for its five sync ops; the adapter supplies CPU stand-ins that follow the
    CUDA kernels' math (:func:`refsyncbn.adapters.torch.cpu_sync_ops`). Where
    CUDA is available it runs torch's own kernels over NCCL instead.
``flax``
    ``flax.linen.BatchNorm(axis_name="batch")`` under ``jax.pmap`` and
    ``jax.shard_map`` over XLA host devices; uneven local batches are padded
    and masked (``mask=``).
``keras``
    ``keras.layers.BatchNormalization(synchronized=True)`` under
    ``tf.distribute.MirroredStrategy`` over logical CPU devices.

The framework is imported only in the worker processes the adapter starts
(never by ``import refsyncbn.adapters``). Cases a framework cannot express
(masks in torch, process groups in Keras, ...) are reported as not
expressible instead of being run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cases import RESULT_KEYS, Case, read_result, write_case, write_result

__all__ = ["FRAMEWORKS", "Outcome", "check_outcomes", "get_adapter", "missing", "run"]

#: Framework name -> (adapter module, the packages it needs).
FRAMEWORKS = {
    "torch": ("refsyncbn.adapters.torch", ("torch",)),
    "flax": ("refsyncbn.adapters.flax", ("jax", "flax")),
    "keras": ("refsyncbn.adapters.keras", ("tensorflow", "keras")),
}
_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    """What one case gave: per-rank outputs, or why there are none.

    Exactly one of ``outputs`` (a list of per-world-rank dicts, keys of
    :data:`refsyncbn.cases.RESULT_KEYS`), ``not_expressible`` (the framework
    has no way to state the case) and ``error`` (the framework raised, or
    the run failed) is set. ``variants`` holds the outputs of the same case
    run another way (Flax: ``"shard_map"`` besides pmap), by name.
    """

    outputs: list | None = None
    not_expressible: str = ""
    error: str = ""
    variants: dict = field(default_factory=dict)


def get_adapter(framework: str):
    """The adapter module of ``framework`` (importing it does not import the framework).

    Examples
    --------
    >>> get_adapter("torch").PRESET
    'torch'
    """
    if framework not in FRAMEWORKS:
        msg = f"framework is {framework!r}; expected one of {tuple(FRAMEWORKS)}"
        raise ValueError(msg)
    return importlib.import_module(FRAMEWORKS[framework][0])


def missing(framework: str) -> str | None:
    """``None`` when ``framework``'s packages import here, else what is needed and how to get it.

    Examples
    --------
    >>> missing("keras") in (None, "needs tensorflow and keras (pip install 'refsyncbn[keras]')")
    True
    """
    get_adapter(framework)
    needs = FRAMEWORKS[framework][1]
    if all(importlib.util.find_spec(p) is not None for p in needs):
        return None
    return f"needs {' and '.join(needs)} (pip install 'refsyncbn[{framework}]')"


def run(framework: str, cases: dict, *, timeout: float = 600.0) -> dict[str, Outcome]:
    """Run ``cases`` through ``framework``'s own SyncBatchNorm; one :class:`Outcome` per case.

    Parameters
    ----------
    framework : {"torch", "flax", "keras"}
        The adapter (module docstring).
    cases : dict of str to Case
        Case name (a valid file stem) to problem. Momentum is read in each
        case's convention's meaning and handed to the framework in its own.
    timeout : float
        Seconds for the whole run; past it every worker is killed and the
        cases without outputs get an error.

    Returns
    -------
    dict of str to Outcome
        In the order of ``cases``.

    Raises
    ------
    RuntimeError
        When the framework is not installed (the message says what to install).
    """
    adapter = get_adapter(framework)
    need = missing(framework)
    if need is not None:
        raise RuntimeError(f"{framework} adapter: {need}")
    outcomes = {
        name: Outcome(not_expressible=why)
        for name, case in cases.items()
        if (why := adapter.unsupported(case))
    }
    todo = {name: case for name, case in cases.items() if name not in outcomes}
    if todo:
        with tempfile.TemporaryDirectory(prefix=f"refsyncbn-{framework}-") as tmp:
            cases_dir, out_dir = Path(tmp, "cases"), Path(tmp, "out")
            cases_dir.mkdir()
            for name, case in todo.items():
                write_case(cases_dir / f"{name}.npz", case)
            worlds = sorted({c.world_size for c in todo.values()})
            failure = _launch(adapter.commands(cases_dir, out_dir, worlds), timeout)
            for name, case in todo.items():
                outcomes[name] = _collect(out_dir / name, case, failure)
    return {name: outcomes[name] for name in cases}


def _launch(commands, timeout) -> str:
    """Start the worker processes, wait for all; '' or what went wrong."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        PYTHONUNBUFFERED="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", *argv],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for argv, extra in commands
    ]
    deadline = time.monotonic() + timeout
    outputs, failure = [], ""
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
        except subprocess.TimeoutExpired:
            failure = f"workers killed after the {timeout:g} s timeout"
            for p in procs:
                p.kill()
            outputs += [p.communicate()[0] for p in procs[len(outputs) :]]
            break
    if not failure and any(p.returncode for p in procs):
        failure = "a worker exited with status " + ", ".join(
            str(p.returncode) for p in procs if p.returncode
        )
    if failure:
        tail = "\n".join(o.strip().splitlines()[-1] for o in outputs if o and o.strip())
        failure += f" ({tail})" if tail else ""
    return failure


def _collect(case_dir: Path, case: Case, failure: str) -> Outcome:
    """The per-rank result files of one case, or the error the workers left."""
    errors = sorted(case_dir.glob("rank*.error.txt"))
    if errors:
        return Outcome(
            error="; ".join(f"{p.name.split('.')[0]}: {p.read_text().strip()}" for p in errors)
        )
    outs = _read_ranks(case_dir, case.world_size)
    if outs is None:
        return Outcome(error=failure or "no outputs written")
    variants = {
        d.name: _read_ranks(d, case.world_size) for d in sorted(case_dir.iterdir()) if d.is_dir()
    }
    return Outcome(outputs=outs, variants={k: v for k, v in variants.items() if v is not None})


def _read_ranks(directory: Path, world: int) -> list | None:
    """``directory/rank{r}.npz`` for every rank, as result dicts; ``None`` if one is missing."""
    files = [directory / f"rank{r}.npz" for r in range(world)]
    if not all(f.exists() for f in files):
        return None
    return [{k: o.get(k) for k in RESULT_KEYS} for o in map(read_result, files)]


def check_outcomes(cases: dict, outcomes: dict, *, model=None):
    """The checker's report on the cases that gave outputs (the directory protocol).

    Parameters
    ----------
    cases : dict of str to Case
    outcomes : dict of str to Outcome
        From :func:`run`; cases without outputs are left out.
    model : ErrorModel, optional
        Passed to :func:`refsyncbn.testing.checker.check`.

    Returns
    -------
    refsyncbn.testing.checker.CheckReport
    """
    from ..testing.checker import check

    with tempfile.TemporaryDirectory(prefix="refsyncbn-check-") as tmp:
        cases_dir, cand_dir = Path(tmp, "cases"), Path(tmp, "outputs")
        cases_dir.mkdir()
        for name, case in cases.items():
            if outcomes[name].outputs is None:
                continue
            write_case(cases_dir / f"{name}.npz", case)
            (cand_dir / name).mkdir(parents=True)
            for r, out in enumerate(outcomes[name].outputs):
                write_result(cand_dir / name / f"rank{r}.npz", **out)
        return check(cand_dir, cases_dir, model=model)
