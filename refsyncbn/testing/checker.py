"""Check another SyncBatchNorm implementation: accuracy verdict and convention fingerprint.

:func:`check` runs designed probe cases (``WORLD_SIZE = 2`` ranks, float32
data) through a CANDIDATE and reports

(a) for every probe, rank and output, the error against the float64 oracle
    of the expected convention relative to the :class:`ErrorModel` bound
    (pass when at most 1);
(b) a FINGERPRINT: which convention the candidate follows, each trait
    inferred from a probe designed so that the alternatives give clearly
    different answers.

Candidates
----------
A callable doing ONE rank's forward and backward on NumPy arrays::

    candidate(x, dy, weight, bias, running_mean, running_var, *,
              eps, momentum, training, data_format, comm) -> dict

``x``/``dy`` are this rank's local batch (``data_format`` layout, possibly
empty), ``weight``/``bias``/``running_*`` are ``(C,)``, ``momentum`` is to be
read in the candidate's OWN meaning, ``comm`` is a refsyncbn Communicator over
this rank's group (``rank``, ``size``, ``allreduce_sum(buf, xp=np)``): the
candidate synchronizes through it. It returns ``y``, ``dx``, ``dweight``,
``dbias`` (this rank's, in its convention's reduction) and the NEW
``running_mean``/``running_var``, as arrays of any namespace. The checker runs
the ranks as a :class:`~refsyncbn.comm.SimulatedWorld`, or on the ranks of
``comm=`` under ``mpiexec -n 2``.

With ``global_batch=True`` the callable is a single-process implementation:
it is called once per group with the group's concatenated batch and
``comm=LocalComm()``; its ``y``/``dx`` are split back into the ranks, and its
parameter gradients (group sums by construction) are compared with the group
sums (the parameter-gradient trait reads "n/a").

A directory: ``CANDIDATE_DIR/<case>/rank{r}.npz`` (keys of
:data:`refsyncbn.cases.RESULT_KEYS`) answering each ``CASES_DIR/<case>.npz``
(schema "refsyncbn case v1"; the expected convention is each case's
``convention``). :func:`write_probes` (``python -m refsyncbn check
--write-probes DIR``) writes the probe cases for an external implementation;
``python -m refsyncbn run CASE OUT --world 2`` shows the expected layout.
Other case files (e.g. the golden vectors) are checked for accuracy only.

Probe design
------------
Every probe uses float32 data, affine parameters and ``dy``. Structural
alternatives differ by 25 % or more, far beyond any float32 bound.

``running_stats``
    Splits (2, 2), running stats far from the batch statistics,
    ``momentum = 0.25``. The batch weight ``a = (rm - rm0) / (mean - rm0)``
    is 0.75 for "retain" and 0.25 for "update"; then the variance correction
    ``k = (rv - (1 - a) rv0) / (a var)`` is 1 (biased), ``m/(m-1) = 4/3``
    (unbiased_global) or ``n/(n-1) = 2`` (unbiased_local).
``weighting``
    Splits (2, 6) with very different rank means, unit weight and zero bias.
    A line fit of ``y`` on ``x`` per rank gives the mean each rank used:
    the count-weighted mean (4.625 on channel 0), the mean of the per-rank
    means (6.75), or each rank its own (not synchronized).
``eps``
    Variances 1e-4, 1e-3, 1e-2 and ``eps = 3e-3`` (no framework's default).
    The fitted scale ``s = 1 / slope`` gives ``s^2 - var`` (eps inside the
    square root) or ``s - sqrt(var)`` (outside); only the true placement is
    constant over the three channels, and its value is the eps used.
``param_grads``
    ``sum dy`` is 1 on rank 0 and 3 on rank 1: ``dbias`` reads (1, 3) for
    local gradients, (4, 4) summed, (2, 2) averaged.
``cancellation``
    Two ranks of 64 values with ``|mean| / std`` ~ 3000 whose rank means lie
    6 std apart, each exactly half a float32 ulp off the float32 grid (rank
    0 rounds down, rank 1 up). The variance implied by the fitted slope is
    compared with two float32 error bounds. Within the ``two_pass`` bound:
    "cancellation-free" (one centring about the global mean, or float64
    statistics). Beyond it but within the ``stable`` bound: "per-rank-merged"
    (float32 per-rank means merged by count or equally, like PyTorch: the
    rounded rank means shift the between-rank term by ``~ u |mean| std``).
    Beyond that: "naive", ``E[x^2] - E[x]^2``, the error per
    ``(|mean|/std)^2`` estimating its precision.
``empty_rank``
    NHWC with rank 0 empty: "skip" when ``y`` is finite, "nan" when every
    value is NaN (Flax, whose ``pmean`` spreads the empty device's NaN mean).
``general``, ``groups``, ``eval``
    Accuracy only: NCHW with uneven splits, two one-rank process groups,
    eval mode.
"""

from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .._xp import to_numpy
from ..cases import RESULT_KEYS, Case, read_case, read_result, write_case
from ..comm import LocalComm, RankError, SimulatedWorld, group_comm
from ..conventions import CONVENTIONS, get_convention
from ..functional import backward, forward
from ..layouts import get_layout
from .tolerances import ErrorModel, _expected, compare_outputs

