"""SyncBN under real MPI, run as ``mpiexec -n K python -m mpi4py tests/mpi/mpi_syncbn.py``.

For cases built from the world size (uneven splits with an empty rank, ragged
and non-contiguous groups, several formats, conventions and dtypes), every
rank checks that

* its MPI outputs (:func:`refsyncbn.cases.run_rank` over ``MPIComm``) are
  bitwise equal to the same rank's outputs in a SimulatedWorld run;
* they match the float64 global-batch oracle;
* mean, invstd and running statistics are bitwise identical on every rank of
  its group (the bytes are gathered);
* (negative control) plain per-rank batch norm differs from the synchronized
  result when the world has two or more ranks.

Every rank prints ``OK syncbn`` or its failures; all exit 1 if any rank failed.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def world_cases(size):
    """Cases for a world of ``size`` ranks; splits and groups written in terms of size."""
    from refsyncbn.cases import Case

    rng = np.random.default_rng(size)
    splits = [3 if r == 0 else (r % 3) for r in range(size)]  # rank 3 empty when size > 3
    if size > 1:
        splits[-1] = 0  # the last rank is empty
    layouts = []
    layouts.append((None, splits))
    if size >= 3:  # ragged: [[0], [1, ..., size-1]] with rank 1 empty
        layouts.append(([[0], list(range(1, size))], [3, 0, *[2] * (size - 2)]))
    if size >= 2:  # non-contiguous: evens and odds; the last rank empty
        groups = [list(range(0, size, 2)), list(range(1, size, 2))]
        layouts.append((groups, [3, 2, *[1] * (size - 3), 0][:size] if size > 2 else [2, 2]))
    specs = [
        ("NCHW", "reference", "float64", False),
        ("NHWC", "torch", "float32", False),
        ("NC", "paddle", "float64", True),
        ("NCL", "chainermn", "float64", False),
        ("NDHWC", "mindspore", "float32", False),
    ]
    cases = []
    for i, (groups, sp) in enumerate(layouts):
        for fmt, conv, dtype, masked in specs[i:] + specs[:i]:
            shape = {
                "NC": [sum(sp), 3],
                "NCL": [sum(sp), 3, 4],
                "NCHW": [sum(sp), 3, 2, 3],
                "NHWC": [sum(sp), 2, 3, 3],
                "NDHWC": [sum(sp), 2, 1, 2, 3],
            }[fmt]
            x = rng.standard_normal(shape) * 2.0 + 1.0
            mask = None
            if masked:
                mask = rng.random(shape[:1]) < 0.6
                for start in np.cumsum([0, *sp[:-1]]):
                    mask[start : start + 2] = True  # >= 2 valid samples in every group
            cases.append(
                Case(
                    x=x.astype(dtype),
                    dy=rng.standard_normal(shape).astype(dtype),
                    weight=rng.uniform(0.5, 2, 3).astype(dtype),
                    bias=rng.standard_normal(3).astype(dtype),
                    running_mean=np.zeros(3, dtype),
                    running_var=np.ones(3, dtype),
                    splits=tuple(sp),
                    data_format=fmt,
                    convention=conv,
                    mask=mask,
                    groups=groups,
                    momentum=0.1 if conv == "torch" else 0.9,
                )
            )
    # Every rank non-empty, samples of rank r around r: the summation order
    # matters (bitwise) and plain per-rank BN is far from SyncBN.
    splits = [2 + r for r in range(size)]
    x = rng.standard_normal((sum(splits), 3)) + np.repeat(np.arange(size), splits)[:, None]
    cases.append(
        Case(
            x=x,
            dy=rng.standard_normal(x.shape),
            running_mean=np.zeros(3),
            running_var=np.ones(3),
            splits=tuple(splits),
            data_format="NC",
        )
    )
    return cases


def statistics_bytes(case, world):
    """Bytes of mean, invstd and running statistics on this rank (MPI forward)."""
    from refsyncbn import forward
    from refsyncbn.comm import group_comm
    from refsyncbn.conventions import get_convention

    group = group_comm(world, case.groups)
    shard = case.shard(world.rank)
    res = forward(
        shard["x"],
        case.weight,
        case.bias,
        running_mean=case.running_mean,
        running_var=case.running_var,
        eps=case.eps,
        momentum=case.momentum,
        data_format=case.data_format,
        convention=case.convention,
        mask=shard.get("mask"),
        comm=group,
        xp=np,
    )
    if group is not world:
        group.free()
    stats = {"mean": res.saved.mean, "invstd": res.saved.invstd, "running_mean": res.running_mean}
    if get_convention(case.convention).running_var != "unbiased_local":
        stats["running_var"] = res.running_var  # ChainerMN's uses the LOCAL count by design
    return {k: np.asarray(a).tobytes() for k, a in stats.items()}


def check(v):
    from refsyncbn import SimulatedWorld, forward
    from refsyncbn.cases import run_rank
    from refsyncbn.cli.selfcheck import case_error
    from refsyncbn.comm import MPIComm
    from refsyncbn.testing.oracle import expected_outputs

    world = MPIComm()
    rank, size = world.rank, world.size
    for i, case in enumerate(world_cases(size)):
        tag = (
            f"case {i} ({case.data_format}, {case.convention}, {case.x.dtype}, "
            f"splits {list(case.splits)}, groups {case.groups})"
        )
        got = run_rank(case, world)
        sim = SimulatedWorld(size).run(lambda comm, c=case: run_rank(c, comm))[rank]
        for key, a in got.items():
            b = sim[key]
            same = (a is None and b is None) or (
                a is not None
                and b is not None
                and a.dtype == b.dtype
                and a.tobytes() == b.tobytes()
            )
            v.expect(same, f"{tag}: MPI {key} differs from SimulatedWorld")
        err, key = case_error(case, rank, got, expected_outputs(case, param_grads="local")[rank])
        v.expect(err <= 1.0, f"{tag}: {key} off the float64 oracle by {err:.3g} x tolerance")

        mine = statistics_bytes(case, world)
        group_index = next((g for g, grp in enumerate(case.groups or [[]]) if rank in grp), 0)
        everyone = world.mpi_comm.allgather((group_index, mine))
        for r, (g, theirs) in enumerate(everyone):
            if g == group_index:
                for k in mine:
                    v.expect(theirs[k] == mine[k], f"{tag}: {k} bytes differ on ranks {rank}, {r}")

    if size >= 2:  # negative control: unsynchronized BN must differ on uneven data
        case = world_cases(size)[-1]
        sync = run_rank(case, world)["y"]
        plain = forward(case.shard(rank)["x"], data_format="NC").y
        diffs = world.mpi_comm.allgather(float(np.max(np.abs(plain - sync))))
        v.expect(max(diffs) > 1e-2, f"plain per-rank BN equals SyncBN (max diff {max(diffs)})")


def main():
    sys.path.insert(0, os.path.dirname(__file__))
    from _collective import Verdict

    v = Verdict("syncbn")
    check(v)
    return v.finish()


if __name__ == "__main__":
    sys.exit(main())
