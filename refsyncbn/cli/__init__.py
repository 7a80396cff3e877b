"""The command line: ``python -m refsyncbn {run,selfcheck,check,vectors,bench} ...``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)``
and ``main(args) -> int``; this file wires them to argparse and turns every
failure into ONE line on stderr, ``refsyncbn COMMAND: error: ...``, with a
non-zero exit status (``--debug``: the full traceback instead).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._common import one_line

__all__ = ["main"]

_COMMANDS = {
    "run": ("refsyncbn.cli.run", "run one case file on every rank, write rank{r}.npz"),
    "selfcheck": ("refsyncbn.cli.selfcheck", "random cases vs the float64 oracle, with a report"),
    "check": ("refsyncbn.testing.checker", "check another implementation's outputs"),
    "vectors": ("refsyncbn.testing.vectors", "write the golden-vector set"),
    "bench": ("refsyncbn.cli.bench", "time forward/backward against baselines"),
    "conform": (
        "refsyncbn.cli.conform",
        "run a real framework's SyncBatchNorm through the checker",
    ),
}
_DESCRIPTION = (
    "refsyncbn: the reference Synchronized Batch Normalization. Run a command "
    "with --help for its options; under MPI launch it as "
    "`mpiexec -n K python -m mpi4py -m refsyncbn COMMAND ...`."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the problem and where to read more."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    """Parse ``argv``, run the subcommand; its exit status (1 on an error, 2 on bad usage)."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the full traceback instead of one line",
    )
    parser = _Parser(prog="refsyncbn", description=_DESCRIPTION)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for name, (module, help_text) in _COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, parents=[debug])
        cmd.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(cmd)
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(args._module).main(args)
    except KeyboardInterrupt:
        print(f"refsyncbn {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:
        if args.debug:
            raise
        print(f"refsyncbn {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