__all__ = [
    "PROBE_EPS",
    "PROBE_MOMENTUM",
    "WORLD_SIZE",
    "Candidate",
    "CheckReport",
    "Trait",
    "add_arguments",
    "check",
    "fingerprint",
    "main",
    "probe_cases",
    "reference_candidate",
    "run_candidate",
    "write_probes",
]

WORLD_SIZE = 2
PROBE_MOMENTUM = 0.25
PROBE_EPS = 3e-3
_F32 = np.float32
_TWO_PASS = ErrorModel("float32", "two_pass")
_STABLE = ErrorModel("float32", "stable")
# The variance each preset's framework computes: "naive" E[x^2] - E[x]^2
# (paddle's sync_batch_norm kernel, Keras' _compute_moments_sync, Flax's
# use_fast_variance default, ChainerMN's sqmean) or a cancellation-free one.
# A naive preset also matches a more accurate candidate; a stable preset does
# not match a naive one. MindSpore's kernels differ: no constraint.
_PRESET_VARIANCE = {
    "reference": "stable",
    "torch": "stable",
    "paddle": "naive",
    "keras": "naive",
    "flax": "naive",
    "chainermn": "naive",
}


class Candidate(Protocol):
    """The protocol of an implementation under test: ONE rank's forward and backward.

    Called on every rank of the case's group (as threads of a
    :class:`~refsyncbn.comm.SimulatedWorld`, or under ``mpiexec`` with
    ``check(..., comm=MPIComm())``) with NumPy arrays:

    Parameters
    ----------
    x, dy : ndarray
        This rank's local batch and output gradient, ``data_format`` layout,
        possibly empty (zero rows).
    weight, bias, running_mean, running_var : ndarray
        ``(C,)``.
    eps, momentum : float
        ``momentum`` in the candidate's OWN meaning (the case's convention).
    training : bool
        Batch statistics (True) or the running ones.
    data_format : str
        ``"NC"``, ``"NCL"``, ``"NCHW"``, ``"NHWC"``, ...; the probes use
        ``"NC"``, ``"NCL"``, ``"NCHW"`` and ``"NHWC"``.
    comm : Communicator
        This rank's group: ``comm.rank``, ``comm.size`` and
        ``comm.allreduce_sum(buf, xp=np)`` (element-wise sum over the group,
        the same result on every rank). Synchronize through it.

    Returns
    -------
    dict
        ``y``, ``dx``, ``dweight``, ``dbias`` (this rank's, reduced as its
        convention says) and the NEW ``running_mean``, ``running_var``, as
        arrays of any namespace (missing keys fail their checks).

    Examples
    --------
    >>> def my_sync_bn(x, dy, weight, bias, running_mean, running_var, *, eps, momentum,
    ...                training, data_format, comm):
    ...     ...
    >>> # refsyncbn.testing.check(my_sync_bn, expect="torch")
    """

    def __call__(
        self,
        x,
        dy,
        weight,
        bias,
        running_mean,
        running_var,
        *,
        eps,
        momentum,
        training,
        data_format,
        comm,
    ) -> dict: ...


