"""``python -m refsyncbn bench``: time forward, backward and a full step against baselines.

Launch under ``mpiexec -n K python -m mpi4py -m refsyncbn bench ...`` (or
``scripts/bench_syncbn.py``) to time K ranks; without a launcher it runs one
process. For every case (data format, global shape, dtype) each rank times its
shard of the global batch and reports, median of ``--repeat`` repetitions after
``--warmup`` steps (a repetition runs enough steps to last ~20 ms, so tiny
cases report a per-call time):

* ``forward_ms``, ``backward_ms``, ``step_ms`` (slowest rank per repetition)
  and the kernel ``backend`` that ran (``--backend``, else automatic);
* ``collective_ms`` (time inside ``allreduce_sum``), the collectives per pass
  (``data``: packed float64 buffers; ``agree``: the tiny int64 agreement
  table) and the bytes each pass all-reduces;
* ``peak_bytes``: tracemalloc peak of one untimed step, beyond its inputs, with the
  output pool off (``refsyncbn.kernels._pool``), so its outputs count;
* baselines interleaved with ours in every repetition (on rank 0, on its
  local tensors): ``copy_ms``, ``np.copyto`` of the local tensor, from which
  ``bound_ms = 3 * copy_ms`` is the memory-traffic bound of a step (forward
  reads x twice and writes y, backward reads x and dy and writes dx: 6 tensor
  passes, a copy is 2); ``torch_ms``, torch CPU ``F.batch_norm`` forward plus
  autograd backward in the input's dtype on ``--threads`` threads (when torch
  is installed). ``ratio_to_bound`` and ``ratio_to_torch`` are medians of the
  per-repetition ratios, so load that drifts during the run cancels;
* ``single_ms``: rank 0 running the whole global batch in one process, for
  ``scaling = step_ms / single_ms`` (K > 1 only).

Results go to ``--json`` and ``--markdown`` (a table), ``--plot`` draws a PNG
(needs matplotlib). BLAS threads are limited to ``--threads`` with threadpoolctl
when it is installed (the JSON says whether).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import tracemalloc
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..comm.counting import CountingComm, Tally
from ..comm.mpi import default_comm
from ..functional import backward, forward
from ..kernels import BACKENDS, ENV_VAR, _pool
from ..layouts import DATA_FORMATS, get_layout
from ._common import Progress

__all__ = ["add_arguments", "main", "missing_columns", "parse_case"]

DEFAULT_CASES = ("NCHW:32x64x56x56", "NCHW:256x256x14x14", "NC:64x1024")
RESULT_KEYS = (
    "data_format",
    "shape",
    "dtype",
    "world_size",
    "local_shape",
    "backend",
    "calls_per_repetition",
    "forward_ms",
    "backward_ms",
    "step_ms",
    "collective_ms",
    "collectives",
    "bytes_per_pass",
    "peak_bytes",
    "copy_ms",
    "bound_ms",
    "ratio_to_bound",
    "torch_ms",
    "ratio_to_torch",
    "single_ms",
    "scaling",
)


def parse_case(text: str) -> tuple[str, tuple[int, ...]]:
    """``"NCHW:32x64x56x56"`` -> ``("NCHW", (32, 64, 56, 56))`` (shape in that layout).

    Examples
    --------
    >>> parse_case("NHWC:8x4x4x3")
    ('NHWC', (8, 4, 4, 3))
    """
    fmt, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if fmt not in DATA_FORMATS or len(shape) != get_layout(fmt).ndim or min(shape) < 1:
        msg = (
            f"--case is {text!r}; expected FORMAT:DIMS with FORMAT one of "
            f"{', '.join(DATA_FORMATS)} and as many positive DIMS as FORMAT has axes, "
            f"e.g. NCHW:32x64x56x56"
        )
        raise argparse.ArgumentTypeError(msg)
    return fmt, shape


def add_arguments(parser) -> None:
    """Options of the ``bench`` subcommand."""
    parser.add_argument(
        "--case",
        dest="cases",
        action="append",
        type=parse_case,
        metavar="FORMAT:DIMS",
        help=f"global shape in the format's own layout (repeatable; default "
        f"{' '.join(DEFAULT_CASES)})",
    )
    parser.add_argument(
        "--dtype",
        dest="dtypes",
        action="append",
        choices=("float32", "float64"),
        help="repeatable; default float32",
    )
    parser.add_argument("--repeat", type=int, default=11, help="timed steps (median; default 11)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    parser.add_argument(
        "--backend", choices=BACKENDS, help=f"kernel backend (default: ${ENV_VAR}, else automatic)"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the torch baseline")
    parser.add_argument(
        "--no-single", action="store_true", help="skip the single-process full-batch run"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--plot", type=Path, help="write a PNG here (needs matplotlib)")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress (a tqdm bar, else a line per tenth of the cases)",
    )


def _local_count(n: int, size: int, rank: int) -> int:
    return n // size + (rank < n % size)


def _inputs(fmt, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    c = get_layout(fmt).channels(shape)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return x, dy, np.ones(c, dtype), np.zeros(c, dtype)


_REPETITION_S = 0.02  # a repetition runs enough steps to last about this long


def _step(x, dy, w, b, fmt, comm, backend):
    """One forward + backward; returns (time after forward, the kernel backend's name)."""
    res = forward(x, w, b, data_format=fmt, comm=comm, backend=backend)
    t1 = time.perf_counter()
    backward(dy, res.saved)
    return t1, res.saved.kernels.NAME


def _time_interleaved(x, dy, w, b, fmt, comm, counting, args):
    """Per repetition: ours on every rank, then torch and the copy on rank 0.

    Returns ``(times, calls, backend)``: ``times[i]`` = per-call seconds of
    (forward, backward, collectives) on the slowest rank, then torch and copy
    (0 where not timed), for repetition ``i``.
    """
    torch_step = None
    if not args.no_torch and comm.rank == 0:
        torch_step = _torch_step(x, dy, fmt, args.threads)
    out = np.empty_like(x)

    def copy():
        np.copyto(out, x)

    for _ in range(args.warmup):
        _step(x, dy, w, b, fmt, counting, args.backend)
    start = time.perf_counter()
    backend = _step(x, dy, w, b, fmt, counting, args.backend)[1]
    mine = np.zeros(comm.size)
    mine[comm.rank] = time.perf_counter() - start
    slowest = float(comm.allreduce_sum(mine, xp=np).max())  # every rank runs as many calls
    calls = max(1, math.ceil(_REPETITION_S / max(slowest, 1e-9)))
    times = np.zeros((comm.size, args.repeat, 5))
    for i in range(args.repeat):
        _barrier(comm)
        counting.tally = Tally()
        fwd = bwd = 0.0
        for _ in range(calls):
            t0 = time.perf_counter()
            t1 = _step(x, dy, w, b, fmt, counting, args.backend)[0]
            t2 = time.perf_counter()
            fwd, bwd = fwd + (t1 - t0), bwd + (t2 - t1)
        times[comm.rank, i, :3] = (fwd, bwd, counting.tally.seconds)
        if comm.rank == 0:
            times[0, i, 3] = _seconds(torch_step, calls) if torch_step is not None else 0.0
            times[0, i, 4] = _seconds(copy, calls)
    times = comm.allreduce_sum(times.reshape(-1), xp=np).reshape(times.shape).max(axis=0)
    return times / calls, calls, backend


def _collectives(x, dy, w, b, fmt, counting, backend):
    """Collectives and bytes per pass of one step."""
    counting.tally = Tally()
    res = forward(x, w, b, data_format=fmt, comm=counting, backend=backend)
    per_pass, nbytes = {"forward": counting.tally.calls}, {"forward": counting.tally.bytes}
    counting.tally = Tally()
    backward(dy, res.saved)
    per_pass["backward"], nbytes["backward"] = counting.tally.calls, counting.tally.bytes
    return per_pass, nbytes


def _barrier(comm):
    if comm.size > 1:
        comm.allreduce_sum(np.zeros(1, np.int64), xp=np)


def _seconds(fn, calls) -> float:
    """Wall time of ``calls`` calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start


def _median_ms(fn, repeat, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    return float(np.median([_seconds(fn, 1) for _ in range(repeat)])) * 1e3


def _peak_bytes(x, dy, w, b, fmt, backend) -> int:
    """tracemalloc peak of one single-process step, beyond its inputs (outputs not pooled)."""
    with _pool.disabled():
        tracemalloc.start()
        try:
            _step(x, dy, w, b, fmt, None, backend)
            return int(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()


def _torch_step(x, dy, fmt, threads):
    """torch CPU batch_norm forward + autograd backward as a callable, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    axis = get_layout(fmt).channel_axis
    order = (0, axis, *[i for i in range(1, x.ndim) if i != axis])
    xt = torch.from_numpy(x).permute(order).requires_grad_(True)  # channels_last stays strided
    dyt = torch.from_numpy(dy).permute(order)
    c = x.shape[axis]
    wt = torch.ones(c, dtype=xt.dtype, requires_grad=True)
    bt = torch.zeros(c, dtype=xt.dtype, requires_grad=True)

    def step():
        y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
        y.backward(dyt)
        xt.grad = wt.grad = bt.grad = None

    return step


def _blas_limit(threads):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext(), False
    return threadpool_limits(limits=threads), True


def run_case(fmt, shape, dtype, comm, args) -> dict:
    """Time one case on every rank of ``comm``; the full result on every rank."""
    n_local = _local_count(shape[0], comm.size, comm.rank)
    local_shape = (n_local, *shape[1:])
    x, dy, w, b = _inputs(fmt, local_shape, dtype, seed=comm.rank)
    counting = CountingComm(comm)
    times, calls, backend = _time_interleaved(x, dy, w, b, fmt, comm, counting, args)
    per_pass, nbytes = _collectives(x, dy, w, b, fmt, counting, args.backend)
    fwd, bwd, coll, _, copy = (float(np.median(times[:, k])) * 1e3 for k in range(5))
    steps = times[:, 0] + times[:, 1]
    step = float(np.median(steps)) * 1e3
    result = {
        "data_format": fmt,
        "shape": list(shape),
        "dtype": dtype,
        "world_size": comm.size,
        "local_shape": list(local_shape),
        "backend": backend,
        "calls_per_repetition": calls,
        "forward_ms": fwd,
        "backward_ms": bwd,
        "step_ms": step,
        "collective_ms": coll,
        "collectives": per_pass,
        "bytes_per_pass": nbytes,
        "peak_bytes": _peak_bytes(x, dy, w, b, fmt, args.backend),
        "copy_ms": copy,
        "bound_ms": 3 * copy,
        "ratio_to_bound": float(np.median(steps / (3 * times[:, 4]))),
        "torch_ms": None,
        "ratio_to_torch": None,
        "single_ms": None,
        "scaling": None,
    }
    if times[:, 3].all():
        result["torch_ms"] = float(np.median(times[:, 3])) * 1e3
        result["ratio_to_torch"] = float(np.median(steps / times[:, 3]))
    del x, dy
    if comm.size > 1 and not args.no_single:
        _barrier(comm)
        if comm.rank == 0:
            xs, dys, ws, bs = _inputs(fmt, shape, dtype, seed=0)
            result["single_ms"] = _median_ms(
                lambda: _step(xs, dys, ws, bs, fmt, None, args.backend), args.repeat, args.warmup
            )
            result["scaling"] = step / result["single_ms"]
        _barrier(comm)
    return result


def markdown_table(results) -> str:
    """The results as a markdown table."""
    head = (
        "| format | shape | dtype | ranks | step ms | fwd ms | bwd ms | torch ms | ratio "
        "| bound ms | ratio to bound | 1-process ms | scaling | data/agree per pass "
        "| bytes/pass | peak MiB | backend |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(v, spec=".2f"):
        return "n/a" if v is None else format(v, spec)

    for r in results:
        fw = r["collectives"]["forward"]
        lines.append(
            f"| {r['data_format']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} "
            f"| {r['world_size']} | {f(r['step_ms'])} | {f(r['forward_ms'])} "
            f"| {f(r['backward_ms'])} | {f(r['torch_ms'])} | {f(r['ratio_to_torch'])} "
            f"| {f(r['bound_ms'])} | {f(r['ratio_to_bound'])} | {f(r['single_ms'])} "
            f"| {f(r['scaling'])} | {fw['data']}/{fw['agree']} "
            f"| {r['bytes_per_pass']['forward']['data']} | {r['peak_bytes'] / 2**20:.1f} "
            f"| {r['backend']} |"
        )
    return "\n".join(lines) + "\n"


def plot(results, path) -> None:
    """Bar chart: ours, torch and the memory-traffic bound per case."""
    try:
        import matplotlib
    except ImportError:
        msg = "--plot needs matplotlib: pip install 'refsyncbn[bench]' (or matplotlib)"
        raise SystemExit(msg) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['data_format']} {'x'.join(map(str, r['shape']))}\n{r['dtype']}, "
        f"{r['world_size']} rank(s)"
        for r in results
    ]
    series = [
        ("refsyncbn step", "step_ms"),
        ("torch 1 thread", "torch_ms"),
        ("memory-traffic bound", "bound_ms"),
    ]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(results)), 4))
    width = 0.8 / len(series)
    for k, (name, key) in enumerate(series):
        vals = [r[key] if r[key] is not None else math.nan for r in results]
        ax.bar([i + k * width for i in range(len(results))], vals, width, label=name)
    ax.set_xticks([i + width for i in range(len(results))], labels, fontsize=8)
    ax.set_ylabel("ms per forward + backward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(args) -> int:
    """Run the benchmark; write JSON / markdown / PNG on rank 0. Returns 0."""
    comm = default_comm()
    cases = args.cases or [parse_case(c) for c in DEFAULT_CASES]
    dtypes = args.dtypes or ["float32"]
    for name in ("repeat", "warmup", "threads"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            msg = f"--{name} is {getattr(args, name)}; expected a positive integer"
            raise ValueError(msg)
    limit, limited = _blas_limit(args.threads)
    results = []
    with (
        limit,
        Progress(
            len(cases) * len(dtypes),
            "bench",
            "case",
            enabled=comm.rank == 0 and not args.no_progress,
        ) as bar,
    ):
        for fmt, shape in cases:
            for dtype in dtypes:
                results.append(run_case(fmt, shape, dtype, comm, args))
                bar.update()
    if comm.rank != 0:
        return 0
    meta = {
        "command": " ".join(sys.argv),
        "world_size": comm.size,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": args.threads,
        "blas_threads_limited": limited,
        "torch": _torch_version(args),
    }
    table = markdown_table(results)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if args.markdown:
        args.markdown.write_text(table)
    if args.plot:
        plot(results, args.plot)
    print(table, end="")
    for note in missing_columns(args, comm.size, meta["torch"]):
        print(note)
    return 0


def missing_columns(args, world_size, torch_version) -> list[str]:
    """One line per baseline column the table leaves "n/a", saying why.

    Examples
    --------
    >>> import argparse
    >>> missing_columns(argparse.Namespace(no_torch=True, no_single=False), 1, None)
    ['n/a torch ms, ratio: --no-torch', 'n/a 1-process ms, scaling: one rank (the 1-process run is the run itself)']
    """
    notes = []
    if args.no_torch:
        notes.append("n/a torch ms, ratio: --no-torch")
    elif torch_version is None:
        notes.append("n/a torch ms, ratio: torch is not installed (pip install torch)")
    if args.no_single:
        notes.append("n/a 1-process ms, scaling: --no-single")
    elif world_size == 1:
        notes.append("n/a 1-process ms, scaling: one rank (the 1-process run is the run itself)")
    return notes


def _torch_version(args):
    if args.no_torch:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__
