"""How far per-rank BN strays from global-batch BN, vs SyncBN and equal-per-rank weighting.

Launch: ``mpiexec -n W python -m mpi4py scripts/small_batch_study.py [options]``.

For every world size ``k`` in ``1..W`` (the first ``k`` ranks, split off the
world) and every per-rank batch size ``n`` in ``--batch-sizes``, ``--trials``
global batches are drawn (the same on every rank, from ``--seed``) and split
over the ``k`` ranks, and each rank normalizes its shard three ways:

* ``local``: plain per-rank BN (statistics of the shard only), even split
  ``n`` per rank;
* ``sync``: refsyncbn SyncBN, count weighting (the exact global statistics),
  uneven split;
* ``equal``: SyncBN with equal per-rank weighting (the Paddle / Flax /
  ChainerMN rule), same uneven split.

Uneven split: rank ``r`` holds ``round(2 n (r + 1) / (k + 1))`` samples
(mean ``n`` per rank). Rank ``r``'s samples are drawn from ``N(shift * r, 1)``
for each ``--shifts`` entry: 0 is i.i.d. data (per-rank BN is noisy), > 0 shards
that differ like the shards of a sorted or per-worker data set (per-rank BN and
equal weighting are biased too). Errors against the float64 global-batch batch norm
computed here in one array: ``mean_err = max_c |mean - mean_global| / std``,
``var_err = max_c |var / var_global - 1|`` and ``y_rms`` = RMS of
``y - y_global`` over the rank's outputs; the maximum over ranks, averaged over
trials. Writes a markdown table (stdout and ``--markdown``), ``--json`` and a
PNG (``--plot``, needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from refsyncbn import forward
from refsyncbn.comm import default_comm

METHODS = {
    "local": ("reference", "even"),
    "sync": ("reference", "uneven"),
    "equal": ("paddle", "uneven"),
}
CHANNELS, SPATIAL = 8, (4, 4)


def splits_for(n: int, k: int, how: str) -> list[int]:
    """Per-rank batch sizes: ``n`` each, or uneven with mean ``n`` (every rank >= 1)."""
    if how == "even":
        return [n] * k
    return [max(1, round(2 * n * (r + 1) / (k + 1))) for r in range(k)]


def global_batch(splits, shift, rng):
    """Shards stacked in rank order; rank r's samples ~ N(shift * r, 1)."""
    parts = [rng.normal(shift * r, 1.0, (m, CHANNELS, *SPATIAL)) for r, m in enumerate(splits)]
    return np.concatenate(parts)


def errors(x_global, splits, rank, y, mean, var):
    """(mean_err, var_err, y_rms) of one rank's result against the global batch norm."""
    g_mean = x_global.mean(axis=(0, 2, 3))
    g_var = x_global.var(axis=(0, 2, 3))
    start = sum(splits[:rank])
    shard = x_global[start : start + splits[rank]]
    y_ref = (shard - g_mean[:, None, None]) / np.sqrt(g_var[:, None, None] + 1e-5)
    return (
        float(np.max(np.abs(mean - g_mean) / np.sqrt(g_var))),
        float(np.max(np.abs(var / g_var - 1))),
        float(np.sqrt(np.mean((y - y_ref) ** 2))),
    )


def run(comm, batch_sizes, trials, shifts, seed):
    """Rows of ``{shift, world_size, batch, method, mean_err, var_err, y_rms}`` (rank 0)."""
    rows = []
    for k in range(1, comm.size + 1):
        sub = comm.split(0 if comm.rank < k else None, comm.rank)
        for shift, n in ((sh, n) for sh in shifts for n in batch_sizes):
            for method, (convention, how) in METHODS.items():
                splits = splits_for(n, k, how)
                acc = np.zeros(3)
                rng = np.random.default_rng([seed, k, n])
                for _ in range(trials):
                    x = global_batch(splits, shift, rng)
                    if sub is None:
                        continue
                    start = sum(splits[: sub.rank])
                    shard = x[start : start + splits[sub.rank]]
                    res = forward(
                        shard,
                        running_mean=np.zeros(CHANNELS),
                        running_var=np.ones(CHANNELS),
                        convention=convention,
                        comm=None if method == "local" else sub,
                    )
                    err = errors(x, splits, sub.rank, res.y, res.saved.mean, res.saved.var)
                    mine = np.zeros((k, 3))
                    mine[sub.rank] = err
                    acc += sub.allreduce_sum(mine.reshape(-1), xp=np).reshape(k, 3).max(axis=0)
                if comm.rank == 0:
                    mean_err, var_err, y_rms = acc / trials
                    rows.append(
                        {
                            "shift": shift,
                            "world_size": k,
                            "batch": n,
                            "method": method,
                            "splits": splits,
                            "mean_err": mean_err,
                            "var_err": var_err,
                            "y_rms": y_rms,
                        }
                    )
    return rows


def table(rows) -> str:
    lines = [
        "| shift | ranks | per-rank batch | local y RMS | sync y RMS | equal y RMS "
        "| local mean err | equal mean err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["shift"], r["world_size"], r["batch"], r["method"]): r for r in rows}
    for sh, k, n in sorted({(r["shift"], r["world_size"], r["batch"]) for r in rows}):
        loc, syn, eq = (by[(sh, k, n, m)] for m in METHODS)
        lines.append(
            f"| {sh:g} | {k} | {n} | {loc['y_rms']:.3g} | {syn['y_rms']:.1e} "
            f"| {eq['y_rms']:.3g} | {loc['mean_err']:.3g} | {eq['mean_err']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        msg = "--plot needs matplotlib: pip install 'refsyncbn[bench]' (or matplotlib)"
        raise SystemExit(msg) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = sorted({r["shift"] for r in rows})
    sizes = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(1, len(shifts), figsize=(5.5 * len(shifts), 4.2), squeeze=False)
    styles = {"local": "-", "equal": "--", "sync": ":"}
    for ax, shift in zip(axes[0], shifts, strict=True):
        for method, style in styles.items():
            for k in sizes[1:] if method != "sync" else sizes[-1:]:  # 1 rank: all exact
                pts = sorted(
                    (r["batch"], max(r["y_rms"], 1e-17))
                    for r in rows
                    if (r["method"], r["world_size"], r["shift"]) == (method, k, shift)
                )
                label = f"{method}, {k} ranks" if method != "sync" else "sync (exact), any k"
                ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("per-rank batch size")
        ax.set_ylabel("RMS of y - y(global batch)")
        ax.set_title(f"rank r's data ~ N({shift:g} r, 1)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1, 2, 4, 8, 16, 32, 64],
        help="comma-separated (default 1..64)",
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--shifts",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[0.0, 0.5],
        help="rank r's samples ~ N(shift * r, 1), comma-separated (default 0,0.5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    if args.trials < 1 or min(args.batch_sizes) < 1:
        parser.error("--trials and every --batch-sizes entry must be >= 1")
    comm = default_comm()
    rows = run(comm, args.batch_sizes, args.trials, args.shifts, args.seed)
    if comm.rank == 0:
        text = table(rows)
        print(text, end="")
        if args.markdown:
            args.markdown.write_text(text)
        if args.json:
            meta = {
                "world_size": comm.size,
                "trials": args.trials,
                "shifts": args.shifts,
                "seed": args.seed,
                "channels": CHANNELS,
                "spatial": list(SPATIAL),
            }
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        if args.plot:
            plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