@dataclass(frozen=True)
class Trait:
    """One inferred convention trait: its value and the measurement behind it."""

    name: str
    value: str
    evidence: str


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check` found.

    ``checks`` maps each case name to its :class:`QuantityCheck` list (one per
    rank and output: ``ratio`` is error / bound, pass when at most 1),
    ``errors`` the cases whose outputs could not be obtained to the reason,
    ``fingerprint`` each trait name to a :class:`Trait`, ``presets`` the
    presets consistent with the fingerprint.

    ``str(report)`` is a one-screen summary (:meth:`summary`);
    :meth:`details` lists every check; :meth:`to_dict`, :meth:`write_json`
    and :meth:`write_junit` export it.
    """

    checks: dict
    errors: dict
    fingerprint: dict
    model: ErrorModel
    presets: tuple = ()

    @property
    def passed(self) -> bool:
        return not self.errors and all(c.passed for cs in self.checks.values() for c in cs)

    def worst(self, name):
        """The :class:`QuantityCheck` with the largest ratio of case ``name``."""
        return max(self.checks[name], key=lambda c: c.ratio)

    def _verdict(self) -> str:
        total = sum(len(cs) for cs in self.checks.values())
        failed = sum(not c.passed for cs in self.checks.values() for c in cs)
        verdict = "PASS" if self.passed else "FAIL"
        return f"verdict: {verdict}: {total - failed} of {total} outputs within the bound" + (
            f", {len(self.errors)} case(s) without outputs" if self.errors else ""
        )

    def _fingerprint_lines(self) -> list[str]:
        if not self.fingerprint:
            return []
        lines = ["fingerprint:"]
        lines += [f"  {t.name:<17} {t.value:<20} {t.evidence}" for t in self.fingerprint.values()]
        lines.append(f"  consistent with presets: {', '.join(self.presets) or 'none'}")
        return lines

    def summary(self, max_cases: int = 15) -> str:
        """One screen: failing cases (worst first), passing count, fingerprint, verdict."""
        n_cases = len(self.checks) + len(self.errors)
        lines = [f"refsyncbn check: {n_cases} case(s), {self.model}"]
        bad = sorted(
            (n for n, cs in self.checks.items() if not all(c.passed for c in cs)),
            key=lambda n: -self.worst(n).ratio,
        )
        shown = [f"FAIL  {n}: {self.worst(n).describe()}" for n in bad]
        shown += [f"ERROR {n}: {reason}" for n, reason in self.errors.items()]
        lines += shown[:max_cases]
        if len(shown) > max_cases:
            lines.append(f"... and {len(shown) - max_cases} more failing case(s) (-v lists all)")
        ok = [n for n in self.checks if n not in bad]
        if ok:
            worst = max(ok, key=lambda n: self.worst(n).ratio)
            lines.append(
                f"ok    {len(ok)} case(s); largest error/bound {self.worst(worst).ratio:.3g}"
                f" ({worst}: {self.worst(worst).describe()})"
            )
        return "\n".join([*lines, *self._fingerprint_lines(), self._verdict()])

    def details(self) -> str:
        """Every case, rank and output on its own line, then fingerprint and verdict."""
        lines = [f"refsyncbn check: {len(self.checks) + len(self.errors)} case(s), {self.model}"]
        for name, cs in self.checks.items():
            lines += [f"{'ok  ' if c.passed else 'FAIL'} {name}: {c.describe()}" for c in cs]
        lines += [f"ERROR {name}: {reason}" for name, reason in self.errors.items()]
        return "\n".join([*lines, *self._fingerprint_lines(), self._verdict()])

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        """JSON-ready: verdict, model, per-case checks, errors, fingerprint, presets."""

        def num(v):
            return v if math.isfinite(v) else str(v)

        return {
            "passed": self.passed,
            "model": {
                k: getattr(self.model, k)
                for k in ("accumulation", "variance", "summation", "safety")
            },
            "cases": {
                name: {
                    "passed": all(c.passed for c in cs),
                    "checks": [
                        {
                            "rank": c.rank,
                            "quantity": c.quantity,
                            "ratio": num(c.ratio),
                            "error": num(c.error),
                            "bound": num(c.bound),
                            "index": list(c.index),
                            "channel": c.channel,
                            "problem": c.problem,
                            "passed": c.passed,
                        }
                        for c in cs
                    ],
                }
                for name, cs in self.checks.items()
            },
            "errors": dict(self.errors),
            "fingerprint": {
                k: {"value": t.value, "evidence": t.evidence} for k, t in self.fingerprint.items()
            },
            "presets": list(self.presets),
        }

    def write_json(self, path) -> None:
        """Write :meth:`to_dict` as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def write_junit(self, path) -> None:
        """Write a JUnit XML report to ``path``: one testcase per case, the fingerprint as properties."""
        suite = ET.Element(
            "testsuite",
            name="refsyncbn.check",
            tests=str(len(self.checks) + len(self.errors)),
            failures=str(sum(not all(c.passed for c in cs) for cs in self.checks.values())),
            errors=str(len(self.errors)),
        )
        props = ET.SubElement(suite, "properties")
        for key, trait in self.fingerprint.items():
            ET.SubElement(props, "property", name=f"fingerprint.{key}", value=trait.value)
        ET.SubElement(props, "property", name="presets", value=",".join(self.presets))
        for name, cs in self.checks.items():
            case = ET.SubElement(suite, "testcase", classname="refsyncbn.check", name=name)
            failed = [c for c in cs if not c.passed]
            if failed:
                fail = ET.SubElement(case, "failure", message=self.worst(name).describe())
                fail.text = "\n".join(c.describe() for c in failed)
        for name, reason in self.errors.items():
            case = ET.SubElement(suite, "testcase", classname="refsyncbn.check", name=name)
            ET.SubElement(case, "error", message=reason)
        ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def _rng_values(rng, shape, loc, scale, axis):
    """Values with per-channel location/scale (channel axis ``axis``), float32."""
    z = rng.standard_normal(shape)
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return (z * np.reshape(scale, bshape) + np.reshape(loc, bshape)).astype(_F32)


def _half_ulp_rank_means(rng, centres, n=64, apart=3.0):
    """``(2 n, C)`` float32 values: rank means ``centre -/+ apart`` std, half an ulp off the grid.

    Rank 0's exact mean lies at an even multiple of the ulp ``q`` plus
    ``q/2`` (a tie rounding down to even), rank 1's at an odd multiple plus
    ``q/2`` (rounding up); ``q = 2**-10`` in [8192, 16384).
    """
    q = 2.0**-10
    cols = []
    for centre in centres:
        ranks = []
        for r, target in enumerate((32, 96)):  # sum / q modulo 128
            v = np.round((centre + (2 * r - 1) * apart + rng.standard_normal(n)) / q) * q
            v[0] += ((target - round(v.sum() / q)) % 128) * q
            ranks.append(v)
        cols.append(np.concatenate(ranks))
    return np.stack(cols, axis=1).astype(_F32)


def probe_cases(expect="reference") -> dict[str, Case]:
    """The probe cases (see the module docstring), expecting convention ``expect``.

    Examples
    --------
    >>> cases = probe_cases("torch")
    >>> len(cases), cases["eps"].eps, cases["weighting"].splits
    (9, 0.003, (2, 6))
    """
    conv = get_convention(expect)
    if conv.name not in CONVENTIONS or CONVENTIONS[conv.name] != conv:
        msg = f"expect is {expect!r}; expected one of the presets {tuple(CONVENTIONS)}"
        raise ValueError(msg)
    rng = np.random.default_rng(20240605)

    def affine(c, unit=False):
        if unit:
            return {"weight": np.ones(c, _F32), "bias": np.zeros(c, _F32)}
        return {
            "weight": rng.uniform(0.5, 2.0, c).astype(_F32),
            "bias": rng.uniform(-1.0, 1.0, c).astype(_F32),
        }

    def make(x, splits, data_format="NC", unit=False, dy=None, **kw):
        c = get_layout(data_format).channels(x.shape)
        kw.setdefault("running_mean", rng.uniform(-1, 1, c).astype(_F32))
        kw.setdefault("running_var", rng.uniform(0.5, 2, c).astype(_F32))
        kw.setdefault("momentum", conv.momentum)
        kw.setdefault("eps", conv.eps)
        dy = rng.standard_normal(x.shape).astype(_F32) if dy is None else dy.astype(_F32)
        return Case(
            x=np.asarray(x, _F32),
            splits=splits,
            data_format=data_format,
            convention=conv.name,
            dy=dy,
            **affine(c, unit),
            **kw,
        )

    pm = np.array([1, -1, 1, -1, -1, 1, -1, 1], _F32)
    sd = np.sqrt([1e-4, 1e-3, 1e-2])
    return {
        "running_stats": make(
            np.array([[1, -2], [3, 0], [5, 2], [7, 8]]),
            (2, 2),
            running_mean=np.array([-4, 10], _F32),
            running_var=np.array([1, 2], _F32),
            momentum=PROBE_MOMENTUM,
        ),
        "weighting": make(
            np.array([[10, -5], [12, -3], [0, 1], [1, 2], [2, 3], [3, 5], [4, 8], [5, 13]]),
            (2, 6),
            unit=True,
        ),
        "eps": make(
            np.array([0.5, -1.0, 2.0]) + pm[:, None] * sd, (4, 4), unit=True, eps=PROBE_EPS
        ),
        "param_grads": make(
            rng.standard_normal((4, 2)),
            (2, 2),
            dy=np.array([[0.25, 0.5], [0.75, 0.5], [1, 2], [2, 1]]),
        ),
        "cancellation": make(_half_ulp_rank_means(rng, (8300.0, 12300.0)), (64, 64), unit=True),
        "general": make(
            _rng_values(rng, (5, 3, 2, 2), [0.5, -3, 20], [1, 0.2, 4], 1), (2, 3), "NCHW"
        ),
        "empty_rank": make(_rng_values(rng, (3, 2, 2, 2), [1, -1], [1, 2], 3), (0, 3), "NHWC"),
        "groups": make(
            _rng_values(rng, (7, 3), [0, 5, -5], [1, 3, 0.5], 1), (3, 4), groups=[[0], [1]]
        ),
        "eval": make(
            _rng_values(rng, (4, 2, 3), [2, -2], [1, 1], 1), (1, 3), "NCL", training=False
        ),
    }


def write_probes(directory, expect="reference") -> list[Path]:
    """Write :func:`probe_cases` as ``directory/<name>.npz``; the paths written, sorted."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, case in sorted(probe_cases(expect).items()):
        paths.append(directory / f"{name}.npz")
        write_case(paths[-1], case)
    return paths


def reference_candidate(convention="reference", *, variance="stable"):
    """The reference (:func:`refsyncbn.forward`/:func:`~refsyncbn.backward`) as a candidate.

    Parameters
    ----------
    convention : Convention or str
        The convention it follows (any :class:`~refsyncbn.Convention`, e.g. a
        deliberately wrong one made with :func:`dataclasses.replace`).
    variance : {"stable", "naive"}
        The reference's variance algorithm (``forward``'s ``variance``).

    Examples
    --------
    >>> report = check(reference_candidate("torch"), expect="torch")
    >>> report.passed, report.fingerprint["running_var"].value
    (True, 'unbiased_global')
    """
    conv = get_convention(convention)

    def candidate(
        x,
        dy,
        weight,
        bias,
        running_mean,
        running_var,
        *,
        eps,
        momentum,
        training,
        data_format,
        comm,
    ):
        res = forward(
            x,
            weight,
            bias,
            running_mean=running_mean,
            running_var=running_var,
            training=training,
            eps=eps,
            momentum=momentum,
            data_format=data_format,
            convention=conv,
            variance=variance,
            comm=comm,
            xp=np,
        )
        grads = backward(dy, res.saved)
        return {
            "y": res.y,
            "dx": grads.dx,
            "dweight": grads.dweight,
            "dbias": grads.dbias,
            "running_mean": res.running_mean,
            "running_var": res.running_var,
        }

    return candidate


def _call(candidate, case, comm, x, dy):
    """One call of ``candidate`` on ``x``/``dy`` with ``case``'s other arguments."""
    out = candidate(
        x,
        dy,
        case.weight,
        case.bias,
        case.running_mean,
        case.running_var,
        eps=case.eps,
        momentum=case.momentum,
        training=case.training,
        data_format=case.data_format,
        comm=comm,
    )
    return {k: (None if out.get(k) is None else to_numpy(out[k])) for k in RESULT_KEYS}


def _rank_outputs(candidate, case, comm) -> dict:
    """The calling world rank's outputs (collective over the world ``comm``)."""
    shard = case.shard(comm.rank)
    return _call(candidate, case, group_comm(comm, case.groups), shard["x"], shard.get("dy"))


def _global_outputs(candidate, case) -> list[dict]:
    """Per world rank, a single-process candidate's outputs (one call per group)."""
    out: list = [None] * case.world_size
    for group in case.groups or [list(range(case.world_size))]:
        shards = [case.shard(r) for r in group]
        x = np.concatenate([s["x"] for s in shards])
        dy = None if case.dy is None else np.concatenate([s["dy"] for s in shards])
        res = _call(candidate, case, LocalComm(), x, dy)
        stops = np.cumsum([len(s["x"]) for s in shards])[:-1]
        parts = {k: np.split(res[k], stops) for k in ("y", "dx") if res[k] is not None}
        for i, r in enumerate(group):
            out[r] = dict(res, **{k: v[i] for k, v in parts.items()})
    return out


def _gather(comm, case, mine) -> list[dict]:
    """Every world rank's outputs on every rank, through ``comm.allreduce_sum``."""
    c = get_layout(case.data_format).channels(case.x.shape)
    shapes = [
        {k: (case.shard(r)["x"].shape if k in ("y", "dx") else (c,)) for k in RESULT_KEYS}
        for r in range(comm.size)
    ]
    sizes = [sum(1 + math.prod(s) for s in sh.values()) for sh in shapes]
    buf = np.zeros(sum(sizes))
    pos = sum(sizes[: comm.rank])
    for k, shape in shapes[comm.rank].items():
        v = mine[k]
        ok = v is not None and tuple(v.shape) == tuple(shape)
        buf[pos] = 1.0 if ok else (0.0 if v is None else -1.0)
        if ok:
            buf[pos + 1 : pos + 1 + math.prod(shape)] = np.asarray(v, np.float64).reshape(-1)
        pos += 1 + math.prod(shape)
    buf = comm.allreduce_sum(buf, xp=np)
    out, pos = [], 0
    for sh in shapes:
        res = {}
        for k, shape in sh.items():
            flag, n = buf[pos], math.prod(shape)
            # -1: the rank returned a wrong shape (reported as an empty array)
            res[k] = (
                buf[pos + 1 : pos + 1 + n].reshape(shape)
                if flag > 0
                else (np.zeros(0) if flag < 0 else None)
            )
            pos += 1 + n
        out.append(res)
    return out


def run_candidate(candidate, case, *, comm=None, global_batch=False) -> list[dict]:
    """Every world rank's outputs of ``candidate`` on ``case`` (see the module docstring).

    Parameters
    ----------
    candidate : callable
        The candidate protocol of this module.
    case : refsyncbn.cases.Case
        The problem (without a mask: the protocol has none).
    comm : Communicator, optional
        World communicator of ``case.world_size`` ranks (e.g. ``MPIComm()``
        under mpiexec): collective, every rank gets every rank's outputs.
        Default: a :class:`~refsyncbn.comm.SimulatedWorld`.
    global_batch : bool
        ``candidate`` is a single-process implementation (``comm`` unused).

    Returns
    -------
    list of dict
        Per world rank, the outputs as NumPy arrays (``None`` where absent).
    """
    if case.mask is not None:
        msg = "run_candidate: the candidate protocol has no mask; check masked cases as files"
        raise ValueError(msg)
    if global_batch:
        return _global_outputs(candidate, case)
    if comm is None:
        return SimulatedWorld(case.world_size).run(lambda cm: _rank_outputs(candidate, case, cm))
    if comm.size != case.world_size:
        msg = (
            f"run_candidate: the case has {case.world_size} ranks, comm has {comm.size}; "
            f"run under mpiexec -n {case.world_size}"
        )
        raise ValueError(msg)
    return _gather(comm, case, _rank_outputs(candidate, case, comm))


def check(
    candidate, cases_dir=None, *, expect="reference", global_batch=False, model=None, comm=None
) -> CheckReport:
    """Check a candidate implementation: accuracy per output and a convention fingerprint.

    Parameters
    ----------
    candidate : callable or path
        A callable following the candidate protocol (module docstring), run
        on :func:`probe_cases` ``(expect)``; or ``CANDIDATE_DIR`` holding
        ``<case>/rank{r}.npz`` for every ``cases_dir/<case>.npz``.
    cases_dir : path, optional
        Case files answered by ``CANDIDATE_DIR`` (directory candidates only).
    expect : str
        Convention the callable is expected to follow (presets only).
    global_batch : bool
        The callable is a single-process, global-batch implementation.
    model : ErrorModel, optional
        The candidate's arithmetic (default: float32, cancellation-free).
    comm : Communicator, optional
        World communicator of :data:`WORLD_SIZE` ranks for a callable run
        under mpiexec (collective; every rank gets the same report).

    Returns
    -------
    CheckReport
        ``str(report)`` is the printable report; ``report.passed`` the verdict.
    """
    model = ErrorModel() if model is None else model
    errors: dict = {}
    if callable(candidate):
        if cases_dir is not None:
            msg = "cases_dir is for directory candidates; a callable runs the probe cases"
            raise ValueError(msg)
        cases = probe_cases(expect)
        outputs = {}
        for name, case in cases.items():
            try:
                outputs[name] = run_candidate(candidate, case, comm=comm, global_batch=global_batch)
            except RankError as exc:
                errors[name] = f"the candidate raised: {exc}"
    else:
        if cases_dir is None:
            msg = f"candidate is {candidate!r}; a directory candidate needs cases_dir"
            raise ValueError(msg)
        cases, outputs, errors = _read_dirs(Path(candidate), Path(cases_dir))
    pg = "sum" if global_batch else None
    checks = {}
    for name, outs in outputs.items():
        case = cases[name]
        expected = _expected(case, pg)
        bounds = model.bounds(case, expected, param_grads=pg)
        checks[name] = compare_outputs(outs, expected, bounds, data_format=case.data_format)
    traits = fingerprint(cases, outputs, global_batch=global_batch)
    return CheckReport(checks, errors, traits, model, _presets(traits))


def _read_dirs(candidate_dir, cases_dir):
    """Cases of ``cases_dir`` and the candidate's per-rank outputs for them."""
    paths = sorted(cases_dir.glob("*.npz"))
    if not paths:
        msg = f"cases_dir {cases_dir} holds no .npz case files"
        raise ValueError(msg)
    cases, outputs, errors = {}, {}, {}
    for path in paths:
        name = path.stem
        cases[name] = read_case(path)
        files = [candidate_dir / name / f"rank{r}.npz" for r in range(cases[name].world_size)]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            errors[name] = f"missing {', '.join(missing)}"
        else:
            outputs[name] = [read_result(f) for f in files]
    return cases, outputs, errors


def _fit(x, y):
    """Least-squares line ``y = a (x - c)``: slope ``a`` and centre ``c`` (float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xm, ym = x.mean(), y.mean()
    a = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    return a, xm - ym / a


def _classify(estimate, predictions: dict, tol):
    """The key of the prediction within ``tol`` of ``estimate`` (else ``None``)."""
    near = [k for k, p in predictions.items() if abs(estimate - p) <= tol]
    return near[0] if len(near) == 1 else None


def _col(outs, key, rank):
    """Rank ``rank``'s output ``key`` as float64 rows ``(elements, C)`` (NC probes)."""
    return np.asarray(outs[rank][key], np.float64)


def fingerprint(cases, outputs, *, global_batch=False) -> dict[str, Trait]:
    """Infer the candidate's convention traits from its outputs on the probe cases.

    Parameters
    ----------
    cases, outputs : dict
        Case name to :class:`~refsyncbn.cases.Case` and to the per-rank
        outputs; probes that are absent give "not probed".
    global_batch : bool
        The outputs come from a single-process implementation.

    Returns
    -------
    dict of str to Trait
        ``momentum_meaning``, ``running_var``, ``weighting``, ``eps_placement``,
        ``eps_value``, ``param_grads``, ``variance``, ``empty_rank`` (the module docstring
        explains each probe). A trait that matches no alternative reads
        "unrecognized" with the measurement in its evidence.
    """
    traits: dict = {}
    if not set(_TRAITS_OF) & set(outputs):
        return traits
    readers = (
        ("running_stats", _running_traits),
        ("weighting", _weighting_trait),
        ("eps", _eps_traits),
        ("param_grads", _param_grads_trait),
        ("cancellation", _variance_trait),
        ("empty_rank", _empty_rank_trait),
    )
    for name, reader in readers:
        if name in outputs:
            with np.errstate(all="ignore"):
                found = reader(cases[name], outputs[name])
        else:
            found = [
                Trait(t, "not probed", f"no outputs for probe {name!r}") for t in _TRAITS_OF[name]
            ]
        traits.update({t.name: t for t in found})
    if global_batch:
        traits["param_grads"] = Trait(
            "param_grads", "n/a", "global-batch candidate: parameter gradients are group sums"
        )
    return traits


_TRAITS_OF = {
    "running_stats": ("momentum_meaning", "running_var"),
    "weighting": ("weighting",),
    "eps": ("eps_placement", "eps_value"),
    "param_grads": ("param_grads",),
    "cancellation": ("variance",),
    "empty_rank": ("empty_rank",),
}


def _running_traits(case, outs):
    """Momentum meaning and running-variance correction (probe ``running_stats``)."""
    x = np.asarray(case.x, np.float64)
    mean, var, m = x.mean(0), x.var(0), len(x)
    rm0, rv0 = np.asarray(case.running_mean, np.float64), np.asarray(case.running_var, np.float64)
    p = case.momentum
    a = float(
        np.mean([(_col(outs, "running_mean", r) - rm0) / (mean - rm0) for r in range(len(outs))])
    )
    meaning = _classify(a, {"retain": 1 - p, "update": p}, 0.1) or "unrecognized"
    mom = Trait(
        "momentum_meaning",
        meaning,
        f"batch weight {a:.4g} with momentum {p}: retain gives {1 - p:g}, update {p:g}",
    )
    ks = [
        float(np.mean((_col(outs, "running_var", r) - (1 - a) * rv0) / (a * var)))
        for r in range(len(outs))
    ]
    kinds = {
        _classify(
            k, {"biased": 1.0, "unbiased_global": m / (m - 1), "unbiased_local": n / (n - 1)}, 0.1
        )
        for k, n in zip(ks, case.splits, strict=True)
    }
    value = kinds.pop() if len(kinds) == 1 else None
    rv = Trait(
        "running_var",
        value or "unrecognized",
        f"variance correction {', '.join(f'{k:.4g}' for k in ks)} on ranks "
        f"0..{len(outs) - 1} (m={m}, n={list(case.splits)}): biased 1, "
        f"unbiased_global m/(m-1)={m / (m - 1):.4g}, unbiased_local n/(n-1)",
    )
    return [mom, rv]


def _weighting_trait(case, outs):
    """Count or equal weighting, or no synchronization (probe ``weighting``)."""
    x = np.asarray(case.x, np.float64)
    parts = [x[slice(*case.bounds(r))] for r in range(len(outs))]
    local = [p[:, 0].mean() for p in parts]
    preds = {"count": x[:, 0].mean(), "equal": float(np.mean(local))}
    centres = [_fit(p[:, 0], _col(outs, "y", r)[:, 0])[1] for r, p in enumerate(parts)]
    gap = abs(preds["count"] - preds["equal"])
    kinds = {_classify(c, preds, 0.1 * gap) for c in centres}
    value = kinds.pop() if len(kinds) == 1 else None
    if value is None and all(
        abs(c - lm) <= 0.1 * gap for c, lm in zip(centres, local, strict=True)
    ):
        value = "unsynchronized"
    return [
        Trait(
            "weighting",
            value or "unrecognized",
            f"channel-0 mean used per rank {', '.join(f'{c:.4g}' for c in centres)}: "
            f"count {preds['count']:.4g}, equal {preds['equal']:.4g}, "
            f"local {', '.join(f'{lm:.4g}' for lm in local)}",
        )
    ]


def _eps_traits(case, outs):
    """Where eps enters and which value is used (probe ``eps``)."""
    x = np.asarray(case.x, np.float64)
    y = np.concatenate([_col(outs, "y", r) for r in range(len(outs))])
    var = x.var(0)
    scale = np.array([1.0 / _fit(x[:, c], y[:, c])[0] for c in range(x.shape[1])])
    estimates = {"inside_sqrt": scale**2 - var, "outside_sqrt": scale - np.sqrt(var)}
    placement, value = "unrecognized", "unrecognized"
    for name, e in estimates.items():
        if np.all(e > 0) and e.max() <= 1.02 * e.min():
            placement, used = name, float(np.median(e))
            given = case.eps
            value = "as given" if abs(used - given) <= 0.02 * given else f"{used:.3g}"
    spread = "; ".join(f"{k}: {', '.join(f'{v:.4g}' for v in e)}" for k, e in estimates.items())
    evidence = f"eps given {case.eps:g}; estimates per channel ({spread})"
    return [Trait("eps_placement", placement, evidence), Trait("eps_value", value, evidence)]


def _param_grads_trait(case, outs):
    """Local, summed or averaged parameter gradients (probe ``param_grads``)."""
    dy = np.asarray(case.dy, np.float64)
    local = [dy[slice(*case.bounds(r))].sum(0) for r in range(len(outs))]
    total = sum(local)
    kinds = set()
    for r in range(len(outs)):
        db = _col(outs, "dbias", r)
        preds = {"local": local[r], "sum": total, "mean": total / len(outs)}
        near = [k for k, p in preds.items() if np.all(np.abs(db - p) <= 0.05 * np.abs(total))]
        kinds.add(near[0] if len(near) == 1 else None)
    value = kinds.pop() if len(kinds) == 1 else None
    got = "; ".join(
        f"rank {r}: {np.round(_col(outs, 'dbias', r), 4).tolist()}" for r in range(len(outs))
    )
    return [
        Trait(
            "param_grads",
            value or "unrecognized",
            f"dbias {got}: local {[v.tolist() for v in local]}, sum {total.tolist()}, "
            f"mean {(total / len(outs)).tolist()}",
        )
    ]


def _variance_trait(case, outs):
    """Cancellation-free, per-rank merged or ``E[x^2] - E[x]^2`` (probe ``cancellation``)."""
    x = np.asarray(case.x, np.float64)
    y = np.concatenate([_col(outs, "y", r) for r in range(len(outs))])
    mean, var, m = x.mean(0), x.var(0), len(x)
    found = np.array([1.0 / _fit(x[:, c], y[:, c])[0] ** 2 for c in range(x.shape[1])]) - case.eps
    rel = np.abs(found - var) / var
    allowed = {}
    for name, model in (("two_pass", _TWO_PASS), ("stable", _STABLE)):
        _, d_var = model.statistics_error(
            np.abs(x).mean(0), (x * x).mean(0), mean, var, m, u=model.unit(_F32)
        )
        allowed[name] = model.safety * d_var / var
    kappa = np.abs(mean) / np.sqrt(var)
    evidence = (
        f"relative variance error {', '.join(f'{v:.3g}' for v in rel)} at |mean|/std "
        f"{', '.join(f'{k:.3g}' for k in kappa)} (float32 bounds: two-pass "
        f"{', '.join(f'{v:.3g}' for v in allowed['two_pass'])}, per-rank merged "
        f"{', '.join(f'{v:.3g}' for v in allowed['stable'])})"
    )
    if np.all(rel <= allowed["two_pass"]):
        return [Trait("variance", "cancellation-free", evidence)]
    if np.all(rel <= allowed["stable"]):
        return [Trait("variance", "per-rank-merged", evidence)]
    u_eff = float(np.nanmax(rel / kappa**2)) if np.all(np.isfinite(rel)) else math.inf
    names = {"float16": 2.0**-11, "float32": 2.0**-24, "float64": 2.0**-53}
    like = (
        min(names, key=lambda k: abs(math.log2(names[k]) - math.log2(u_eff)))
        if 0 < u_eff < math.inf
        else "NaN/inf outputs"
    )
    return [
        Trait(
            "variance",
            "naive",
            f"{evidence}; error/(|mean|/std)^2 = {u_eff:.3g}: E[x^2]-E[x]^2 in ~{like}",
        )
    ]


def _empty_rank_trait(case, outs):
    """Whether an empty rank is skipped or makes the group NaN (probe ``empty_rank``)."""
    y = np.concatenate([_col(outs, "y", r).reshape(-1) for r in range(len(outs))])
    value = (
        "nan"
        if y.size and np.isnan(y).all()
        else "skip"
        if np.isfinite(y).all()
        else "unrecognized"
    )
    return [
        Trait(
            "empty_rank",
            value,
            f"rank 0 is empty; {np.isnan(y).sum()} of {y.size} "
            f"y values NaN (Flax: all; the others: none)",
        )
    ]


def _presets(traits) -> tuple:
    """Presets whose every probed trait matches (eps and the variance class included)."""
    keys = ("momentum_meaning", "running_var", "weighting", "param_grads", "empty_rank")
    got = {k: traits[k].value for k in keys if k in traits}

    def eps_ok(conv):
        value = traits["eps_value"].value if "eps_value" in traits else "not probed"
        if value in ("as given", "not probed"):
            return True
        return value != "unrecognized" and abs(float(value) - conv.eps) <= 0.02 * conv.eps

    def variance_ok(name):
        value = traits["variance"].value if "variance" in traits else "not probed"
        return not (value == "naive" and _PRESET_VARIANCE.get(name) == "stable")

    return tuple(
        name
        for name, conv in CONVENTIONS.items()
        if all(v in ("n/a", "not probed") or getattr(conv, k) == v for k, v in got.items())
        and eps_ok(conv)
        and variance_ok(name)
    )


def add_arguments(parser) -> None:
    """Arguments of the ``check`` subcommand."""
    parser.add_argument(
        "candidate_dir",
        type=Path,
        nargs="?",
        help="candidate outputs: CANDIDATE_DIR/<case>/rank{r}.npz",
    )
    parser.add_argument(
        "cases_dir",
        type=Path,
        nargs="?",
        help="case files CASES_DIR/<case>.npz (e.g. from --write-probes)",
    )
    parser.add_argument(
        "--write-probes", type=Path, metavar="DIR", help="write the probe cases to DIR and exit"
    )
    parser.add_argument(
        "--expect",
        default="reference",
        choices=tuple(CONVENTIONS),
        help="convention the probes written by --write-probes expect",
    )
    parser.add_argument(
        "--accumulation",
        default=None,
        choices=("float64", "float32", "bfloat16", "float16"),
        help="the candidate's accumulation precision (error model; default: "
        "the data's, at least float32)",
    )
    parser.add_argument(
        "--variance",
        default="stable",
        choices=("stable", "two_pass", "naive"),
        help="the candidate's variance algorithm (error model): stable "
        "(cancellation-free, per-rank merges included), two_pass, or naive "
        "(E[x^2] - E[x]^2 allowance)",
    )
    parser.add_argument(
        "--summation",
        default="pairwise",
        choices=("pairwise", "recursive"),
        help="the candidate's summation order (error model)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="list every case, rank and output instead of the summary",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write a JSON report")
    parser.add_argument(
        "--junit-xml",
        type=Path,
        metavar="PATH",
        help="also write a JUnit XML report (one testcase per case)",
    )


def _error(message) -> int:
    print(f"refsyncbn check: error: {message}", file=sys.stderr)
    return 2


def main(args) -> int:
    """0 when every output is within its bound, 1 when not, 2 for a usage error."""
    if args.write_probes is not None:
        if args.candidate_dir is not None:
            return _error("--write-probes takes no CANDIDATE_DIR/CASES_DIR")
        try:
            paths = write_probes(args.write_probes, args.expect)
        except OSError as exc:
            return _error(exc)
        for path in paths:
            print(path)
        out = args.write_probes.parent / "outputs"
        print(
            f"next: answer each case with OUT/<case>/rank{{r}}.npz (python -m refsyncbn run "
            f"{paths[0]} {out / paths[0].stem} --world {WORLD_SIZE} shows the layout), then:\n"
            f"  python -m refsyncbn check {out} {args.write_probes}"
        )
        return 0
    if args.cases_dir is None:
        return _error("give CANDIDATE_DIR and CASES_DIR, or --write-probes DIR")
    for label, path, holds in (
        ("CANDIDATE_DIR", args.candidate_dir, "<case>/rank{r}.npz"),
        ("CASES_DIR", args.cases_dir, "<case>.npz case files"),
    ):
        if not path.is_dir():
            return _error(f"{label} {path} is not a directory; expected a directory of {holds}")
    model = ErrorModel(args.accumulation, args.variance, args.summation)
    try:
        report = check(args.candidate_dir, args.cases_dir, model=model)
        if args.json is not None:
            report.write_json(args.json)
        if args.junit_xml is not None:
            report.write_junit(args.junit_xml)
    except (ValueError, OSError) as exc:
        return _error(exc)
    print(report.details() if args.verbose else report.summary())
    return 0 if report.passed else 1
