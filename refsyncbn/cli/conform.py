"""``refsyncbn conform {torch,flax,keras}``: a framework's own SyncBatchNorm vs the oracle.

Runs the checker's probe cases (the convention fingerprint) and ``--cases N``
seeded random cases (2 or 3 ranks, uneven splits with batch-1 and empty
ranks, process groups, every data format, float32 and float64, eval mode)
through the framework's SyncBatchNorm with :func:`refsyncbn.adapters.run`,
then checks the per-rank outputs with :func:`refsyncbn.testing.checker.check`
(the directory protocol) against the float64 oracle of the framework's
preset. The report (markdown, and JSON beside it) gives per case the verdict
and the worst error relative to its bound, the fingerprint, the cases the
framework cannot express and the known deviations that explain a failure.

Exit status: 0 when every expressible case passes or fails only through a
known deviation, 1 otherwise, 2 when the framework is not installed or the
arguments are wrong.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..adapters import FRAMEWORKS, Outcome, check_outcomes, get_adapter, missing, run
from ..cases import Case
from ..conventions import CONVENTIONS
from ..layouts import DATA_FORMATS, get_layout
from ..testing.checker import probe_cases
from ..testing.tolerances import ErrorModel

__all__ = ["add_arguments", "conform", "conform_cases", "main"]


def add_arguments(parser) -> None:
    """Arguments of the ``conform`` subcommand."""
    parser.add_argument(
        "framework",
        choices=tuple(FRAMEWORKS),
        help="whose SyncBatchNorm to run (it must be installed)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help="write the markdown report to PATH and the JSON to PATH.json "
        "(default: print the markdown)",
    )
    parser.add_argument(
        "--cases",
        type=int,
        default=12,
        metavar="N",
        help="random cases besides the probes (default 12)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the cases")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="limit for the framework's run (default 600)",
    )


def main(args) -> int:
    """Run, check, report; see the module docstring for the exit status."""
    prog = f"refsyncbn conform {args.framework}"
    need = missing(args.framework)
    if need is not None:
        print(f"{prog}: {need}", file=sys.stderr)
        return 2
    if args.cases < 0:
        print(f"{prog}: error: --cases is {args.cases}; expected N >= 0", file=sys.stderr)
        return 2
    report = conform(args.framework, n_cases=args.cases, seed=args.seed, timeout=args.timeout)
    text = markdown(report)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"{prog}: {report['summary']}; report in {args.out}")
    return 1 if report["unexplained_failures"] else 0


def conform_cases(preset: str, n_cases: int, seed: int) -> dict[str, Case]:
    """``n_cases`` seeded random cases in ``preset``'s convention, named ``random_NN``.

    Case ``i`` uses data format ``i mod 7`` and float64 for even ``i``,
    float32 for odd ``i``; 2 or 3 ranks; local batches of 0 to 4 with a
    batch-1 rank and an empty rank in every third case; two process groups
    in every fourth case with 3 ranks; eval mode in every fifth; a mask in
    every sixth (when training).

    Examples
    --------
    >>> cases = conform_cases("torch", 14, seed=0)
    >>> sorted({c.data_format for c in cases.values()}) == sorted(DATA_FORMATS)
    True
    >>> {c.x.dtype.name for c in cases.values()} == {"float32", "float64"}
    True
    """
    conv = CONVENTIONS[preset]
    cases = {}
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        dtype = np.float64 if i % 2 == 0 else np.float32
        layout = get_layout(DATA_FORMATS[i % 7])
        w = int(rng.integers(2, 4))
        splits = [int(s) for s in rng.integers(1, 5, size=w)]
        if i % 3 == 0:
            splits[0], splits[-1] = 1, 0
        groups = [[0, w - 1], list(range(1, w - 1))] if w == 3 and i % 4 == 1 else None
        for g in groups or [list(range(w))]:
            if sum(splits[r] for r in g) < 2:  # two values per channel in every group
                splits[g[0]] += 2 - sum(splits[r] for r in g)
        c = int(rng.integers(1, 5))
        shape = [sum(splits), *(int(s) for s in rng.integers(1, 4, size=layout.ndim - 2))]
        shape.insert(layout.channel_axis, c)
        bshape = [1] * layout.ndim
        bshape[layout.channel_axis] = c
        loc = rng.uniform(-5, 5, c).reshape(bshape)
        scale = (10.0 ** rng.uniform(-1, 1, c)).reshape(bshape)
        affine = rng.random() < 0.8
        training = i % 5 != 4
        mask = None
        if training and i % 6 == 5:
            mask = rng.random(layout.mask_shape(shape)) < 0.7
            for start in np.cumsum([0, *splits[:-1]]):
                mask[start : start + 2] = True  # >= 2 valid positions on every rank
        cases[f"random_{i:02d}"] = Case(
            x=(rng.standard_normal(shape) * scale + loc).astype(dtype),
            dy=rng.standard_normal(shape).astype(dtype),
            weight=rng.uniform(0.5, 2, c).astype(dtype) if affine else None,
            bias=rng.standard_normal(c).astype(dtype) if affine else None,
            running_mean=rng.standard_normal(c).astype(dtype),
            running_var=rng.uniform(0.5, 2, c).astype(dtype),
            splits=tuple(splits),
            data_format=layout.data_format,
            convention=preset,
            eps=conv.eps,
            momentum=conv.momentum,
            training=training,
            mask=mask,
            groups=groups,
        )
    return cases


def conform(framework: str, *, n_cases: int = 12, seed: int = 0, timeout: float = 600.0) -> dict:
    """Run the probes and ``n_cases`` random cases through ``framework``; the report as a dict.

    The error model is the framework's arithmetic: accumulation in the data's
    dtype (at least float32) and the adapter's declared variance algorithm
    (``VARIANCE``: "stable" or "naive").
    """
    adapter = get_adapter(framework)
    cases = {**probe_cases(adapter.PRESET), **conform_cases(adapter.PRESET, n_cases, seed)}
    start = time.perf_counter()
    outcomes = run(framework, cases, timeout=timeout)
    wall = time.perf_counter() - start
    for name, outcome in list(outcomes.items()):  # other ways of running it: rows of their own
        for variant, outs in outcome.variants.items():
            cases[f"{name}@{variant}"] = cases[name]
            outcomes[f"{name}@{variant}"] = Outcome(outputs=outs)
    model = ErrorModel(variance=adapter.VARIANCE)
    report = check_outcomes(cases, outcomes, model=model)
    rows = [_row(name, case, outcomes[name], report, adapter) for name, case in cases.items()]
    failed = [r for r in rows if r["verdict"] in ("FAIL", "error")]
    unexplained = [r["case"] for r in failed if not r["known_deviation"]]
    counts = {
        v: sum(r["verdict"] == v for r in rows)
        for v in ("pass", "FAIL", "error", "not expressible")
    }
    summary = (
        f"{counts['pass']} pass, {counts['FAIL']} fail, {counts['error']} error, "
        f"{counts['not expressible']} not expressible of {len(rows)} cases; "
        f"{len(failed) - len(unexplained)} failure(s) explained by known deviations, "
        f"{len(unexplained)} unexplained"
    )
    return {
        "framework": framework,
        "label": adapter.label(),
        "preset": adapter.PRESET,
        "versions": {p: _version(p) for p in ("numpy", *FRAMEWORKS[framework][1])},
        "command": f"python -m refsyncbn conform {framework} --cases {n_cases} --seed {seed}",
        "error_model": repr(model),
        "wall_s": round(wall, 1),
        "cases": rows,
        "fingerprint": {
            t.name: {"value": t.value, "evidence": t.evidence} for t in report.fingerprint.values()
        },
        "consistent_presets": list(report.presets),
        "deviations": list(adapter.DEVIATIONS),
        "summary": summary,
        "unexplained_failures": unexplained,
    }


def _row(name, case, outcome, report, adapter) -> dict:
    """One case's line of the report."""
    row = {
        "case": name,
        "world": case.world_size,
        "splits": list(case.splits),
        "groups": case.groups,
        "data_format": case.data_format,
        "dtype": case.x.dtype.name,
        "training": case.training,
        "verdict": "",
        "worst": None,
        "note": "",
        "known_deviation": adapter.known_deviation(case, name.partition("@")[2]),
    }
    scope = adapter.DEVIATIONS.get(row["known_deviation"])  # the outputs it explains
    if outcome.not_expressible:
        return {
            **row,
            "verdict": "not expressible",
            "note": outcome.not_expressible,
            "known_deviation": "",
        }
    if outcome.error or name in report.errors:
        return {
            **row,
            "verdict": "error",
            "note": outcome.error or report.errors[name],
            "known_deviation": row["known_deviation"] if scope is None else "",
        }
    qs = report.checks[name]
    worst = report.worst(name)
    row["worst"] = {
        "quantity": worst.quantity,
        "rank": worst.rank,
        "ratio": _num(worst.ratio),
        "error": _num(worst.error),
        "bound": _num(worst.bound),
    }
    bad = [q for q in qs if not q.passed]
    if not bad:
        return {**row, "verdict": "pass", "known_deviation": ""}
    row.update(
        verdict="FAIL",
        note=f"{len(bad)} of {len(qs)} outputs outside the bound, e.g. {worst.describe()}",
    )
    if scope is not None and any(q.quantity not in scope for q in bad):
        row["note"] += (
            f"; beyond what the known deviation explains "
            f"({', '.join(scope)} only): {row['known_deviation']}"
        )
        row["known_deviation"] = ""
    return row


