"""What every adapter's worker process shares: reading the cases, writing results."""

from __future__ import annotations

import re
from pathlib import Path

from ..cases import read_case, write_result
from ..conventions import get_convention


def cases_in(cases_dir) -> list:
    """``(name, Case)`` for every ``cases_dir/<name>.npz``, sorted by name."""
    return [(p.stem, read_case(p)) for p in sorted(Path(cases_dir).glob("*.npz"))]


def save(out_dir, name: str, rank: int, out: dict) -> None:
    """Write ``out_dir/name/rank{rank}.npz``."""
    path = Path(out_dir, name)
    path.mkdir(parents=True, exist_ok=True)
    write_result(path / f"rank{rank}.npz", **out)


def save_error(out_dir, name: str, rank: int, exc: BaseException) -> None:
    """Write ``out_dir/name/rank{rank}.error.txt``: the exception, one line."""
    path = Path(out_dir, name)
    path.mkdir(parents=True, exist_ok=True)
    # no machine-specific paths in reports: ".../site-packages/keras/x.py" -> "keras/x.py"
    text = re.sub(r"/\S*/(site-packages|dist-packages)/", "", " ".join(str(exc).split()))
    text = re.sub(r"/\S*/(refsyncbn/)", r"\1", text) or "(no message)"
    (path / f"rank{rank}.error.txt").write_text(f"{type(exc).__name__}: {text[:300]}\n")


def momentum_for(case, meaning: str) -> float:
    """``case.momentum`` (in its convention's meaning) in the framework's ``meaning``."""
    weight = get_convention(case.convention).batch_weight(case.momentum)
    return weight if meaning == "update" else 1.0 - weight


def run_all(cases_dir, out_dir, run_case, wanted=None) -> int:
    """One-process workers: ``run_case(case)`` for each wanted case of ``cases_dir``.

    ``run_case`` returns every rank's outputs, or a dict of variant name to
    them (e.g. pmap and shard_map): the first variant is written to
    ``out_dir/<case>/``, the others to ``out_dir/<case>/<variant>/``.
    """
    for name, case in cases_in(cases_dir):
        if wanted is not None and not wanted(case):
            continue
        try:
            result = run_case(case)
        except Exception as exc:  # the framework's verdict on this case
            for r in range(case.world_size):
                save_error(out_dir, name, r, exc)
            continue
        variants = result if isinstance(result, dict) else {"": result}
        for i, (variant, outs) in enumerate(variants.items()):
            for r, out in enumerate(outs):
                save(out_dir, name if i == 0 else f"{name}/{variant}", r, out)
    return 0
