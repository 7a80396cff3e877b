"""``python -m refsyncbn``: the command line (:mod:`refsyncbn.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