def _num(v: float):
    """A float for JSON (inf/NaN as strings)."""
    return v if math.isfinite(v) else str(v)


def _version(package: str) -> str:
    """Installed version of the import package ``package`` (e.g. tensorflow-cpu's)."""
    for dist in importlib.metadata.packages_distributions().get(package, [package]):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def markdown(report: dict) -> str:
    """The report as markdown."""
    fw = report["framework"]
    lines = [
        f"# Conformance: {fw}",
        "",
        f"{report['label']}, checked against the float64 oracle of the "
        f"`{report['preset']}` preset.",
        "",
        f"- command: `{report['command']}` ({report['wall_s']} s for the framework's run)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- error model: `{report['error_model']}` (accumulation: the data's dtype, "
        "at least float32)",
        f"- summary: {report['summary']}",
        "",
        "## Cases",
        "",
        "| case | ranks | splits | groups | format | dtype | mode | verdict "
        "| worst error / bound | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        w = r["worst"]
        worst = (
            ""
            if w is None
            else (
                f"{w['quantity']} (rank {w['rank']}): "
                f"{_fmt(w['ratio'])} ({_fmt(w['error'])} / "
                f"{_fmt(w['bound'])})"
            )
        )
        note = r["note"]
        if r["verdict"] in ("FAIL", "error") and r["known_deviation"]:
            note = f"known deviation: {r['known_deviation']}. {note}"
        groups = "" if r["groups"] is None else str(r["groups"])
        mode = "train" if r["training"] else "eval"
        lines.append(
            f"| {r['case']} | {r['world']} | {r['splits']} | {groups} | "
            f"{r['data_format']} | {r['dtype']} | {mode} | {r['verdict']} | {worst} | "
            f"{_cell(note)} |"
        )
    lines += ["", "## Fingerprint (probe cases)", ""]
    if report["fingerprint"]:
        lines += ["| trait | value | evidence |", "|---|---|---|"]
        lines += [
            f"| {k} | {t['value']} | {_cell(t['evidence'])} |"
            for k, t in report["fingerprint"].items()
        ]
        lines += [
            "",
            "Consistent with presets: " + (", ".join(report["consistent_presets"]) or "none"),
        ]
    else:
        lines.append("No probe case ran.")
    lines += ["", "## Known deviations", ""]
    lines += [f"- {d}" for d in report["deviations"]] or ["None."]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def _fmt(v) -> str:
    return v if isinstance(v, str) else f"{v:.3g}"
