"""The command line: ``python -m refsyncbn {run,selfcheck,check,vectors,bench} ...``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)``
and ``main(args) -> int``; this file only wires them to argparse.
"""

from __future__ import annotations

import argparse
import importlib

_COMMANDS = {
    "run": ("refsyncbn.cli.run", "run one case file on every rank, write rank{r}.npz"),
    "selfcheck": ("refsyncbn.cli.selfcheck", "random cases vs the float64 oracle, with a report"),
    "check": ("refsyncbn.testing.checker", "check another implementation's outputs"),
    "vectors": ("refsyncbn.testing.vectors", "write the golden-vector set"),
    "bench": ("refsyncbn.cli.bench", "time forward/backward against baselines"),
    "conform": ("refsyncbn.cli.conform", "run a real framework's SyncBatchNorm through the checker"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="refsyncbn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(cmd)
    args = parser.parse_args(argv)
    return importlib.import_module(args._module).main(args)

